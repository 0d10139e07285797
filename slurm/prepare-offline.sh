#!/bin/bash
# Prepare a config for compute nodes without internet. Run on a login node, in the job's environment:
#
#   bash slurm/prepare-offline.sh CONFIG [fit overrides...]
#   bash slurm/prepare-offline.sh configs/falcon-40b-qlora.yaml
#   LF_WHEELHOUSE=/shared/wheels bash slurm/prepare-offline.sh configs/falcon-7b-qlora.yaml   # + a wheelhouse
#
# 1. Packages. The job runs the environment its sbatch script activates; create that venv or conda
#    environment here, on a filesystem the compute nodes mount, and nothing else is needed. For nodes
#    that must install locally, LF_WHEELHOUSE=DIR fills DIR with wheels of this package and everything
#    it needs; install there with `pip install --no-index --find-links DIR "lightning_falcon[deepspeed]"`.
# 2. The model snapshot and tokenizer, into the Hugging Face cache (HF_HOME; set it to a shared path).
# 3. The dataset, into the datasets cache, and its tokenized cache under data.cache_dir.
# 4. A second pass with the network off (HF_HUB_OFFLINE=1) proves the job will find all of it.
# Gated models need HF_TOKEN in the environment here; it is read from there and never written anywhere.
set -euo pipefail
CONFIG="${1:?usage: bash slurm/prepare-offline.sh CONFIG [fit overrides...]}"
shift
if [[ ! -f "$CONFIG" ]]; then
    echo "prepare-offline.sh: error: config file '$CONFIG' not found (relative to $PWD): give a path to a YAML file" >&2
    exit 2
fi
if [[ -n "${LF_WHEELHOUSE:-}" ]]; then
    REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    python -m pip wheel --wheel-dir "$LF_WHEELHOUSE" "$REPO[deepspeed]"
    echo "[prefetch] wheels in $LF_WHEELHOUSE"
fi
python -m lightning_falcon prefetch --config "$CONFIG" "$@"
HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m lightning_falcon prefetch --config "$CONFIG" "$@" > /dev/null
echo "[prefetch] checked offline: in the job, export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 (slurm/fit.sbatch, Environment)"

#!/usr/bin/env bash
# One visit to a lent GPU machine, in one call: install the wheels brought along in .whl/ (made here by
# benchmarks/gpu-wheels.sh), run the GPU tests (`pytest -m gpu`), then benchmarks/gpu.py. Each step is echoed.
# Logs and the benchmark's JSON go to $OUT (the folder a device call brings back), else runs/gpu-device/.
#
#   bash benchmarks/gpu-wheels.sh            # here, once: the wheels the GPU machine lacks
#   bash benchmarks/gpu-device.sh            # there: at most 7 minutes (the tests 3, the benchmark 3 2/3)
#   bash benchmarks/gpu-device.sh --dry-run  # here first: the same steps on CPU (the GPU tests skip, gpu.py
#                                            # --dry-run), the wheels installed for python 3.12 but not run
#
# Runs under the machine's own python3 and its torch; the wheels only add what it lacks.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=()
[ "${1:-}" = --dry-run ] && dry=(--dry-run)
out=${OUT:-runs/gpu-device}
python=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

step() {
    echo "+ $*" >&2
    "$@"
}

if [ ${#dry[@]} -gt 0 ]; then  # the GPU machine's python is 3.12: check that the wheels install there
    step "$python" -m pip install -q --no-index --no-deps --no-compile --only-binary=:all: --python-version 3.12 \
        --upgrade --target "$(mktemp -d)" .whl/*.whl || exit 1
else
    step "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    step nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv
fi
step "$python" -c "import importlib; print(', '.join(f'{n} {importlib.import_module(n).__version__}' for n in
    ['torch', 'transformers', 'peft', 'lightning', 'bitsandbytes', 'datasets', 'deepspeed', 'trl', 'pyarrow']))"
step "$python" -m bitsandbytes 2>&1 | tail -4
status=0
step timeout 180 "$python" -m pytest -m gpu -v -p no:cacheprovider --durations=10 tests/test_gpu.py tests/test_attention.py 2>&1 \
    | tee "$out/pytest-gpu.log" || status=1
step timeout 220 "$python" benchmarks/gpu.py "${dry[@]}" --json "$out/gpu.json" 2>&1 | tee "$out/gpu.log" || status=1
exit $status

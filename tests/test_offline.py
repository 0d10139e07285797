"""Preparing a run for compute nodes without internet: `prefetch` and slurm/prepare-offline.sh.

The Hub is unreachable here, so a Hub id is served from a Hugging Face cache laid out as
`snapshot_download` leaves it (models--ORG--NAME/refs/main + snapshots/COMMIT/), holding the tiny model.
"""

import os
import shutil
import sys

import pytest
from helpers import REPO, TINY
from processes import run_process

pytestmark = pytest.mark.slow  # prefetch and the offline script run as subprocesses

COMMIT = "0" * 40


def hub_cache(root, repo_id: str):
    """An HF_HOME whose hub cache holds the tiny model under `repo_id`."""
    home = root / "hf"
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(TINY, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return home


def run(root, *args, hf_home=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if hf_home is not None:
        env["HF_HOME"] = str(hf_home)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env["PATH"]])
    return run_process(args, cwd=root, env=env, timeout=300)


def lightning_falcon(root, subcommand, config, *overrides, hf_home):
    """`python -m lightning_falcon SUBCOMMAND --config configs/CONFIG OVERRIDES` with the network off."""
    command = [sys.executable, "-m", "lightning_falcon", subcommand, "--config", str(REPO / "configs" / config)]
    return run(root, *command, "--data.cache_dir", str(root / "cache"), *overrides, hf_home=hf_home)


def test_prefetch_resolves_a_hub_model_from_the_cache_and_tokenizes_the_data(tmp_path):
    home = hub_cache(tmp_path, "lf-test/tiny-falcon")
    model = ["--model.model_name_or_path", "lf-test/tiny-falcon"]
    proc = lightning_falcon(tmp_path, "prefetch", "tiny.yaml", *model, hf_home=home)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"[prefetch] lf-test/tiny-falcon: {home / 'hub'}" in proc.stdout
    assert "[prefetch] done" in proc.stdout
    (stats,) = (tmp_path / "cache" / "tokenized").glob("*/stats.json")
    written = stats.stat().st_mtime_ns
    # The job on a compute node then trains from those caches with the network off.
    runs = ["--trainer.max_steps", "2", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    fit = lightning_falcon(tmp_path, "fit", "tiny.yaml", *model, *runs, hf_home=home)
    assert fit.returncode == 0, fit.stderr[-2000:]
    # The tokenized cache was used, not rebuilt.
    assert list((tmp_path / "cache" / "tokenized").glob("*/stats.json")) == [stats]
    assert stats.stat().st_mtime_ns == written


def test_prefetch_of_a_model_it_cannot_download_is_a_one_line_error(tmp_path):
    proc = lightning_falcon(tmp_path, "prefetch", "falcon-7b-qlora.yaml", hf_home=tmp_path / "empty")
    assert proc.returncode == 2
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("lightning_falcon: error: cannot download tiiuae/falcon-7b-instruct")
    assert "run prefetch where the Hub is reachable" in error


def test_prepare_offline_script_checks_with_the_network_off(tmp_path):
    proc = run(
        tmp_path,
        "bash",
        str(REPO / "slurm/prepare-offline.sh"),
        str(REPO / "configs/tiny.yaml"),
        "--data.cache_dir",
        str(tmp_path / "cache"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[prefetch] checked offline" in proc.stdout
    missing = run(tmp_path, "bash", str(REPO / "slurm/prepare-offline.sh"), "nope.yaml")
    assert missing.returncode == 2 and "config file 'nope.yaml' not found" in missing.stderr

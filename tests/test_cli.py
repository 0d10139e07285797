"""End to end through `python -m lightning_falcon` on the tiny default: train, resume, evaluate, predict."""

import itertools
import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from helpers import adapter_changes_the_model, cli, scalars
from processes import run_process

pytestmark = pytest.mark.slow


def test_fit_logs_the_model_report(fitted):
    _, _, proc = fitted
    assert "quantized linear layers: 8" in proc.stdout + proc.stderr


def test_fit_writes_config_and_scalars_and_the_loss_falls(fitted):
    _, run, _ = fitted
    assert (run / "config.yaml").is_file()
    s = scalars(run)
    for tag in ("train/loss", "val/loss", "val/perplexity", "train/lr", "train/grad_norm", "train/tokens_per_sec"):
        assert s.get(tag), f"no {tag} in {sorted(s)}"
    val = [v for _, v in s["val/loss"]]
    assert val[-1] < val[0] - 1.0, val
    assert s["train/loss"][-1][1] < s["train/loss"][0][1] - 3.0
    assert math.isclose(s["val/perplexity"][-1][1], math.exp(val[-1]), rel_tol=1e-4)
    assert all(v > 0 for _, v in s["train/tokens_per_sec"])
    # Train scalars are computed only on the steps Lightning writes (log_every_n_steps: 5), all of them there.
    steps = [step for step, _ in s["train/loss"]]
    assert len(steps) == 100 and all(b - a == 5 for a, b in itertools.pairwise(steps)), steps
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_sec", "train/tokens"):
        assert [step for step, _ in s[tag]] == steps, tag
    assert s["model/quantized_layers"][0][1] == 8


def test_checkpoints_hold_only_lora_weights(fitted):
    _, run, _ = fitted
    ckpts = sorted((run / "checkpoints").glob("*.ckpt"))
    assert {p.name for p in ckpts} == {
        "last.ckpt",
        "step=100.ckpt",
        "step=200.ckpt",
        "step=300.ckpt",
        "step=400.ckpt",
        "step=500.ckpt",
    }
    for path in ckpts:
        state = torch.load(path, map_location="cpu", weights_only=False)
        assert state["state_dict"] and all(".lora_A." in k or ".lora_B." in k for k in state["state_dict"]), path
        assert "optimizer_states" in state and "lr_schedulers" in state and "loops" in state
        # the frozen base (1 MB on disk in bf16) is absent: LoRA weights + their Adam states only
        assert path.stat().st_size < 1_000_000


def test_adapter_loads_onto_the_base_with_peft(fitted):
    _, run, _ = fitted
    assert (run / "adapter" / "adapter_config.json").is_file()
    adapter_changes_the_model(run / "adapter")


def test_resume_continues_from_the_saved_step_in_a_new_version(fitted):
    root, run, _ = fitted
    proc = cli(root, "fit", "--ckpt_path", "last", "--trainer.max_steps", "520")
    assert f"--ckpt_path last -> {run / 'checkpoints' / 'last.ckpt'}" in proc.stdout + proc.stderr
    resumed = root / "runs" / "tiny" / "version_1"
    steps = [step for step, _ in scalars(resumed)["train/loss"]]
    assert min(steps) > 500 and max(steps) == 519
    last = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 520


def test_a_named_run_resumes_only_from_its_own_checkpoint(fitted):
    # A requeued Slurm job runs `fit --ckpt_path last` with its logger version pinned to slurm-<jobid>.
    root, run, _ = fitted
    named = ["--trainer.logger.init_args.version", "slurm-31", "--checkpoint.every_n_train_steps", "2"]
    proc = cli(root, "fit", "--ckpt_path", "last", "--trainer.max_steps", "2", *named)
    # Nothing of its own yet: it starts at step 0 rather than from another run's last.ckpt.
    assert "--ckpt_path last: no checkpoint found for this run; starting from scratch" in proc.stderr
    own = root / "runs" / "tiny" / "slurm-31" / "checkpoints" / "last.ckpt"
    os.utime(run / "checkpoints" / "last.ckpt")  # another run's, now the newest, and still not taken
    proc = cli(root, "fit", "--ckpt_path", "last", "--trainer.max_steps", "4", *named)
    assert f"--ckpt_path last -> {own}" in proc.stdout + proc.stderr
    assert torch.load(own, map_location="cpu", weights_only=False)["global_step"] == 4


def test_validate_test_and_predict_from_a_checkpoint(fitted):
    root, run, _ = fitted
    ckpt = str(run / "checkpoints" / "step=500.ckpt")
    out = cli(root, "validate", "--ckpt_path", ckpt).stdout
    assert "val/loss" in out
    out = cli(root, "test", "--ckpt_path", ckpt).stdout
    assert "test/perplexity" in out
    out = root / "held-out.jsonl"
    cli(root, "predict", "--ckpt_path", ckpt, "--generation.output", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # the held-out prompts as the user wrote them (the template is applied, not echoed)
    assert len(rows) == 36 and all(r["input"] and "### Instruction:" not in r["input"] for r in rows)
    assert sum("--ar" in r["output"] for r in rows) > len(rows) // 2  # it learned the prompt format


def test_console_script_is_installed():
    script = shutil.which("lightning-falcon") or str(Path(sys.executable).with_name("lightning-falcon"))
    proc = run_process([script, "fit", "--help"], timeout=120)
    assert proc.returncode == 0 and "--model.model_name_or_path" in proc.stdout

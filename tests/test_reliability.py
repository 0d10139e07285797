"""Crashes lose nothing: atomic checkpoint writes, and a NaN stops the run without a poisoned checkpoint."""

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, cli, restored_process_state, tiny_arguments
from processes import run_process

from lightning_falcon.files import swap_in_directory
from lightning_falcon.runs import find_last
from lightning_falcon.training.checkpoint_io import AtomicCheckpointIO

# The child saves through the real class; its torch.save writes part of the file and then the process
# is killed (SIGKILL, as the OOM killer or a node failure would), at that exact point of the write.
KILLED_DURING_SAVE = """
import os, signal, sys, torch
from lightning_falcon.training.checkpoint_io import AtomicCheckpointIO

def write_half_then_die(obj, f):
    f.write(b"PK" + b"\\0" * 100_000)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = write_half_then_die
AtomicCheckpointIO().save_checkpoint({"global_step": 20}, sys.argv[1])
"""


def test_a_process_killed_while_saving_leaves_the_previous_checkpoint_whole(tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 10, "state_dict": {"w": torch.ones(3)}}, last)
    proc = run_process([sys.executable, "-c", KILLED_DURING_SAVE, str(last)], timeout=120)
    assert proc.returncode == -9, proc.stderr  # it really died mid-write
    assert torch.load(last, weights_only=True)["global_step"] == 10
    assert find_last([last.parent]) == last  # the torn temporary file is not a candidate for --ckpt_path last


KILLED_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
from lightning_falcon import files

calls = []
real_replace = os.replace

def replace_then_die(src, dst):
    calls.append(src)
    if len(calls) == 2:  # the old directory is moved aside; the new one is not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)

files.os.replace = replace_then_die
files.swap_in_directory(Path(sys.argv[1]), Path(sys.argv[2]), "step20")
"""


def test_a_sharded_checkpoint_swapped_in_whole_or_found_under_its_old_name(tmp_path):
    def shards(directory: Path, step: int) -> Path:
        (directory / "checkpoint").mkdir(parents=True)
        (directory / "checkpoint" / "rank0.pt").write_text(str(step))
        return directory

    last = shards(tmp_path / "last.ckpt", 10)
    swap_in_directory(shards(tmp_path / ".last.ckpt.tmp-step20", 20), last, "step20")
    assert (last / "checkpoint" / "rank0.pt").read_text() == "20" and sorted(os.listdir(tmp_path)) == ["last.ckpt"]

    staged = shards(tmp_path / ".last.ckpt.tmp-step30", 30)
    proc = run_process([sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(staged), str(last)], timeout=120)
    assert proc.returncode == -9, proc.stderr
    # No last.ckpt at this instant, but the previous one, complete, is what `--ckpt_path last` resumes from.
    found = find_last([tmp_path])
    assert found == tmp_path / "last.old-step20.ckpt" and (found / "checkpoint" / "rank0.pt").read_text() == "20"


def test_fit_saves_through_the_atomic_writer(tmp_path):
    from lightning_falcon import FalconQLoRA, PromptDataModule
    from lightning_falcon.commands.cli import FalconCLI

    with restored_process_state():
        cli = FalconCLI(
            FalconQLoRA, PromptDataModule, args=tiny_arguments(tmp_path, "fit")[1:], run=False,
        )  # fmt: skip
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


@pytest.mark.slow
def test_a_run_that_blows_up_stops_with_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    # A learning rate ramping to 20 without clipping blows the tiny model up a step after step 4 (seeded, CPU).
    # Which turns non-finite first, the loss or the gradient norm, depends on the attention kernel's rounding.
    command = [
        sys.executable, "-m", "lightning_falcon", *tiny_arguments(tmp_path, "fit"),
        "--model.learning_rate", "20", "--model.warmup_steps", "40", "--trainer.gradient_clip_val", "null",
        "--trainer.max_steps", "60", "--checkpoint.every_n_train_steps", "4",
    ]  # fmt: skip
    proc = run_process(command, cwd=tmp_path)
    err = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    found = re.match(
        r"lightning_falcon: error: (loss|gradient norm) is not finite \(this rank: (nan|inf)\) at step (\d+) ", err
    )
    assert found, err
    step = int(found.group(3))
    assert 4 < step < 8, err  # it blows up after step 4's checkpoint and before step 8's
    checkpoints = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints"
    assert f"Last good checkpoint: {checkpoints / 'last.ckpt'} (step 4)" in err
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step=4.ckpt"]
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4 and all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert not (tmp_path / "runs" / "tiny" / "version_0" / "adapter").exists()  # no adapter from a failed run


@pytest.mark.slow
@pytest.mark.parametrize(
    "accumulate, micro_batch, config, batching, optimizer, model",
    [
        (1, 0, "tiny.yaml", None, "adamw", None),
        (2, 1, "tiny.yaml", None, "adamw", None),
        (1, 0, "tiny-mix.yaml", None, "adamw", None),
        (1, 0, "tiny-mix.yaml", "packed", "adamw", None),
        (1, 0, "tiny.yaml", None, "paged_adamw_8bit", None),  # the shipped GPU configs' optimizer (unpaged on CPU)
        (1, 0, "tiny-chat-mix", None, "adamw", None),  # messages rows (several turns, system prompts) beside pairs
        (1, 0, "tiny.yaml", None, "adamw", "asset:tiny-falcon3"),  # the other families (architectures.py)
        (1, 0, "tiny.yaml", None, "adamw", "asset:tiny-falcon-h1"),
    ],
    ids=[
        "step",
        "inside-accumulation-window",
        "mixed",
        "mixed-packed",
        "paged-8bit-adamw",
        "mixed-chat",
        "falcon3",
        "falcon-h1",
    ],
)
def test_killed_mid_epoch_and_resumed_ends_exactly_where_the_uninterrupted_run_ends(
    tmp_path, accumulate, micro_batch, config, batching, optimizer, model
):
    # 90 training rows in batches of 8: 12 batches an epoch, so the kill falls mid-epoch and the runs cross
    # epoch boundaries; dropout makes the generators matter; a validation falls between the kill and the end.
    # The mix (54 Midjourney rows and 24 guanaco rows, 3 : 1: 10 batches an epoch) draws another epoch after
    # the boundary at step 10.
    common = [
        "--data.max_samples", "100" if config == "tiny.yaml" else "60", "--model.lora_dropout", "0.1",
        "--trainer.max_steps", "14",
        "--trainer.accumulate_grad_batches", str(accumulate), "--checkpoint.every_n_train_steps", "4",
        "--trainer.val_check_interval", "6", "--generation.samples", "[]", "--model.optimizer", optimizer,
        *(["--data.batching", batching] if batching else []),
        *(["--model.model_name_or_path", model] if model else []),
    ]  # fmt: skip
    chat = config == "tiny-chat-mix"
    if chat:  # tiny-mix.yaml with the shipped chat sample in place of the guanaco turns
        config, overlay = "tiny-mix.yaml", tmp_path / "chat-mix.yaml"
        sources = yaml.safe_load((REPO / "configs" / config).read_text())["data"]["dataset"][:1]
        sources.append({"name": "chat", "dataset": "asset:data/guanaco-chat.jsonl", "val_fraction": 0.25})
        overlay.write_text(yaml.safe_dump({"data": {"dataset": sources}}))
        common += ["--config", str(overlay)]
    proc = killed_and_resumed(tmp_path, common, config, micro_batch)
    assert not chat or "[data] chat: format messages, from its column(s) messages" in proc.stderr


def killed_and_resumed(tmp_path: Path, common: list[str], config: str, micro_batch: int = 0):
    """Fit `config` with `common` uninterrupted, and again SIGKILLed at the start of step 6 (micro-batch
    `micro_batch`) and resumed from its last checkpoint (step 4): both must end with the same LoRA weights, to the
    bit. The resumed run's process."""
    from safetensors.torch import load_file

    env = {"PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    for root in (uninterrupted, interrupted):
        root.mkdir()
    cli(uninterrupted, "fit", *common, config=config)

    killer = ["--trainer.callbacks+=killer.SigkillAt", "--trainer.callbacks.init_args.step", "6"]
    killer += ["--trainer.callbacks.init_args.micro_batch", str(micro_batch)]
    proc = fit_process(interrupted, *common, *killer, env=env, config=config)
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL: nothing ran on the way out
    runs = Path(config).stem
    checkpoints = interrupted / "runs" / runs / "version_0" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 4
    proc = cli(interrupted, "fit", *common, "--ckpt_path", "last", config=config)
    assert "dataloader is not resumable" not in proc.stderr

    a = load_file(uninterrupted / "runs" / runs / "version_0" / "adapter" / "adapter_model.safetensors")
    b = load_file(interrupted / "runs" / runs / "version_1" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst == 0.0, f"largest difference of a LoRA weight, resumed vs uninterrupted: {worst:.3e}"
    return proc


@pytest.mark.slow
def test_a_dpo_run_from_an_sft_adapter_killed_and_resumed_ends_exactly_where_the_uninterrupted_run_ends(
    tmp_path, quick_fit
):
    # configs/tiny-dpo.yaml from the quick SFT run's adapter (also its frozen reference). 100 pairs in batches of
    # 8: 13 batches an epoch, so the runs cross an epoch boundary after the kill; LoRA dropout on the trained
    # adapter (none on the reference) makes the generators matter; a validation falls between kill and end.
    common = [
        "--model.adapter", str(quick_fit / "adapter"), "--data.max_samples", "100", "--model.lora_dropout", "0.1",
        "--trainer.max_steps", "14", "--checkpoint.every_n_train_steps", "4", "--trainer.val_check_interval", "6",
        "--generation.samples", "[]",
    ]  # fmt: skip
    killed_and_resumed(tmp_path, common, "tiny-dpo.yaml")


def fit_process(root: Path, *args: str, env: dict, config: str = "tiny.yaml") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "lightning_falcon", *tiny_arguments(root, "fit", *args, config=config)]
    return run_process(command, cwd=root, env={**os.environ, **env})


# ---------------------------------------------------------------------------------- a full disk
def small_disk(size: str, mount: Path, keep: Path, *command: str, env: dict | None = None):
    """Run `command` with a `size` tmpfs at `mount`, in a private mount namespace (no root needed), and copy
    what it left there to `keep`: the disk vanishes with the namespace."""
    if run_process(["unshare", "-rm", "true"], timeout=60).returncode != 0:
        pytest.skip("needs `unshare -rm` (user and mount namespaces) to mount a small disk")
    script = 'mount -t tmpfs -o size="$1" tmpfs "$2" || exit 99; m=$2; k=$3; shift 3; "$@"; rc=$?; '
    script += 'cp -a "$m/." "$k/"; exit $rc'
    mount.mkdir()
    keep.mkdir()
    command = ["unshare", "-rm", "sh", "-c", script, "sh", size, str(mount), str(keep), *command]
    return run_process(command, env={**os.environ, **(env or {})})


WRITE_PAST_THE_END = """
import sys, torch
from lightning_falcon.training.checkpoint_io import AtomicCheckpointIO, DiskFull

io, last = AtomicCheckpointIO(), sys.argv[1] + "/last.ckpt"
io.save_checkpoint({"global_step": 1, "w": torch.ones(100_000)}, last)  # 0.4 MB of the 1 MB disk
try:
    io.save_checkpoint({"global_step": 2, "w": torch.ones(200_000)}, last)  # 0.8 MB: no room beside the first
except DiskFull as e:
    print(e)
"""


def test_a_write_that_runs_out_of_space_removes_its_partial_file_and_keeps_the_last(tmp_path):
    disk, keep = tmp_path / "disk", tmp_path / "kept"
    proc = small_disk("1m", disk, keep, sys.executable, "-c", WRITE_PAST_THE_END, str(disk))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        f"the disk filled up while writing checkpoint {disk / 'last.ckpt'}; the partial file was removed" in proc.stdout
    )
    assert "the previous last.ckpt stays" in proc.stdout
    assert os.listdir(keep) == ["last.ckpt"]  # no torn temporary file left behind
    assert torch.load(keep / "last.ckpt", weights_only=True)["global_step"] == 1


def test_a_quota_error_inside_torch_save_is_reported_as_a_full_disk(tmp_path):
    from lightning_falcon.training.checkpoint_io import DiskFull, write_checkpoint

    last = tmp_path / "last.ckpt"
    last.write_bytes(b"the previous checkpoint")

    def over_quota(f):  # what torch.save raises when a write hits EDQUOT: a RuntimeError, the OSError its context
        f.write(b"partial")
        try:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")  # noqa: B904

    with pytest.raises(DiskFull, match="the disk filled up while writing checkpoint .*; the partial file was removed"):
        write_checkpoint(last, over_quota)
    assert os.listdir(tmp_path) == ["last.ckpt"] and last.read_bytes() == b"the previous checkpoint"


@pytest.mark.slow
def test_a_full_disk_stops_fit_before_a_write_and_keeps_the_last_good_checkpoint(tmp_path):
    # A tiny checkpoint is ~0.75 MB (LoRA weights + AdamW state): 4 MB holds step=5, last, step=10 and little more.
    disk, keep = tmp_path / "disk", tmp_path / "kept"
    command = [
        sys.executable, "-m", "lightning_falcon", *tiny_arguments(tmp_path, "fit"),
        "--checkpoint.dirpath", str(disk), "--checkpoint.every_n_train_steps", "5", "--trainer.max_steps", "100",
        "--generation.samples", "[]",
    ]  # fmt: skip
    proc = small_disk("4m", disk, keep, *command)
    err = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    found = re.match(
        rf"lightning_falcon: error: no room for a checkpoint in {disk}: it needs [\d.]+ MiB and [\d.]+ MiB is free; "
        rf"nothing was written, and the last good checkpoint stays: {disk}/((last|step=\d+)\.ckpt)\. Fix: ",
        err,
    )
    assert found, err
    named = torch.load(keep / found.group(1), weights_only=True)  # the checkpoint it names exists, whole
    assert named["global_step"] % 5 == 0
    assert not [name for name in os.listdir(keep) if ".tmp" in name]  # nothing partial
    last = torch.load(keep / "last.ckpt", weights_only=True)
    steps = sorted(torch.load(path, weights_only=True)["global_step"] for path in keep.glob("step=*.ckpt"))
    assert steps[:2] == [5, 10] and last["global_step"] in steps  # every file whole; the run stopped early
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_a_staged_directory_keeps_another_processs_whole_copy_and_refuses_a_partial_one(tmp_path):
    from lightning_falcon.files import staged_directory, umask

    whole = tmp_path / "whole"
    whole.mkdir()
    (whole / "stats.json").write_text("theirs")  # another node renamed its copy into place first
    with staged_directory(whole, complete="stats.json") as staged:
        (staged / "stats.json").write_text("ours")
    assert (whole / "stats.json").read_text() == "theirs" and os.listdir(tmp_path) == ["whole"]

    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "train").write_text("left by a crash")  # not a whole copy: no stats.json
    with pytest.raises(OSError), staged_directory(partial, complete="stats.json") as staged:
        (staged / "stats.json").write_text("ours")
    assert sorted(os.listdir(tmp_path)) == ["partial", "whole"]  # nothing staged left behind

    fresh = tmp_path / "fresh"
    with staged_directory(fresh, complete="stats.json") as staged:
        (staged / "stats.json").write_text("ours")
    assert (fresh / "stats.json").read_text() == "ours"
    assert fresh.stat().st_mode & 0o777 == 0o777 & ~umask()  # as the umask allows, not mkdtemp's 0700


@pytest.mark.parametrize("logger", ["configured", "true", "named"])
def test_ckpt_path_last_finds_the_runs_newest_last_checkpoint_for_any_logger(tmp_path, logger, monkeypatch):
    """`--ckpt_path last` is resolved from the config before the trainer exists, in the directories its logger
    writes: the shipped TensorBoard logger's, Lightning's default one (`logger: true`), or a pinned version's only."""
    from lightning_falcon import FalconQLoRA, PromptDataModule
    from lightning_falcon.commands.chat import ChatCLI  # a CLI with --ckpt_path that builds without running

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    runs = {"configured": tmp_path / "runs" / "tiny", "true": tmp_path / "lightning_logs", "named": tmp_path / "runs"}
    root = runs[logger]
    for version in ("version_0", "version_1", "mine"):
        (root / version / "checkpoints").mkdir(parents=True)
        (root / version / "checkpoints" / "last.ckpt").write_bytes(b"")
    newest = root / "version_1" / "checkpoints" / "last.ckpt"
    os.utime(newest, (2e9, 2e9))  # the newest of the numbered versions
    extra = {
        "configured": [],
        "true": ["--trainer.logger", "true", "--trainer.default_root_dir", str(tmp_path)],
        "named": ["--trainer.logger.init_args.name", "", "--trainer.logger.init_args.version", "mine"],
    }[logger]
    args = [*tiny_arguments(tmp_path, "validate", *extra, "--ckpt_path", "last")[1:]]
    with restored_process_state():
        cli = ChatCLI(FalconQLoRA, PromptDataModule, args=args, run=False)
    expected = root / "mine" / "checkpoints" / "last.ckpt" if logger == "named" else newest
    assert cli.source == expected
    assert cli.model.hparams.adapter == str(expected)  # its LoRA weights, which the model loads itself

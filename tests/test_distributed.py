"""Several processes for real, on CPU: DDP (gloo) and DeepSpeed ZeRO-2/3 (gloo), end to end through the CLI.

DeepSpeed runs through `cpu_deepspeed.CPUDeepSpeedStrategy`: the shipped `QLoRADeepSpeedStrategy` with
only Lightning's CUDA gate removed (see that file). The GPU versions are in test_gpu.py.
"""

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from helpers import REPO, adapter_changes_the_model, cli, sample_texts, scalars

pytestmark = pytest.mark.slow

TWO_RANKS = ["--trainer.devices", "2", "--trainer.log_every_n_steps", "1"]
PAGED_8BIT_ADAMW = ["--model.optimizer", "paged_adamw_8bit"]
CPU_DEEPSPEED = {
    "DS_ACCELERATOR": "cpu",
    "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
}


def overlay(name: str) -> list[str]:
    return ["--config", str(REPO / "configs" / "strategy" / f"{name}.yaml")]


def output(proc) -> str:
    return proc.stdout + proc.stderr


def train_split_tokens(cache: Path) -> int:
    from datasets import load_from_disk

    (train,) = cache.glob("tokenized/*/train")
    return sum(len(ids) for ids in load_from_disk(str(train))["input_ids"])


def assert_one_adapter_that_changes_the_model(root: Path) -> Path:
    from safetensors.torch import load_file

    adapters = list(root.rglob("adapter_model.safetensors"))
    assert len(adapters) == 1, adapters
    weights = load_file(adapters[0])
    assert weights and all(t.numel() > 0 and t.dim() == 2 for t in weights.values())  # never an empty adapter
    assert any(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)  # lora_B starts at 0: it trained
    adapter_changes_the_model(adapters[0].parent)
    return adapters[0].parent


def test_ddp_two_processes_one_adapter_identical_ranks_global_tokens_and_resume(tmp_path):
    # 324 training rows over 2 ranks x batch 8 is 21 steps: one epoch, no row repeated or skipped.
    # The shipped GPU configs' optimizer, bitsandbytes' 8-bit AdamW (unpaged on CPU), saves and resumes.
    ddp = [*overlay("ddp"), *TWO_RANKS, *PAGED_8BIT_ADAMW, "--checkpoint.every_n_train_steps", "10"]
    proc = cli(tmp_path, "fit", *ddp, "--trainer.max_steps", "21")
    out = output(proc)
    assert "[adapter] LoRA weights identical on all 2 ranks" in out
    assert "terminate called" not in out  # no rank aborted at exit (its process group is destroyed first)
    assert out.count("[data] train:") == 1  # tokenized once per node, by local rank 0
    (run,) = (tmp_path / "runs" / "tiny").iterdir()  # one log directory: only rank 0 logs
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert assert_one_adapter_that_changes_the_model(tmp_path) == run / "adapter"
    s = scalars(run)
    # The token count is global: both ranks' real tokens, which together are the whole training split.
    assert s["train/tokens"][-1] == (20, float(train_split_tokens(tmp_path / "cache")))
    assert all(v > 0 for _, v in s["train/tokens_per_sec"])
    assert_samples_logged(run)

    proc = cli(tmp_path, "fit", *ddp, "--trainer.max_steps", "25", "--ckpt_path", "last")
    assert_resumed(proc, tmp_path / "runs" / "tiny", 20, 25)  # from step=20, the last saved


def assert_resumed(proc, runs: Path, start: int, end: int) -> None:
    """The second run restored the first's last checkpoint (optimizer state included) and trained on from it."""
    assert "Restored all states" in output(proc)
    steps = [step for step, _ in scalars(runs / "version_1")["train/loss"]]
    assert min(steps) == start and max(steps) == end - 1


def assert_samples_logged(run: Path) -> None:
    """Every rank generated the samples (ZeRO-3 needs all of them in each forward), and rank 0 logged them."""
    table = sample_texts(run)[0]  # the sanity check's; these runs end before a later validation
    assert table.count("| EOS |") + table.count("| cut |") == 3, table


def deepspeed_arguments(stage: str) -> list[str]:
    """The shipped DeepSpeed overlay on 2 CPU processes, as the GPU configs run it (8-bit AdamW, checkpointing)."""
    return [
        *overlay(stage), "--trainer.strategy.class_path", "cpu_deepspeed.CPUDeepSpeedStrategy", *TWO_RANKS,
        *PAGED_8BIT_ADAMW, "--model.gradient_checkpointing", "true",
    ]  # fmt: skip


def deepspeed_fit(root: Path, stage: str, *args: str):
    every = ["--checkpoint.every_n_train_steps", "10"]
    return cli(root, "fit", *deepspeed_arguments(stage), *every, *args, env=CPU_DEEPSPEED)


def test_zero3_shards_the_4bit_base_saves_a_full_adapter_and_resumes(tmp_path):
    # As the shipped GPU configs run it: bf16, gradient checkpointing (which deepspeed before 0.19.3 breaks
    # under ZeRO-3 with frozen parameters: a CheckpointError in backward) and 8-bit AdamW.
    bf16 = ["--trainer.precision", "bf16-mixed", "--model.compute_dtype", "bf16"]
    # Small loss chunks: the ranks' batches are padded to different widths, so they need different numbers of
    # chunks; each chunk gathers the output layer, and every rank must make as many calls (else gloo's
    # "collective mismatch").
    bf16 += ["--model.loss_chunk_size", "16"]
    proc = deepspeed_fit(tmp_path, "deepspeed-zero3", *bf16, "--trainer.max_steps", "20")
    out = output(proc)
    # Each rank holds half of the 4-bit storage: the tiny model's 344,064 weights packed into 172,032 bytes,
    # stored in bf16 (DeepSpeed partitions only its own dtype) as 86,016 elements. The base is sharded.
    assert "[shards] rank 0: 4-bit storage 43008 of 86016 elements" in out
    assert "[shards] rank 1: 4-bit storage 43008 of 86016 elements" in out
    assert "[adapter] LoRA weights identical on all 2 ranks" in out
    assert_one_adapter_that_changes_the_model(tmp_path)

    run = tmp_path / "runs" / "tiny" / "version_0"
    assert_samples_logged(run)
    last = run / "checkpoints" / "last.ckpt"
    shards = sorted(last.glob("checkpoint/*model_states.pt"))
    assert len(shards) == 2  # one per rank
    for shard in shards:
        state = torch.load(shard, map_location="cpu", weights_only=False)
        # Only LoRA weights: no frozen parameter, no bitsandbytes quantization constant, no tied lm_head.
        assert state["module"] and all(".lora_A." in k or ".lora_B." in k for k in state["module"]), shard
    assert sum(f.stat().st_size for f in last.rglob("*") if f.is_file()) < 1_000_000

    proc = deepspeed_fit(tmp_path, "deepspeed-zero3", *bf16, "--trainer.max_steps", "30", "--ckpt_path", "last")
    assert f"--ckpt_path last -> {last}" in output(proc)
    assert_resumed(proc, tmp_path / "runs" / "tiny", 20, 30)
    assert (tmp_path / "runs" / "tiny" / "version_1" / "checkpoints" / "step=30.ckpt").is_dir()


def test_zero2_two_processes_saves_one_adapter_and_resumes(tmp_path):
    proc = deepspeed_fit(tmp_path, "deepspeed-zero2", "--trainer.max_steps", "10")
    out = output(proc)
    shards = re.findall(r"\[shards\] rank \d: 4-bit storage (\d+) of (\d+) elements", out)
    assert len(shards) == 2 and all(local == full for local, full in shards)  # stage 2 keeps the base whole
    assert "[adapter] LoRA weights identical on all 2 ranks" in out
    assert_one_adapter_that_changes_the_model(tmp_path)
    proc = deepspeed_fit(tmp_path, "deepspeed-zero2", "--trainer.max_steps", "14", "--ckpt_path", "last")
    assert_resumed(proc, tmp_path / "runs" / "tiny", 10, 14)


# ---------------------------------------------------------------------------------- DPO from an SFT adapter
def checkpoint_weight_names(last: Path) -> set[str]:
    """The weights a checkpoint holds: its state_dict's, or under DeepSpeed its model-states files' (ZeRO-2 writes
    one, ZeRO-3 one per rank)."""
    if last.is_file():
        return set(torch.load(last, map_location="cpu", weights_only=True)["state_dict"])
    shards = sorted(last.glob("checkpoint/*model_states.pt"))
    assert shards, list(last.rglob("*"))
    return {k for shard in shards for k in torch.load(shard, map_location="cpu", weights_only=False)["module"]}


# (arguments, environment, whether the reference's log-probabilities are computed once before the first step)
DPO_STRATEGIES = {
    "ddp": ([*overlay("ddp"), *TWO_RANKS, *PAGED_8BIT_ADAMW], None, False),
    "zero2": (deepspeed_arguments("deepspeed-zero2"), CPU_DEEPSPEED, False),
    "zero3": (deepspeed_arguments("deepspeed-zero3"), CPU_DEEPSPEED, False),
    "zero3, precomputed reference": (deepspeed_arguments("deepspeed-zero3"), CPU_DEEPSPEED, True),
}


@pytest.mark.parametrize("strategy", DPO_STRATEGIES)
def test_dpo_from_an_sft_adapter_two_processes_one_identical_adapter_and_resume(tmp_path, quick_fit, strategy):
    """configs/tiny-dpo.yaml on 2 processes, from the quick SFT run's adapter, which is also kept as the frozen
    `reference` adapter: switching to it for the reference forward (which flips requires_grad on the LoRA weights,
    partitioned under ZeRO-3) leaves one trained adapter, the same on every rank, that saves and resumes."""
    from safetensors.torch import load_file

    sft = quick_fit / "adapter"
    arguments, env, precompute = DPO_STRATEGIES[strategy]
    # 4 pairs a rank (8 sequences); a checkpoint at steps 3 and 6, and a validation of the 40 pairs at step 6.
    # The reference forward runs on every batch, or once for every pair before the first step (every rank takes
    # part: under ZeRO-3 each forward gathers the partitioned weights), and without dropout (the step-0 check below).
    dpo = [
        *arguments, "--model.adapter", str(sft), "--data.batch_size", "4", "--generation.samples", "[]",
        "--checkpoint.every_n_train_steps", "3", "--trainer.val_check_interval", "6", "--model.lora_dropout", "0.0",
        "--model.precompute_reference", str(precompute).lower(),
    ]  # fmt: skip
    proc = cli(tmp_path, "fit", *dpo, "--trainer.max_steps", "6", env=env, config="tiny-dpo.yaml")
    out = output(proc)
    assert "[adapter] LoRA weights identical on all 2 ranks" in out
    assert "terminate called" not in out
    assert out.count("[data] train:") == 1
    assert ("[reference] log-probabilities of 340 pairs computed once" in out) == precompute
    runs = tmp_path / "runs" / "tiny-dpo"
    (run,) = runs.iterdir()
    adapter = assert_one_adapter_that_changes_the_model(tmp_path)
    assert adapter == run / "adapter"
    # The trained adapter only: neither a `reference/` subdirectory nor a reference weight in it.
    assert not (adapter / "reference").exists()
    trained, started = load_file(adapter / "adapter_model.safetensors"), load_file(sft / "adapter_model.safetensors")
    assert trained.keys() == started.keys()
    assert any(not torch.equal(trained[k], started[k]) for k in trained)  # DPO moved it off the SFT adapter
    metadata = json.loads((adapter / "lightning_falcon.json").read_text())
    assert metadata["objective"] == "dpo" and metadata["reference"] == str(sft)

    s = scalars(run)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert [step for step, _ in s[f"train/{name}"]] == list(range(6)), name
        assert f"val/{name}" in s, name
    assert "train/perplexity" not in s and "val/perplexity" not in s
    # The checkpoint holds the trained LoRA weights only: the reference is rebuilt from model.adapter on resume.
    names = checkpoint_weight_names(run / "checkpoints" / "last.ckpt")
    assert names and all(".lora_A.default." in k or ".lora_B.default." in k for k in names), names
    # At step 0 the policy is its reference (the same SFT weights, no dropout): every pair's log-ratio is 0, so
    # the loss is log 2. Were the reference the base, or a copy lost to partitioning, it would not be.
    assert s["train/loss"][0][1] == pytest.approx(math.log(2), abs=1e-4)
    assert s["train/rewards/margins"][0][1] == pytest.approx(0.0, abs=1e-4)

    proc = cli(
        tmp_path, "fit", *dpo, "--trainer.max_steps", "8", "--ckpt_path", "last", env=env, config="tiny-dpo.yaml"
    )
    assert "[adapter] LoRA weights identical on all 2 ranks" in output(proc)
    assert ("[reference] log-probabilities of every pair read from" in output(proc)) == precompute
    assert_resumed(proc, runs, 6, 8)
    resumed = runs / "version_1" / "adapter"
    assert not (resumed / "reference").exists()
    assert load_file(resumed / "adapter_model.safetensors").keys() == started.keys()

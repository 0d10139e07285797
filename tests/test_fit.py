"""The fast tier's end-to-end check: the tiny default trained through the CLI in this process, with what it writes."""

import torch
from conftest import adapter_changes_the_model, fit_in_process, sample_texts, scalars


def test_fit_writes_config_scalars_lora_only_checkpoints_and_an_adapter(quick_fit):
    run = quick_fit
    assert (run / "config.yaml").is_file()
    s = scalars(run)
    assert [step for step, _ in s["train/loss"]] == list(range(10))
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_sec", "train/tokens"):
        assert len(s[tag]) == 10, tag
    assert [step for step, _ in s["val/loss"]] == [4, 9] and "val/perplexity" in s
    assert s["model/quantized_layers"] == [(0, 8.0)]  # the 4-bit base: every targeted layer quantized
    assert len(sample_texts(run)) == 3  # the sanity check's samples, then each validation's

    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step=10.ckpt", "step=5.ckpt"]
    state = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert state["global_step"] == 10
    assert state["state_dict"] and all(".lora_A." in k or ".lora_B." in k for k in state["state_dict"])
    adapter_changes_the_model(run / "adapter")


def test_a_distributed_fit_leaves_no_process_group_behind(tmp_path):
    # Left alive, gloo's threads can abort the process at exit, and Slurm marks the finished job FAILED.
    import torch.distributed as dist

    fit_in_process(
        tmp_path, "--trainer.strategy", "ddp", "--trainer.devices", "1", "--trainer.max_steps", "2",
        "--trainer.limit_val_batches", "0", "--generation.samples", "[]",
    )  # fmt: skip
    assert (tmp_path / "runs" / "tiny" / "version_0" / "adapter" / "adapter_model.safetensors").is_file()
    assert not dist.is_initialized()


"""The fast tier's end-to-end check: the tiny default trained through the CLI in this process, with what it writes."""

import torch
from conftest import adapter_changes_the_model, sample_texts, scalars


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


"""The README's preference path, end to end: SFT with `configs/tiny.yaml`, then DPO with `configs/tiny-dpo.yaml`
from its adapter, then evaluate (real processes); and ORPO from the base (in this process). The shipped data and
configs."""

import json
import math

import pytest
from helpers import cli, fit_in_process, scalars

from lightning_falcon.model.module import FalconQLoRA

pytestmark = pytest.mark.slow


def test_sft_then_dpo_prefers_the_chosen_answers_it_never_saw(tmp_path):
    cli(tmp_path, "fit")
    sft = tmp_path / "runs" / "tiny" / "version_0" / "adapter"
    cli(tmp_path, "fit", "--model.adapter", str(sft), config="tiny-dpo.yaml")
    run = tmp_path / "runs" / "tiny-dpo" / "version_0"
    logged = scalars(run)
    # the 40 held-out pairs (requests not among the 300 trained on): the reward accuracy against the SFT reference
    assert logged["val/rewards/accuracies"][-1][1] >= 0.8, logged["val/rewards/accuracies"]
    assert logged["val/loss"][-1][1] < logged["val/loss"][0][1] < math.log(2)
    assert {f"train/{name}" for name in ("rewards/chosen", "rewards/margins", "logps/rejected")} <= set(logged)
    metadata = json.loads((run / "adapter" / "lightning_falcon.json").read_text())
    assert metadata["objective"] == "dpo" and metadata["reference"] == str(sft)
    assert not (run / "adapter" / "reference").exists()  # the frozen reference is the SFT adapter, not saved again

    cli(tmp_path, "evaluate", "--ckpt_path", str(run / "adapter"), config="tiny-dpo.yaml")
    report = json.loads((run / "evaluation.json").read_text())
    base, tuned = report["base"], report["fine-tuned"]
    assert tuned["preference_accuracy"] > 0.6 > base["preference_accuracy"]
    assert tuned["preference_margin"] > base["preference_margin"]
    assert "| preference accuracy (held-out pairs) |" in (run / "evaluation.md").read_text()


def test_orpo_from_the_base_needs_no_reference(tmp_path, monkeypatch):
    """In this process, so that the reference is seen never to be made or run: neither a frozen copy of an adapter
    nor a forward of the reference, at a step or beforehand."""

    def refused(*args, **kwargs):
        raise AssertionError("ORPO made or ran a reference model")

    monkeypatch.setattr(FalconQLoRA, "reference_logps", refused)
    monkeypatch.setattr("lightning_falcon.model.module.add_reference", refused)
    run = fit_in_process(
        tmp_path,
        "--model.adapter", "null", "--model.objective", "orpo", "--model.learning_rate", "5e-3",
        "--trainer.max_steps", "60", "--trainer.val_check_interval", "30",
        config="tiny-dpo.yaml",
    )  # fmt: skip
    saved = [path.name for path in (run / "adapter").iterdir()]
    assert "adapter_model.safetensors" in saved and "reference" not in saved
    logged = scalars(run)
    loss = [value for _, value in logged["train/loss"]]
    assert loss[-1] < 0.8 * loss[0]
    assert logged["val/preference/accuracy"][-1][1] > logged["val/preference/accuracy"][0][1]

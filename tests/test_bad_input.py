"""Bad input: one line naming the problem and its fix, a non-zero exit, and no weights loaded."""

import pytest
import torch
from conftest import MIDJOURNEY, write_jsonl

import lightning_falcon.module
import lightning_falcon.quantization
from lightning_falcon.cli import main


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the error")

    monkeypatch.setattr(lightning_falcon.module, "load_causal_lm", refuse)
    monkeypatch.setattr(lightning_falcon.quantization, "load_causal_lm", refuse)  # export's merge


def run(tmp_path, capsys, *args, subcommand="fit"):
    return fail(
        capsys,
        subcommand,
        "--config",
        "configs/tiny.yaml",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
        "--data.cache_dir",
        str(tmp_path / "cache"),
        *args,
    )


def fail(capsys, *argv):
    """Run the CLI in-process on bad input; return its one error line."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("lightning_falcon: error: ") and "Fix" in last, err
    return last


def test_missing_file(tmp_path, capsys):
    assert "dataset file not found" in run(tmp_path, capsys, "--data.dataset", str(tmp_path / "missing.jsonl"))


def test_unknown_dataset(tmp_path, capsys):
    assert "unknown dataset 'nobody/nothing'" in run(tmp_path, capsys, "--data.dataset", "nobody/nothing")


def test_missing_columns(tmp_path, capsys):
    err = run(tmp_path, capsys, "--data.dataset", write_jsonl(tmp_path / "d.jsonl", [{"q": "a", "a": "b"}] * 3))
    assert "lacks column(s) ['prompt', 'response']; it has ['q', 'a']" in err


def test_empty_dataset(tmp_path, capsys):
    (tmp_path / "e.jsonl").write_text("")
    assert "is empty" in run(tmp_path, capsys, "--data.dataset", str(tmp_path / "e.jsonl"))


def test_every_row_too_long(tmp_path, capsys):
    err = run(tmp_path, capsys, "--data.max_length", "8", "--data.dataset", MIDJOURNEY)
    assert "leaves no response token within data.max_length=8. Fix: raise --data.max_length" in err


def test_target_modules_the_model_lacks(tmp_path, capsys):
    err = run(tmp_path, capsys, "--model.target_modules", "[q_proj,v_proj]")
    assert "['q_proj', 'v_proj'] not found" in err and "query_key_value" in err


def test_missing_model_path(tmp_path, capsys):
    err = run(tmp_path, capsys, "--model.model_name_or_path", str(tmp_path / "no-model"))
    assert "model '" in err and "not found" in err


def test_missing_tokenizer_path(tmp_path, capsys):
    err = run(tmp_path, capsys, "--data.tokenizer", str(tmp_path / "no-tokenizer"))
    assert "tokenizer '" in err and "not found" in err


def test_directory_as_dataset(tmp_path, capsys):
    assert "is a directory" in run(tmp_path, capsys, "--data.dataset", str(tmp_path))


def strategy_overlay(name):
    return ["--config", f"configs/strategy/{name}.yaml", "--trainer.devices", "2"]


def test_int8_with_zero3_fails_with_the_reason(tmp_path, capsys):
    err = run(tmp_path, capsys, *strategy_overlay("deepspeed-zero3"), "--model.quantization", "int8")
    assert "int8 + ZeRO-3 cannot work" in err and "--model.quantization nf4" in err


def test_lightnings_own_zero3_is_refused_with_the_fix(tmp_path, capsys):
    err = run(tmp_path, capsys, "--trainer.devices", "2", "--trainer.strategy", "deepspeed_stage_3")
    assert "pytorch-lightning #19731" in err and "configs/strategy/deepspeed-zero3.yaml" in err
    assert "frozen base into every checkpoint" in err  # every problem is listed, not just the first


def test_paged_optimizer_with_offload_is_refused():
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from lightning_falcon.errors import ConfigError
    from lightning_falcon.strategy import QLoRADeepSpeedStrategy, check_strategy

    with pytest.raises(ConfigError, match="paged_adamw_8bit cannot run with DeepSpeed optimizer offload"):
        check_strategy(QLoRADeepSpeedStrategy(stage=3, offload_optimizer=True), "nf4", "paged_adamw_8bit")
    with pytest.raises(ConfigError, match="exclude_frozen_parameters"):
        check_strategy(DeepSpeedStrategy(stage=2), "nf4", "adamw")


# ---------------------------------------------------------------------------------- predict, evaluate, export
def lora_checkpoint(path, lora_r=16):
    """A checkpoint as fit writes it, as far as the LoRA check reads: the hyperparameters."""
    hparams = {"model_name_or_path": "asset:tiny-falcon", "lora_r": lora_r, "lora_alpha": 32, "target_modules": None}
    torch.save({"hyper_parameters": hparams, "state_dict": {}}, path)
    return str(path)


def test_checkpoint_with_other_lora_shapes(tmp_path, capsys):
    ckpt = lora_checkpoint(tmp_path / "r16.ckpt")
    err = run(tmp_path, capsys, "--ckpt_path", ckpt, "--model.lora_r", "8", subcommand="predict")
    assert "does not match the model config: it was trained with lora_r=16 (config: 8)" in err
    assert "Fix: pass --model.lora_r 16" in err


def test_adapter_directory_without_adapter_config(tmp_path, capsys):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    err = run(tmp_path, capsys, "--ckpt_path", str(tmp_path / "adapter"), subcommand="predict")
    assert "has no adapter_config.json, so it is not a PEFT adapter" in err
    err = fail(capsys, "export", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "out"))
    assert "has no adapter_config.json" in err and not (tmp_path / "out").exists()


def test_empty_input_file(tmp_path, capsys):
    ckpt = lora_checkpoint(tmp_path / "r16.ckpt")
    (tmp_path / "inputs.txt").write_text("\n  \n")
    args = ["--ckpt_path", ckpt, "--generation.input_file", str(tmp_path / "inputs.txt")]
    assert f"input file {tmp_path / 'inputs.txt'} is empty" in run(tmp_path, capsys, *args, subcommand="predict")


def test_push_to_hub_without_a_token(tmp_path, capsys, monkeypatch, fake_adapter):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    err = fail(capsys, "export", "--adapter", fake_adapter, "--output", str(tmp_path / "out"), "--push_to_hub", "me/x")
    assert "--push_to_hub needs a Hub token in the environment. Fix: export HF_TOKEN=" in err
    assert not (tmp_path / "out").exists()


def test_export_never_replaces_what_is_not_an_earlier_export(tmp_path, capsys, fake_adapter):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    common = ["export", "--adapter", fake_adapter, "--merge", "--merge_into", "original"]
    err = fail(capsys, *common, "--output", str(tmp_path / "out"))
    assert "exists and is not empty" in err
    err = fail(capsys, *common, "--output", str(tmp_path / "out"), "--overwrite")
    assert "is not an earlier export, so --overwrite will not replace it" in err
    # the run directory that holds the adapter (and its checkpoints) is never an output
    err = fail(capsys, *common, "--output", str(tmp_path), "--overwrite")
    assert "overlaps the adapter directory" in err
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me" and (tmp_path / "adapter").is_dir()


def test_merging_an_adapter_without_training_metadata_asks_how(tmp_path, capsys, fake_adapter):
    err = fail(capsys, "export", "--adapter", fake_adapter, "--output", str(tmp_path / "out"), "--merge")
    assert "has no lightning_falcon.json" in err and "Fix: --merge_into original" in err


def test_an_adapter_trained_on_another_base(tmp_path, capsys, fake_adapter):
    from safetensors.torch import save_file

    # falcon-7b's query_key_value takes 4544 inputs; the tiny model's takes 128
    key = "base_model.model.transformer.h.0.self_attention.query_key_value.lora_A.weight"
    save_file({key: torch.zeros(16, 4544)}, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    err = run(tmp_path, capsys, "--ckpt_path", fake_adapter, subcommand="predict")
    assert "has transformer.h.0.self_attention.query_key_value.lora_A of shape (16, 4544)" in err
    assert "does not fit the model's transformer.h.0.self_attention.query_key_value (128 -> 192)" in err


@pytest.fixture
def fake_adapter(tmp_path):
    """An adapter directory as far as the checks read: adapter_config.json (r 16, alpha 32, Falcon's targets)."""
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"r": 16, "lora_alpha": 32}')
    return str(tmp_path / "adapter")

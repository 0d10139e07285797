"""Bad input: one line naming the problem and its fix, a non-zero exit, and no weights loaded."""

import pytest
from conftest import MIDJOURNEY, write_jsonl

import lightning_falcon.module
from lightning_falcon.cli import main


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the error")

    monkeypatch.setattr(lightning_falcon.module, "load_causal_lm", refuse)


def run(tmp_path, capsys, *args):
    with pytest.raises(SystemExit) as e:
        main(
            [
                "fit",
                "--config",
                "configs/tiny.yaml",
                "--trainer.logger.init_args.save_dir",
                str(tmp_path / "runs"),
                "--data.cache_dir",
                str(tmp_path / "cache"),
                *args,
            ]
        )
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

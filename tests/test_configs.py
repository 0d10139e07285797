"""Every shipped config parses through the real CLI (no model is built), and opens with how to run it."""

from pathlib import Path

import pytest
import yaml

from lightning_falcon.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("**/*.yaml"))


def print_config(capsys, *args) -> dict:
    with pytest.raises(SystemExit) as e:
        main(["fit", *args, "--print_config"])
    assert e.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path, capsys):
    config = print_config(capsys, "--config", str(path))
    assert config["model"]["model_name_or_path"] and config["data"]["dataset"]
    assert config["trainer"]["max_steps"] > 0


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_opens_with_its_command_and_gpu_memory(path):
    header = path.read_text().split("\nseed_everything")[0]
    assert f"python -m lightning_falcon fit --config configs/{path.name}" in header
    assert "GPU memory:" in header


def test_overrides_and_composed_configs(tmp_path, capsys):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("model:\n  lora_r: 32\ntrainer:\n  max_steps: 7\n")
    config = print_config(
        capsys, "--config", str(REPO / "configs/tiny.yaml"), "--config", str(overlay), "--model.lora_r", "4"
    )
    assert config["model"]["lora_r"] == 4  # the command line wins over both files
    assert config["trainer"]["max_steps"] == 7  # the second file wins over the first
    assert config["data"]["dataset"] == "asset:data/midjourney.jsonl"


def test_help_shows_documented_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # help text is wrapped
    assert "Build the same architecture from its config.json with random weights" in out
    assert "Sequences are cut to this many tokens" in out

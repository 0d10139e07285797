"""Every shipped config parses through the real CLI (no model is built), and opens with how to run it."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from lightning_falcon.commands.main import main
from lightning_falcon.data.source import Source
from lightning_falcon.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
OVERLAYS = sorted((REPO / "configs" / "strategy").glob("*.yaml"))


def print_config(capsys, *args) -> dict:
    with pytest.raises(SystemExit) as e:
        main(["fit", *args, "--print_config"])
    assert e.value.code in (0, None)
    # DeepSpeed, imported for the strategy's class_path, logs one warning line to stdout on a CPU machine.
    out = "\n".join(line for line in capsys.readouterr().out.splitlines() if "[WARNING]" not in line)
    return yaml.safe_load(out)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path, capsys):
    config = print_config(capsys, "--config", str(path))
    assert config["model"]["model_name_or_path"] and config["data"]["dataset"]
    assert config["trainer"]["max_steps"] > 0


@pytest.mark.parametrize("path", CONFIGS + OVERLAYS, ids=lambda p: p.name)
def test_config_opens_with_its_command_and_per_gpu_memory(path):
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    name = path.relative_to(REPO / "configs")
    if path in OVERLAYS:  # composed as a second --config after a model config
        assert "python -m lightning_falcon fit --config configs/" in header and f"--config configs/{name}" in header
    else:
        assert f"python -m lightning_falcon fit --config configs/{name}" in header
    assert "Per-GPU memory:" in header or "GPU memory: none" in header


def build(*args):
    """Instantiate the CLI's trainer and model from configs, as `fit` would, without running anything."""
    from lightning_falcon import FalconQLoRA, PromptDataModule
    from lightning_falcon.commands.cli import FalconCLI

    return FalconCLI(FalconQLoRA, PromptDataModule, run=False, args=list(args))


@pytest.mark.parametrize("path", OVERLAYS, ids=lambda p: p.name)
def test_strategy_overlay_composes_and_constructs_its_strategy(path):
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_falcon.training.strategy import (
        QLoRADeepSpeedStrategy,
        StrategySettings,
        check_strategy_runs,
        strategy_problems,
        zero_stage,
    )

    cli = build("--config", str(REPO / "configs/tiny.yaml"), "--config", str(path), "--trainer.devices", "2")
    strategy = cli.trainer.strategy
    assert cli.model.hparams.model_name_or_path == "asset:tiny-falcon"  # the model config still holds
    if path.stem == "ddp":
        assert type(strategy) is DDPStrategy
    else:
        assert isinstance(strategy, QLoRADeepSpeedStrategy) and strategy.exclude_frozen_parameters
        assert zero_stage(strategy) == {"deepspeed-zero2": 2}.get(path.stem, 3)
        offload = strategy.config["zero_optimization"].get("offload_optimizer", {}).get("device")
        assert (offload == "cpu") == path.stem.endswith("offload")
    # plan reads from the config what fit reads from the strategy it built
    settings = StrategySettings.of(strategy)
    assert StrategySettings.from_config(cli.config.trainer.strategy) == settings
    assert strategy_problems(settings, "nf4", "adamw") == []  # a valid combination passes the config checks
    if path.stem != "ddp":  # tiny.yaml trains on CPU: DeepSpeed (as Lightning drives it) runs on CUDA only
        with pytest.raises(ConfigError) as e:
            check_strategy_runs(strategy)
        assert str(e.value).startswith("DeepSpeed runs on CUDA GPUs only") and str(e.value).count("Fix:") == 1


@pytest.mark.parametrize(
    "strategy",
    ["auto", "ddp", "deepspeed", "deepspeed_stage_2_offload", "deepspeed_stage_3", "deepspeed_stage_3_offload"],
)
def test_a_strategy_named_by_lightning_reads_the_same_from_the_config(strategy):
    from lightning_falcon.training.strategy import StrategySettings

    cli = build("--config", str(REPO / "configs/tiny.yaml"), "--trainer.strategy", strategy, "--trainer.devices", "2")
    assert StrategySettings.from_config(cli.config.trainer.strategy) == StrategySettings.of(cli.trainer.strategy)


def header_commands(path: Path) -> list[list[str]]:
    """The `python -m lightning_falcon` commands a config's header shows, as argument lists. An `sbatch` line
    becomes the fit its script runs (`slurm/fit.sbatch CONFIG ARGS` runs `fit --config CONFIG ARGS`)."""
    header = "\n".join(line[1:] for line in path.read_text().splitlines() if line.startswith("#"))
    commands = []
    for line in header.replace("\\\n", " ").splitlines():
        if line.split()[:3] == ["python", "-m", "lightning_falcon"]:
            commands.append(shlex.split(line, comments=True)[3:])
        elif line.split()[:1] == ["sbatch"]:
            words = shlex.split(line, comments=True)
            script = next(i for i, word in enumerate(words) if word.endswith(".sbatch"))
            commands.append(["fit", "--config", *words[script + 1 :]])
    return commands


# The commands that read a config and run fit's checks before loading (export reads an adapter, not a config).
CHECKED = {"fit", "validate", "test", "predict", "evaluate", "chat", "plan"}
HEADER_COMMANDS = [(path, words) for path in CONFIGS + OVERLAYS for words in header_commands(path)]
CHECKED_COMMANDS = [(path, words) for path, words in HEADER_COMMANDS if words[0] in CHECKED]


@pytest.mark.parametrize("path,words", CHECKED_COMMANDS, ids=[f"{p.name}: {' '.join(w)}" for p, w in CHECKED_COMMANDS])
def test_every_command_a_config_shows_passes_fits_config_checks(path, words, monkeypatch, capsys):
    """Parsed as plan parses (nothing built, no GPU) and put through fit's config checks, which plan runs too;
    the checks of the machine fit runs on are left out."""
    from lightning_falcon.commands.cli import SINGLE_DEVICE, parse_only
    from lightning_falcon.commands.plan import PlanCLI, report

    class HeaderCLI(PlanCLI):  # plan's options and those of the commands that read a run
        def add_arguments_to_parser(self, parser) -> None:
            super().add_arguments_to_parser(parser)
            parser.add_argument("--ckpt_path", type=str | None, default=None)

    command, args = words[0], words[1:]
    if command in ("predict", "evaluate", "chat"):  # one process on one device, whatever the config trains with
        args = [*args, *SINGLE_DEVICE]
    monkeypatch.chdir(REPO)
    config = parse_only(HeaderCLI, args, command).config
    report(config.model, config.data, config.trainer, config.devices, config.num_nodes, config.gpu_memory)


def test_the_headers_show_fit_plan_and_slurm_commands():
    commands = [words[0] for _, words in HEADER_COMMANDS]
    assert {"fit", "plan", "predict", "evaluate", "export"} <= set(commands) and commands.count("fit") > 10
    assert ["fit", "--config", "configs/falcon-40b-qlora.yaml"] in [words for _, words in HEADER_COMMANDS]


def test_falcon_40b_config_is_zero3_over_8_gpus_per_node():
    config = yaml.safe_load((REPO / "configs/falcon-40b-qlora.yaml").read_text())
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning_falcon.training.strategy.QLoRADeepSpeedStrategy"
    assert strategy["init_args"]["stage"] == 3 and config["trainer"]["devices"] == 8


def test_overrides_and_composed_configs(tmp_path, capsys):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("model:\n  lora_r: 32\ntrainer:\n  max_steps: 7\n")
    config = print_config(
        capsys, "--config", str(REPO / "configs/tiny.yaml"), "--config", str(overlay), "--model.lora_r", "4"
    )
    assert config["model"]["lora_r"] == 4  # the command line wins over both files
    assert config["trainer"]["max_steps"] == 7  # the second file wins over the first
    assert config["data"]["dataset"]["dataset"] == "asset:data/midjourney.jsonl"


def test_help_shows_documented_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # help text is wrapped
    assert "Build the same architecture from its config.json with random weights" in out
    assert "Sequences are cut to this many tokens" in out
    with pytest.raises(SystemExit):
        main(["fit", "--data.dataset.help", "Source"])  # a source's settings, from `Source`'s docstring
    out = " ".join(capsys.readouterr().out.split())
    assert "--data.dataset.prompt_column PROMPT_COLUMN Column holding the request" in out
    assert "(type: float, default: 0.1)" in out  # val_fraction's


@pytest.mark.parametrize(
    "dataset",
    [
        "asset:data/midjourney.jsonl",
        {"dataset": "asset:data/midjourney.jsonl"},
        ["asset:data/midjourney.jsonl"],
        [{"dataset": "asset:data/midjourney.jsonl", "format": "auto"}],  # a default written out
    ],
    ids=["name", "mapping", "list-of-a-name", "list-of-a-mapping"],
)
def test_a_source_alone_may_be_written_as_a_name_a_mapping_or_a_list_of_one(tmp_path, dataset):
    overlay = tmp_path / "data.yaml"
    overlay.write_text(yaml.safe_dump({"data": {"dataset": dataset}}))
    cli = build("--config", str(REPO / "configs/tiny.yaml"), "--config", str(overlay))
    (member,) = cli.datamodule.members
    assert member.source == Source("asset:data/midjourney.jsonl") and member.name == "midjourney"


def test_a_setting_of_the_source_is_set_from_the_command_line():
    cli = build(
        "--config", str(REPO / "configs/tiny.yaml"), "--data.dataset.dataset", "asset:data/guanaco-sample.jsonl",
        "--data.dataset.format", "turns",
    )  # fmt: skip
    (member,) = cli.datamodule.members
    assert member.source == Source("asset:data/guanaco-sample.jsonl", format="turns")  # tiny's settings kept


def header_figure(path: Path) -> tuple[float, int, int | None, list[str]] | None:
    """(GiB, GPUs per node, nodes where it names them, the arguments of the header's first fit or plan command) of
    a `Per-GPU memory: X GiB` line."""
    header = " ".join(line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#"))
    found = re.search(r"Per-GPU memory: [^.]*?(\d+\.\d) GiB ([^(]*?)per `", header)
    if found is None:
        return None
    count = re.search(r"(\d+) GPUs", found.group(2))
    nodes = re.search(r"x (\d+) nodes", found.group(2))
    model = re.search(r"for (falcon-[\w-]+)", found.group(2))  # an overlay names the model config it was planned on
    commands = [words for words in header_commands(path) if words[0] in ("fit", "plan")]
    if model:
        commands = [words for words in commands if f"configs/{model.group(1)}.yaml" in words]
    command = commands[0]
    return (
        float(found.group(1)),
        int(count.group(1)) if count else 1,
        int(nodes.group(1)) if nodes else None,
        command[1:],
    )


FIGURES = [(path, header_figure(path)) for path in CONFIGS + OVERLAYS if header_figure(path) is not None]


@pytest.mark.parametrize("path,figure", FIGURES, ids=[p.name for p, _ in FIGURES])
def test_a_headers_per_gpu_memory_is_what_plan_prints_for_its_command(path, figure, monkeypatch):
    """The figure a config states stays `plan`'s as the planner changes (for the strategy the config runs)."""
    from lightning_falcon.commands.cli import parse_only
    from lightning_falcon.commands.plan import PlanCLI, report

    gib, gpus, nodes, args = figure
    monkeypatch.chdir(REPO)
    shape = ["--devices", str(gpus), *(["--num_nodes", str(nodes)] if nodes else [])]
    config = parse_only(PlanCLI, [*args, *shape], "plan").config
    lines = report(config.model, config.data, config.trainer, config.devices, config.num_nodes, "80GB").splitlines()
    names = next(line for line in lines if line.startswith("per GPU, GiB")).split()[3:]
    totals = next(line for line in lines if line.startswith("total")).split()[1:]
    (planned,) = [float(total) for name, total in zip(names, totals, strict=False) if name.endswith("*")]
    assert round(planned, 1) == gib, f"{path.name} says {gib} GiB on {gpus} GPU(s); plan prints {planned:.2f}"


def test_every_model_config_plans_offline_from_a_shipped_architecture():
    """`plan` needs no Hub: each config's model is a shipped asset or a Hub id whose config.json ships."""
    from lightning_falcon.commands.plan import SHIPPED_CONFIGS

    for path in CONFIGS:
        name = yaml.safe_load(path.read_text())["model"]["model_name_or_path"]
        assert name.startswith("asset:") or name in SHIPPED_CONFIGS, path.name


def plan_lines(capsys, *args: str) -> list[str]:
    main(["plan", *args])
    return capsys.readouterr().out.splitlines()


def test_falcon_180b_config_is_zero3_across_nodes_and_plan_says_80gb_gpus_cannot_load_it(capsys, monkeypatch):
    config = yaml.safe_load((REPO / "configs/falcon-180b-qlora.yaml").read_text())
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning_falcon.training.strategy.QLoRADeepSpeedStrategy"
    assert strategy["init_args"]["stage"] == 3 and config["trainer"]["devices"] == 8
    assert ["fit", "--config", "configs/falcon-180b-qlora.yaml"] in header_commands(
        REPO / "configs/falcon-180b-qlora.yaml"
    )  # its sbatch line: slurm/fit-multinode.sbatch
    assert (
        "slurm/fit-multinode.sbatch configs/falcon-180b-qlora.yaml"
        in (REPO / "configs/falcon-180b-qlora.yaml").read_text()
    )
    monkeypatch.chdir(REPO)
    for nodes in ("1", "2", "16"):
        lines = plan_lines(capsys, "--config", "configs/falcon-180b-qlora.yaml", "--nodes", nodes)
        (verdict,) = [line for line in lines if line.startswith("nodes:")]
        assert verdict.startswith("nodes: no node count fits 80 GiB GPUs with deepspeed-zero3: the load peak"), verdict
        assert "the whole 4-bit base" in verdict
    lines = plan_lines(capsys, "--config", "configs/falcon-180b-qlora.yaml", "--gpu_memory", "141GB")
    (verdict,) = [line for line in lines if line.startswith("nodes:")]
    assert verdict.startswith("nodes: deepspeed-zero3 fits 141 GiB GPUs from 1 node(s) of 8 GPU(s)"), verdict


@pytest.mark.parametrize(
    "name,template",
    [
        ("falcon3-7b-qlora.yaml", "tokenizer"),
        ("falcon-h1-7b-qlora.yaml", "tokenizer"),
        ("falcon-11b-qlora.yaml", "instruction"),
    ],
)
def test_the_new_family_configs_train_every_default_target_with_their_template(name, template):
    from lightning_falcon.architectures import architecture
    from lightning_falcon.commands.plan import model_config

    config = yaml.safe_load((REPO / "configs" / name).read_text())
    family = architecture(model_config(config["model"]["model_name_or_path"], False)[0])
    assert config["model"]["target_modules"] == list(family.lora_targets)
    assert config["data"]["chat_template"] == template


def test_falcon_h1_config_does_not_pack_and_plan_refuses_packing_it(capsys, monkeypatch):
    config = yaml.safe_load((REPO / "configs/falcon-h1-7b-qlora.yaml").read_text())
    assert config["data"]["batching"] != "packed"
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as e:
        main(["plan", "--config", "configs/falcon-h1-7b-qlora.yaml", "--data.batching", "packed"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Mamba state would run on" in err and "Fix: --data.batching padded" in err

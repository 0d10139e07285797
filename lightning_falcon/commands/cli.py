"""The LightningCLI of lightning_falcon: its parser, its one-line errors, and the checks that run before any load.

`commands.main` runs it for `fit`, `validate`, `test` and `predict`; `evaluate` and the parse-only
subcommands (`plan`, `slurm-args`, `prefetch`) build on it.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.callbacks.progress import ProgressBar as LightningBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, instantiate_class
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_falcon.architectures import Architecture
from lightning_falcon.commands.program import program
from lightning_falcon.data import PromptDataModule
from lightning_falcon.data.source import moved
from lightning_falcon.errors import ConfigError
from lightning_falcon.model import FalconQLoRA, adapter
from lightning_falcon.model.generation import GenerationSettings
from lightning_falcon.model.lora import check_target_modules
from lightning_falcon.model.preference import PAIRED
from lightning_falcon.model.quantization import (
    ComputeDtype,
    check_bf16_is_native,
    check_quantization_runs,
    resolve_compute_dtype,
)
from lightning_falcon.runs import RunDir, find_last, is_deepspeed_checkpoint
from lightning_falcon.training import default_callbacks
from lightning_falcon.training.checkpoint_io import AtomicCheckpointIO
from lightning_falcon.training.progress import ProgressBar, ProgressLines
from lightning_falcon.training.strategy import StrategySettings, check_strategy_runs, strategy_problems
from lightning_falcon.upstream import (
    JSONARGPARSE_BAD_VALUE,
    JSONARGPARSE_GROUP,
    JSONARGPARSE_UNKNOWN_KEY,
    LIGHTNING_MACHINE_ERROR,
    default_logger,
    failing_parser,
    jsonargparse_recovers,
    parser_keys,
)

LOGGER = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "runs", "name": "default", "default_hp_metric": False},
}


def trainer_defaults() -> dict:
    """The trainer's defaults in every subcommand: TensorBoard and no Lightning model summary. The product's
    callbacks are added when the trainer is made (`FalconCLI.instantiate_trainer`), to any the config lists."""
    # Lightning's model summary counts a 4-bit weight as a parameter of the compute dtype: the module's own
    # `[model]` line (quantized layers, trainable of total, the real footprint) replaces it.
    return {"logger": LOGGER, "enable_model_summary": False}


class FalconArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, reporting a bad key or value in one line with its fix (not 100 lines of usage)."""

    def error(self, message: str, ex: Exception | None = None):
        if jsonargparse_recovers(self):
            super().error(message, ex)
        parser = failing_parser(self, ex)
        print(f"lightning_falcon: error: {explain_parse_error(message, parser)}", file=sys.stderr)
        sys.exit(2)


def explain_parse_error(message: str, parser) -> str:
    """jsonargparse's message as one line, with the nearest valid key for an unknown one."""
    # `PROGRAM [options] fit` for a subcommand, `PROGRAM` for the root, `PROGRAM plan` for ours
    name = parser.prog.replace(" [options]", "")
    words = name.removeprefix(program()).split() if name.startswith(program()) else name.split()[1:]
    help_command = f"`{' '.join([program(), *words[:1], '--help'])}`"
    found = next((m for m in (re.search(p, message) for p in JSONARGPARSE_UNKNOWN_KEY) if m), None)
    if found:
        key = found.group(1).lstrip("-").split("=")[0]
        group = re.search(JSONARGPARSE_GROUP, message)  # a key of a config file is named without its group
        key = f"{group.group(1)}.{key}" if group else key
        if moved(key):  # a data key of a config written before `Source`: where it sits now
            return moved(key)
        keys = parser_keys(parser)
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.8)
        fix = f"did you mean {close[0]}?" if close else "remove it."
        return f"unknown key {key}. Fix: {fix} {help_command} lists every key"
    found = re.match(JSONARGPARSE_BAD_VALUE, message, re.DOTALL)
    if found:
        key, problem = found.group(1), " ".join(found.group(2).split())
        return f"bad value for {key}: {problem}. Fix: correct {key} ({help_command} shows what it takes)"
    return f"{' '.join(message.split())}. Fix: see {help_command}"


class FalconCLI(LightningCLI):
    logs = True  # False: the subcommand writes no logger version (its output is its own file or its answers)

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("parser_class", FalconArgumentParser)
        kwargs.setdefault("trainer_defaults", trainer_defaults())
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # A `checkpoint:` section: LoRA-only checkpoints every N optimizer steps plus last.ckpt.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.filename": "step={step}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.every_n_train_steps": 100,
                "checkpoint.save_top_k": -1,
                "checkpoint.save_last": True,
            }
        )
        # A `generation:` section: settings and inputs of predict, evaluate and the samples logged during fit.
        # Each user is given its part at construction: the model decodes with the settings, the data module
        # reads predict's inputs, and the callbacks get theirs when the trainer is made.
        parser.add_class_arguments(GenerationSettings, "generation")
        parser.link_arguments("generation", "model.generation", apply_on="instantiate")
        parser.link_arguments("generation", "data.predict_inputs", compute_fn=predict_inputs, apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Keep the model config the user wrote, whatever `--ckpt_path` names (a library touch point: touch_points.py).

        Lightning 2.6 replaces the model section with a checkpoint file's hyperparameters, silently
        dropping the user's `--model.*` overrides, and only when the path is a file (not `last`, not an
        adapter). Here a checkpoint that cannot fit the configured model fails instead, in one line
        naming the differing keys (`check_run`).
        """

    def _section(self, config):
        """The running subcommand's part of a parsed config (the whole config when there is no subcommand)."""
        return config[self.subcommand] if self.subcommand else config

    def instantiate_trainer(self, **kwargs):
        """The trainer, with the product's progress display and atomic checkpoint writes, unless the config
        chose its own bar or checkpoint IO.

        Lightning's default writes through a temporary file in the system temp dir, which is a copy (not a
        rename) when checkpoints live on another filesystem (`training.checkpoint_io`).
        """
        section = self._section(self.config_init)
        settings = section["trainer"]
        chosen = settings.get("callbacks") or []
        if not self.logs or self.subcommand == "predict":  # their output is their file or their answers
            kwargs.setdefault("logger", False)
        # Lightning's monitor refuses a trainer without a logger; a config's own one logs `train/lr` already
        logged = kwargs.get("logger", settings.get("logger")) not in (False, None, [])
        monitored = any(isinstance(c, LearningRateMonitor) for c in chosen)
        callbacks = self.product_callbacks(section["generation"], logged and not monitored)
        if settings.get("enable_progress_bar") is not False and not any(isinstance(c, LightningBar) for c in chosen):
            # The product's bar, unless the config picked its own (Lightning refuses two) or none. A live bar
            # draws nothing where stdout is not a terminal (a Slurm log): lines there instead.
            callbacks.append(ProgressBar() if sys.stdout.isatty() else ProgressLines())
        self.trainer_defaults["callbacks"] = callbacks
        plugins = settings.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs.setdefault("plugins", [*plugins, AtomicCheckpointIO()])
        return self._trainer_or_config_error(**kwargs)

    def product_callbacks(self, generation: GenerationSettings, lr_monitor: bool) -> list:
        """The product's callbacks for this subcommand (`training.callbacks`), new for each trainer."""
        return default_callbacks(generation, lr_monitor)

    def _trainer_or_config_error(self, **kwargs):
        # Lightning rejects an accelerator, strategy or device count this machine lacks with a traceback.
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as e:
            problem = " ".join(str(e).split())
            if re.search(LIGHTNING_MACHINE_ERROR, problem, re.IGNORECASE):
                raise ConfigError(
                    f"the trainer settings do not fit this machine: {problem} "
                    "Fix: change --trainer.accelerator / --trainer.strategy / --trainer.devices "
                    "(on CPU: --trainer.accelerator cpu, strategy auto or ddp)"
                ) from e
            raise ConfigError(
                f"bad trainer setting: {problem} Fix: correct it (`python -m lightning_falcon fit --help`)"
            ) from e

    def before_instantiate_classes(self) -> None:
        config = self._section(self.config)
        if config.data.tokenizer is None:  # the tokenizer normally lives beside the model
            config.data.tokenizer = config.model.model_name_or_path
        self.settle_ckpt_path(config)
        if self.subcommand == "predict" and self.source is None and config.generation.output is None:
            # the base model's predictions go where this run would log, as a run's go beside its checkpoint
            logger, _ = configured_logger(config)
            if getattr(logger, "log_dir", None):
                config.generation.output = str(RunDir(Path(logger.log_dir)).predictions)

    def settle_ckpt_path(self, config) -> None:
        """`--ckpt_path`, settled once before anything is made: what the run reads (`self.source`), and for every
        subcommand but fit, LoRA weights that the model loads itself (`model.adapter`)."""
        self.asked = config.get("ckpt_path")
        self.source, self.resume = self._resolve_ckpt_path(config)
        if self.subcommand != "fit" and "ckpt_path" in config:
            if self.source is not None and self.resume is None:
                config.model.adapter = str(self.source)
            config.ckpt_path = self.resume

    def _resolve_ckpt_path(self, config) -> tuple[Path | None, str | None]:
        """(the checkpoint or adapter the run reads, what Lightning's `ckpt_path` gets).

        Lightning keeps a fit's resume (optimizer and loop state) and a DeepSpeed checkpoint (its shards); an
        adapter directory or a `.ckpt` file is LoRA weights, which the model loads for the other subcommands.
        """
        ckpt = config.get("ckpt_path")
        if ckpt == "last":
            ckpt = last_checkpoint(config)
        if ckpt is None or ckpt in LIGHTNING_CKPT_KEYWORDS:
            return None, ckpt
        path = Path(ckpt).expanduser()
        if not path.exists():
            raise ConfigError(f"checkpoint not found: {ckpt}. Fix: give a .ckpt file, `last`, or an adapter directory")
        deepspeed = is_deepspeed_checkpoint(path)
        if path.is_dir() and not deepspeed:
            adapter.check_adapter_dir(path)  # a directory is an adapter or a DeepSpeed checkpoint, nothing else
            if self.subcommand == "fit":
                raise ConfigError(
                    f"{path} is an adapter, which holds no optimizer or loop state to resume fit from. "
                    "Fix: resume with the run's checkpoints/last.ckpt (or --ckpt_path last), "
                    f"or start a new run from its weights: --model.adapter {path}"
                )
        resume = str(path) if self.subcommand == "fit" or deepspeed else None
        return path, resume

    def check_run(self) -> None:
        """Everything cheap, before the data is tokenized or any weights load (config.json only): what `plan`
        checks too (`check_config`), then this machine (`check_machine`), that the chat template renders and
        `max_length` holds it, that the checkpoint or adapter fits the model, and predict's inputs."""
        hp, strategy = self.model.hparams, self.trainer.strategy
        check_config(
            StrategySettings.of(strategy),
            hp.quantization,
            hp.optimizer,
            self.model.target_modules,
            self.model.linear_modules(),
            self.model.architecture(),
            self.datamodule.hparams.batching,
            hp.objective,
        )
        check_machine(strategy, hp.quantization, hp.compute_dtype, self.trainer.precision)
        self.datamodule.check_rendering()
        self.datamodule.check_objective(hp.objective, hp.objective in PAIRED)  # the rows: read from the data
        for path in {Path(p) for p in (self.source, hp.adapter) if p is not None}:
            self.model.check_checkpoint(path)
        if self.subcommand == "predict":
            self.datamodule.predict_texts()  # an empty or unreadable input file fails now, not after loading
        if self.subcommand == "fit":  # fit's config.yaml keeps what was asked (`last`); Lightning gets the file
            self._section(self.config_init)["ckpt_path"] = self.resume

    def one_device_source(self, command: str) -> Path | None:
        """`check_run` for a one-device command that reads a run (evaluate, chat): `last` must find a
        checkpoint, and a DeepSpeed checkpoint (a shard per rank) is refused with the fix to read the
        run's adapter. Returns the checkpoint or adapter directory (None: the base model)."""
        if self.source is None and self.asked is not None:
            raise ConfigError(
                f"{command} found no checkpoint for --ckpt_path {self.asked}. Fix: train first, or name a checkpoint"
            )
        if self.source is not None and is_deepspeed_checkpoint(self.source):
            raise ConfigError(
                f"{self.source} is a DeepSpeed checkpoint (one shard per rank), and {command} runs on one device. "
                f"Fix: give the run's adapter: --ckpt_path {RunDir.of_source(self.source).adapter}"
            )
        self.check_run()
        return self.source

    before_fit = before_validate = before_test = before_predict = check_run


def check_config(
    strategy: StrategySettings,
    quantization: str,
    optimizer: str,
    target_modules: list[str],
    linear_modules: list[str],
    family: Architecture,
    batching: str,
    objective: str = "sft",
) -> None:
    """Refuse, listing every problem, a config that cannot run on any machine. fit and plan both call this, so
    plan refuses what fit refuses, with the same line.

    Args:
        strategy: The trainer's strategy: fit reads it from the strategy it built, plan from the config.
        quantization: `model.quantization`.
        optimizer: `model.optimizer`.
        target_modules: The LoRA targets (`model.target_modules`, or the family's when unset).
        linear_modules: The leaf names of the model's linear layers, from its config.json alone.
        family: The model's row of `architectures.py`.
        batching: `data.batching`.
        objective: `model.objective`.
    """
    problems = strategy_problems(strategy, quantization, optimizer)
    try:
        check_target_modules(linear_modules, target_modules, family)
    except ConfigError as e:
        problems.insert(0, str(e))
    if strategy.deepspeed and strategy.stage == 3 and not family.shards_under_zero3:
        problems.append(
            f"DeepSpeed ZeRO-3: {family.family}'s fused Mamba kernels read some weights without running their layers, "
            "so ZeRO-3 would hand them an empty partition. Fix: --config configs/strategy/deepspeed-zero2.yaml (or "
            "ddp.yaml)"
        )
    if batching == "packed" and objective in PAIRED:
        problems.append(
            "data.batching packed: a preference pair's two sequences are scored whole, one against the other, "
            "not packed. Fix: --data.batching grouped"
        )
    if batching == "packed" and not family.packs_exactly:
        problems.append(
            f"data.batching packed: {family.family}'s Mamba state would run on from one packed row into the next. "
            "Fix: --data.batching padded (or grouped)"
        )
    ConfigError.collect(problems)


def check_machine(strategy: Strategy, quantization: str, compute_dtype: ComputeDtype, precision: str) -> None:
    """fit's checks of the machine it runs on, after `check_config`: the strategy's accelerator, bf16 on this
    rank's device, and that bitsandbytes quantizes there. plan skips them: it plans a run for another machine.

    Args:
        strategy: The trainer's strategy; its `root_device` is this rank's device.
        quantization: `model.quantization`.
        compute_dtype: `model.compute_dtype`, as configured (`auto` is resolved for this device).
        precision: The trainer's precision (`bf16-mixed`, `16-mixed`, `32-true`, ...).
    """
    check_strategy_runs(strategy)
    device = strategy.root_device
    dtype = resolve_compute_dtype(compute_dtype, device)
    check_bf16_is_native(dtype, precision, device)
    check_quantization_runs(quantization, dtype, device)


# predict, chat and evaluate run in one process on one device, whatever the config trains with.
SINGLE_DEVICE = ["--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.strategy=auto"]

# `--ckpt_path` values Lightning resolves itself (`last` is resolved here, within the run's directories).
LIGHTNING_CKPT_KEYWORDS = ("best", "hpc", "registry")


def predict_inputs(generation: GenerationSettings) -> str | list[str] | None:
    """`data.predict_inputs` from the `generation:` section: its file, else its inputs, else None (the held-out
    prompts). Both set is refused by `GenerationSettings`."""
    return generation.input_file or (list(generation.inputs) if generation.inputs else None)


def configured_logger(config) -> tuple[Logger | None, bool]:
    """The trainer's first logger as `config` would make it, made only to read its paths (a logger writes nothing
    until it logs), and whether its version is pinned (a named run, such as a Slurm job's `slurm-JOBID`)."""
    logger = config.trainer.get("logger")
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    if logger is True:
        return default_logger(config.trainer.get("default_root_dir") or os.getcwd()), False
    if not logger:
        return None, False
    return instantiate_class((), logger.as_dict()), logger.get("init_args", {}).get("version") is not None


def last_checkpoint(config) -> str | None:
    """`--ckpt_path last` -> the run's newest `last*.ckpt` (Lightning looks only in a new, empty version).

    With `checkpoint.dirpath`, in that directory. A named run (a pinned logger version, such as a Slurm job's
    `slurm-JOBID`) resumes only from its own directory, never from another run's; otherwise the newest of any of
    the run's numbered versions. Read from the config, before the trainer exists.
    """
    logger, named = configured_logger(config)
    directories = []
    if config.checkpoint.get("dirpath"):
        directories = [Path(config.checkpoint.dirpath)]
    elif getattr(logger, "root_dir", None):
        run = RunDir(Path(logger.log_dir))
        directories = [run.checkpoints] if named else Path(logger.root_dir).glob("*/checkpoints")
    newest = find_last(directories)
    if newest is None:
        rank_zero_info("[resume] --ckpt_path last: no checkpoint found for this run; starting from scratch")
        return None
    rank_zero_info(f"[resume] --ckpt_path last -> {newest}")
    return str(newest)


class ParseOnlyCLI(FalconCLI):
    """The same config files and overrides as `fit`, parsed but never instantiated (no weights, no GPU)."""

    def settle_ckpt_path(self, config) -> None:
        pass  # nothing is read: `--ckpt_path` passes through as written (slurm-args hands it on)

    def instantiate_classes(self) -> None:
        pass


def build(cli_class: type[FalconCLI], args: list[str], command: str | None, **kwargs) -> FalconCLI:
    """`cli_class` on `args` alone, its usage named `PROGRAM command` (None: a LightningCLI subcommand leads `args`).

    LightningCLI reads `sys.argv` unless it is given `args`, and warns when given both: it reads `args` here
    as its command line, with the program's own name first.
    """
    prog = f"{program()} {command}" if command else program()
    argv, sys.argv = sys.argv, [sys.argv[0], *args]
    try:
        return cli_class(FalconQLoRA, PromptDataModule, parser_kwargs={"prog": prog}, **kwargs)
    finally:
        sys.argv = argv


def parse_only(cli_class: type[ParseOnlyCLI], args: list[str], command: str) -> ParseOnlyCLI:
    return build(cli_class, args, command, run=False)

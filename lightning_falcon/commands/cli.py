"""The LightningCLI of lightning_falcon: its parser, its one-line errors, and the checks that run before any load.

`commands.main` runs it for `fit`, `validate`, `test` and `predict`; `evaluate` and the parse-only
subcommands (`plan`, `slurm-args`, `prefetch`) build on it.
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks.progress import ProgressBar as LightningBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_falcon.commands.program import program
from lightning_falcon.data import PromptDataModule
from lightning_falcon.data.inputs import read_inputs
from lightning_falcon.errors import ConfigError
from lightning_falcon.model import FalconQLoRA, adapter
from lightning_falcon.model.generation import GenerationSettings
from lightning_falcon.model.lora import check_target_modules
from lightning_falcon.model.quantization import (
    ComputeDtype,
    check_bf16_is_native,
    check_quantization_runs,
    resolve_compute_dtype,
)
from lightning_falcon.training import default_callbacks
from lightning_falcon.training.checkpoint_io import AtomicCheckpointIO
from lightning_falcon.training.progress import ProgressBar, ProgressLines
from lightning_falcon.training.strategy import StrategySettings, check_strategy_runs, strategy_problems
from lightning_falcon.upstream import (
    JSONARGPARSE_BAD_VALUE,
    JSONARGPARSE_UNKNOWN_KEY,
    LIGHTNING_MACHINE_ERROR,
    failing_parser,
    jsonargparse_recovers,
    parser_keys,
)

LOGGER = {
    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
    "init_args": {"save_dir": "runs", "name": "default", "default_hp_metric": False},
}


def trainer_defaults() -> dict:
    """The trainer's defaults in every subcommand: TensorBoard, the product's callbacks (new for each CLI:
    they hold a run's state) and no Lightning model summary. LightningCLI adds these callbacks to any the
    config lists."""
    # Lightning's model summary counts a 4-bit weight as a parameter of the compute dtype: the module's own
    # `[model]` line (quantized layers, trainable of total, the real footprint) replaces it.
    return {"logger": LOGGER, "callbacks": default_callbacks(), "enable_model_summary": False}


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
        parser.add_class_arguments(GenerationSettings, "generation")

    def _parse_ckpt_path(self) -> None:
        """Keep the model config the user wrote, whatever `--ckpt_path` names (a library touch point: upstream.py).

        Lightning 2.6 replaces the model section with a checkpoint file's hyperparameters, silently
        dropping the user's `--model.*` overrides, and only when the path is a file (not `last`, not an
        adapter). Here a checkpoint that cannot fit the configured model fails instead, in one line
        naming the differing keys (`_use_checkpoint`).
        """

    def _section(self, config):
        """The running subcommand's part of a parsed config (the whole config when there is no subcommand)."""
        return config[self.subcommand] if self.subcommand else config

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        self.model.generation = self._section(self.config_init)["generation"]

    def instantiate_trainer(self, **kwargs):
        """The trainer, with the product's progress display and atomic checkpoint writes, unless the config
        chose its own bar or checkpoint IO.

        Lightning's default writes through a temporary file in the system temp dir, which is a copy (not a
        rename) when checkpoints live on another filesystem (`training.checkpoint_io`).
        """
        settings = self._section(self.config_init)["trainer"]
        chosen = settings.get("callbacks") or []
        if settings.get("enable_progress_bar") is not False and not any(isinstance(c, LightningBar) for c in chosen):
            # The product's bar, unless the config picked its own (Lightning refuses two) or none. A live bar
            # draws nothing where stdout is not a terminal (a Slurm log): lines there instead.
            bar = ProgressBar() if sys.stdout.isatty() else ProgressLines()
            self.trainer_defaults["callbacks"] = [*self.trainer_defaults["callbacks"], bar]
        trainer = self._trainer_or_config_error(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

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

    def check_run(self) -> Path | None:
        """Everything cheap, before the data is tokenized or any weights load (config.json only): what `plan`
        checks too (`check_config`), then this machine (`check_machine`), that `max_length` holds the template,
        and `--ckpt_path`.

        Returns the checkpoint or adapter directory the run reads, if any.
        """
        hp, strategy = self.model.hparams, self.trainer.strategy
        check_config(
            StrategySettings.of(strategy),
            hp.quantization,
            hp.optimizer,
            self.model.target_modules,
            self.model.linear_modules(),
        )
        check_machine(strategy, hp.quantization, hp.compute_dtype, self.trainer.precision)
        self.datamodule.check_max_length()
        self._resolve_last()
        source = self._use_checkpoint()
        if self.subcommand == "predict":
            self._prepare_predict(source)
        return source

    def one_device_source(self, command: str) -> Path | None:
        """`check_run` for a one-device command that reads a run (evaluate, chat): `last` must find a
        checkpoint, and a DeepSpeed checkpoint (a shard per rank) is refused with the fix to read the
        run's adapter. Returns the checkpoint or adapter directory (None: the base model)."""
        asked = self._section(self.config_init).get("ckpt_path")
        source = self.check_run()
        if source is None and asked is not None:
            raise ConfigError(
                f"{command} found no checkpoint for --ckpt_path {asked}. Fix: train first, or name a checkpoint"
            )
        if source is not None and is_deepspeed_checkpoint(source):
            raise ConfigError(
                f"{source} is a DeepSpeed checkpoint (one shard per rank), and {command} runs on one device. "
                f"Fix: give the run's adapter: --ckpt_path {run_dir(source) / 'adapter'}"
            )
        return source

    def _resolve_last(self) -> None:
        """`--ckpt_path last` -> the run's newest `last*.ckpt` (Lightning looks only in a new, empty version).

        With `checkpoint.dirpath`, in that directory. A named run (a pinned logger version, such as a
        Slurm job's `slurm-JOBID`) resumes only from its own directory, never from another run's;
        otherwise the newest of any of the run's numbered versions.
        """
        config = self._section(self.config_init)
        if config.get("ckpt_path") != "last":
            return
        logger, callback = self.trainer.logger, self.trainer.checkpoint_callback
        init_args = getattr(self._section(self.config).get("trainer.logger"), "init_args", None)
        directories = []
        if callback is not None and callback.dirpath:
            directories = [Path(callback.dirpath)]
        elif logger is not None and getattr(logger, "root_dir", None):
            named = getattr(init_args, "version", None) is not None
            directories = (
                [Path(logger.log_dir) / "checkpoints"] if named else Path(logger.root_dir).glob("*/checkpoints")
            )
        newest = find_last(directories)
        if newest is not None:
            rank_zero_info(f"[resume] --ckpt_path last -> {newest}")
            config["ckpt_path"] = str(newest)
        else:
            rank_zero_info("[resume] --ckpt_path last: no checkpoint found for this run; starting from scratch")
            config["ckpt_path"] = None

    def _use_checkpoint(self) -> Path | None:
        """Check `--ckpt_path` before any weights load; an adapter directory is loaded by the model, not Lightning.

        Returns the checkpoint or adapter directory the run reads (None: the base model, or fit from scratch).
        """
        config = self._section(self.config_init)
        ckpt = config.get("ckpt_path")
        if ckpt is None or ckpt in LIGHTNING_CKPT_KEYWORDS:
            return None
        path = Path(ckpt).expanduser()
        if not path.exists():
            raise ConfigError(f"checkpoint not found: {ckpt}. Fix: give a .ckpt file, `last`, or an adapter directory")
        if path.is_dir() and not is_deepspeed_checkpoint(path):
            adapter.check_adapter_dir(path)  # a directory is an adapter or a DeepSpeed checkpoint, nothing else
            if self.subcommand == "fit":
                raise ConfigError(
                    f"{path} is an adapter, which holds no optimizer or loop state to resume fit from. "
                    "Fix: resume with the run's checkpoints/last.ckpt (or --ckpt_path last)"
                )
            self.model.adapter_dir = str(path)
            config["ckpt_path"] = None
        self.model.check_checkpoint(path)
        return path

    def _prepare_predict(self, source: Path | None) -> None:
        """Read predict's inputs (failing on an empty file now, not after loading) and place its output."""
        generation = self.model.generation
        if generation.input_file:
            self.datamodule.predict_inputs = read_inputs(
                generation.input_file, self.datamodule.members[0].source.prompt_column
            )
        elif generation.inputs:
            self.datamodule.predict_inputs = list(generation.inputs)
        if generation.output is None:
            directory = run_dir(source) if source is not None else Path(self.trainer.log_dir)
            generation.output = str(directory / "predictions.jsonl")
        self.trainer.loggers = []  # predict's output is that file: no new logger version (nor config.yaml: main)

    before_fit = before_validate = before_test = before_predict = check_run


def check_config(
    strategy: StrategySettings,
    quantization: str,
    optimizer: str,
    target_modules: list[str],
    linear_modules: list[str],
) -> None:
    """Refuse, listing every problem, a config that cannot run on any machine. fit and plan both call this, so
    plan refuses what fit refuses, with the same line.

    Args:
        strategy: The trainer's strategy: fit reads it from the strategy it built, plan from the config.
        quantization: `model.quantization`.
        optimizer: `model.optimizer`.
        target_modules: The LoRA targets (`model.target_modules`, or Falcon's when unset).
        linear_modules: The leaf names of the model's linear layers, from its config.json alone.
    """
    problems = strategy_problems(strategy, quantization, optimizer)
    try:
        check_target_modules(linear_modules, target_modules)
    except ConfigError as e:
        problems.insert(0, str(e))
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


# predict and evaluate run in one process on one device, whatever the config trains with.
SINGLE_DEVICE = ["--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.strategy=auto"]

# `--ckpt_path` values Lightning resolves itself (`last` is resolved above, within the run's directories).
LIGHTNING_CKPT_KEYWORDS = ("best", "last", "hpc", "registry")


def is_deepspeed_checkpoint(path: Path) -> bool:
    """A DeepSpeed checkpoint is a directory holding `latest` and a tag directory of shards."""
    return (path / "latest").is_file() or (path / "checkpoint").is_dir()


def run_dir(source: Path) -> Path:
    """The run directory of a checkpoint (`RUN/checkpoints/X.ckpt`) or an adapter (`RUN/adapter`)."""
    parent = source.parent
    return parent.parent if parent.name == "checkpoints" else parent


def find_last(directories) -> Path | None:
    """The newest `last*.ckpt` in `directories`: a file, or a directory of shards under DeepSpeed."""
    found = [path for directory in directories for path in Path(directory).glob("last*.ckpt")]
    return max(found, key=lambda path: path.stat().st_mtime, default=None)


class ParseOnlyCLI(FalconCLI):
    """The same config files and overrides as `fit`, parsed but never instantiated (no weights, no GPU)."""

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

"""The LightningCLI: `python -m lightning_falcon {fit,validate,test,predict} --config X.yaml [--section.key value ...]`.

python -m lightning_falcon fit --config configs/tiny.yaml
python -m lightning_falcon fit --config configs/tiny.yaml --trainer.max_steps 50 --model.lora_r 16
python -m lightning_falcon fit --config configs/tiny.yaml --ckpt_path last      # resume the run
python -m lightning_falcon fit --config configs/tiny.yaml --print_config
python -m lightning_falcon plan --config configs/falcon-40b-qlora.yaml --gpu_memory 40GB   # per-GPU memory
python -m lightning_falcon slurm-args --config configs/tiny.yaml    # inside a Slurm job: the fit arguments it implies
python -m lightning_falcon prefetch --config configs/falcon-7b-qlora.yaml   # model + data cached for offline nodes
python -m lightning_falcon predict --config configs/tiny.yaml --ckpt_path last --generation.inputs '["a boy in snow"]'
python -m lightning_falcon evaluate --config configs/tiny.yaml --ckpt_path last     # base vs fine-tuned report
python -m lightning_falcon export --adapter runs/tiny/version_0/adapter --output out --merge
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import sys
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_falcon import adapter
from lightning_falcon.checkpoint_io import DiskFull
from lightning_falcon.data import PromptDataModule
from lightning_falcon.errors import ConfigError
from lightning_falcon.generation import GenerationSettings
from lightning_falcon.module import FalconQLoRA, NonFiniteLoss
from lightning_falcon.quantization import check_quantization_runs, resolve_compute_dtype
from lightning_falcon.strategy import check_strategy

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "default", "default_hp_metric": False},
    }
}


class FalconArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, reporting a bad key or value in one line with its fix (not 100 lines of usage)."""

    def error(self, message: str, ex: Exception | None = None):
        # jsonargparse parses tentatively with exit_on_error off and catches what this raises: leave that alone.
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        print(f"lightning_falcon: error: {explain_parse_error(message, parser)}", file=sys.stderr)
        sys.exit(2)


def explain_parse_error(message: str, parser) -> str:
    """jsonargparse's message as one line, with the nearest valid key for an unknown one."""
    # `__main__.py [options] fit` for a subcommand, `__main__.py` for the root, `lightning_falcon plan` for ours
    words = parser.prog.replace(" [options]", "").split()
    help_command = f"`python -m lightning_falcon {' '.join(words[1:2] + ['--help'])}`"
    found = re.search(r"does not accept option '([^']+)'", message) or re.search(
        r"unrecognized arguments: (\S+)", message
    )
    if found:
        key = found.group(1).lstrip("-").split("=")[0]
        keys = [action.dest for action in parser._actions if action.dest != "help"]
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.8)
        fix = f"did you mean {close[0]}?" if close else "remove it."
        return f"unknown key {key}. Fix: {fix} {help_command} lists every key"
    found = re.match(r'Parser key "([^"]+)":\s*(.*)', message, re.DOTALL)
    if found:
        key, problem = found.group(1), " ".join(found.group(2).split())
        return f"bad value for {key}: {problem}. Fix: correct {key} ({help_command} shows what it takes)"
    return f"{' '.join(message.split())}. Fix: see {help_command}"


class FalconCLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("parser_class", FalconArgumentParser)
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
        """Keep the model config the user wrote, whatever `--ckpt_path` names.

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
        # Lightning rejects an accelerator, strategy or device count this machine lacks with a traceback.
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as e:
            problem = " ".join(str(e).split())
            if re.search(r"accelerator|strateg|device|gpu|cuda|backend", problem, re.IGNORECASE):
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
        """Everything cheap, before the data is tokenized or any weights load (config.json only): LoRA targets,
        the strategy, that bitsandbytes runs here, that `max_length` holds the template, and `--ckpt_path`.

        Returns the checkpoint or adapter directory the run reads, if any.
        """
        hp = self.model.hparams
        self.model.check_targets()
        check_strategy(self.trainer.strategy, hp.quantization, hp.optimizer)
        device = self.trainer.strategy.root_device
        check_quantization_runs(hp.quantization, resolve_compute_dtype(hp.compute_dtype, device), device)
        self.datamodule.check_max_length()
        self._resolve_last()
        source = self._use_checkpoint()
        if self.subcommand == "predict":
            self._prepare_predict(source)
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
        from lightning_falcon.inputs import read_inputs

        generation = self.model.generation
        if generation.input_file:
            self.datamodule.predict_inputs = read_inputs(generation.input_file, self.datamodule.hparams.prompt_column)
        elif generation.inputs:
            self.datamodule.predict_inputs = list(generation.inputs)
        if generation.output is None:
            directory = run_dir(source) if source is not None else Path(self.trainer.log_dir)
            generation.output = str(directory / "predictions.jsonl")
        self.trainer.loggers = []  # predict's output is that file: no new logger version (nor config.yaml: main)

    before_fit = before_validate = before_test = before_predict = check_run


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


def parse_only(cli_class: type[ParseOnlyCLI], args: list[str], command: str) -> ParseOnlyCLI:
    # LightningCLI reads sys.argv when given no args; the extra subcommand is not one of its own, so drop it there.
    argv, sys.argv = sys.argv, [sys.argv[0], *args]
    try:
        return cli_class(
            FalconQLoRA,
            PromptDataModule,
            run=False,
            trainer_defaults=TRAINER_DEFAULTS,
            parser_kwargs={"prog": f"lightning_falcon {command}"},
        )
    finally:
        sys.argv = argv


class SlurmArgsCLI(ParseOnlyCLI):
    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        # fit's own argument, passed through the sbatch scripts: a resubmitted job names its checkpoint.
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="As for fit")


class PlanCLI(ParseOnlyCLI):
    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--devices", type=int | None, default=None, help="GPUs per node (default: the config's)")
        parser.add_argument("--num_nodes", type=int | None, default=None, help="Nodes (default: the config's)")
        parser.add_argument(
            "--gpu_memory", type=str, default="80GB", help="Memory of one GPU for the verdict, e.g. 24GB, 40GB, 80GB"
        )


def run_plan(args: list[str]) -> None:
    """Print the per-GPU memory of a config for its strategy and every alternative."""
    from lightning_falcon.plan import report

    config = parse_only(PlanCLI, args, "plan").config
    print(report(config.model, config.data, config.trainer, config.devices, config.num_nodes, config.gpu_memory))


def run_slurm_args(args: list[str]) -> None:
    """Inside a Slurm job: print the fit arguments its allocation implies, one per line (see slurm.py)."""
    from lightning_falcon.slurm import Allocation, fit_arguments

    alloc = Allocation.from_env()  # first: outside a job nothing else matters
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the arguments, for the sbatch script
        cli = parse_only(SlurmArgsCLI, args, "slurm-args")
        explicit = cli.parser.parse_args(args, defaults=False)  # only what the config files and overrides set
    print("\n".join(fit_arguments(explicit, cli.config, alloc)))


def run_prefetch(args: list[str]) -> None:
    """Download the config's model, tokenizer and data into the caches a job without internet reads."""
    from lightning_falcon.offline import prefetch

    config = parse_only(ParseOnlyCLI, args, "prefetch").config
    print("\n".join(prefetch(config.model, config.data)))


def run_export(args: list[str]) -> None:
    """Export an adapter directory, or merge it into its base (see export.py)."""
    from lightning_falcon.export import export

    parser = FalconArgumentParser(prog="lightning_falcon export", description=export.__doc__.splitlines()[0])
    parser.add_function_arguments(export)
    # `--merge` alone reads as `--merge true`, as with argparse's store_true flags.
    flags = ("--merge", "--overwrite", "--private", "--trust_remote_code")
    args = [
        f"{a}=true" if a in flags and (i + 1 == len(args) or args[i + 1].startswith("-")) else a
        for i, a in enumerate(args)
    ]
    config = parser.parse_args(args)
    export(**config.as_dict())


def run_evaluate(args: list[str]) -> None:
    """Validation loss and generations of the base and the fine-tuned model, side by side (see evaluate.py)."""
    from lightning_falcon.evaluate import evaluate

    evaluate(args)


SUBCOMMANDS = {
    "plan": run_plan,
    "slurm-args": run_slurm_args,
    "prefetch": run_prefetch,
    "export": run_export,
    "evaluate": run_evaluate,
}


def main(args: list[str] | None = None) -> None:
    """Entry point of `python -m lightning_falcon` and the `lightning-falcon` console script."""
    argv = sys.argv[1:] if args is None else args
    if "SLURM_JOB_ID" in os.environ:
        from lightning_falcon.preemption import listen

        listen()  # a warning signal during start-up or loading is kept for the first step, not fatal
    try:
        run(argv, args)
    except ConfigError as e:
        print(f"lightning_falcon: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (NonFiniteLoss, DiskFull) as e:  # every rank stopped together; the last good checkpoint is on disk
        print(f"lightning_falcon: error: {e}", file=sys.stderr)
        end_process_group()
        sys.exit(1)
    end_process_group()


def run(argv: list[str], args: list[str] | None) -> None:
    """One subcommand: ours (`SUBCOMMANDS`) or one of LightningCLI's, which reads `sys.argv` when `args` is None."""
    if argv[:1] and argv[0] in SUBCOMMANDS:
        SUBCOMMANDS[argv[0]](argv[1:])
        return
    saving = {"save_config_kwargs": {"overwrite": True}}
    if argv[:1] == ["predict"]:
        # One process: one JSONL in input order (ranks would each write a share), and generation needs
        # no cross-rank lockstep (ZeRO-3 ranks given unequal shares would wait on each other forever).
        # Its output is the JSONL alone: no config.yaml.
        args, saving = [*argv, *SINGLE_DEVICE], {"save_config_callback": None}
    FalconCLI(FalconQLoRA, PromptDataModule, args=args, trainer_defaults=TRAINER_DEFAULTS, **saving)


def end_process_group() -> None:
    """Destroy the process group a distributed run leaves behind (Lightning never does), while Python is whole.

    Left to interpreter exit, gloo's worker threads are torn down with the process and can abort it
    ("terminate called without an active exception", pytorch/pytorch#190489): Slurm then marks a job
    that trained and saved its adapter FAILED. torch's docs ask for this call at the end of every run.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""The LightningCLI: `python -m lightning_falcon {fit,validate,test,predict} --config X.yaml [--section.key value ...]`.

python -m lightning_falcon fit --config configs/tiny.yaml
python -m lightning_falcon fit --config configs/tiny.yaml --trainer.max_steps 50 --model.lora_r 16
python -m lightning_falcon fit --config configs/tiny.yaml --ckpt_path last      # resume the run
python -m lightning_falcon fit --config configs/tiny.yaml --print_config
python -m lightning_falcon plan --config configs/falcon-40b-qlora.yaml --gpu_memory 40GB   # per-GPU memory
python -m lightning_falcon slurm-args --config configs/tiny.yaml    # inside a Slurm job: the fit arguments it implies
python -m lightning_falcon prefetch --config configs/falcon-7b-qlora.yaml   # model + data cached for offline nodes
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Optional

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lightning_falcon.data import PromptDataModule
from lightning_falcon.errors import ConfigError
from lightning_falcon.module import FalconQLoRA
from lightning_falcon.strategy import check_strategy

TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "default", "default_hp_metric": False},
    }
}


class FalconCLI(LightningCLI):
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

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.data.tokenizer is None:  # the tokenizer normally lives beside the model
            config.data.tokenizer = config.model.model_name_or_path

    def _before_run(self) -> None:
        # Cheap (config.json only): a wrong LoRA target or an impossible strategy fails before the data is tokenized.
        self.model.check_targets()
        check_strategy(self.trainer.strategy, self.model.hparams.quantization, self.model.hparams.optimizer)
        self._resolve_last()

    def _resolve_last(self) -> None:
        """`--ckpt_path last` -> the run's newest `last*.ckpt` (Lightning looks only in a new, empty version).

        With `checkpoint.dirpath`, in that directory. A named run (a pinned logger version, such as a
        Slurm job's `slurm-JOBID`) resumes only from its own directory, never from another run's;
        otherwise the newest of any of the run's numbered versions.
        """
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") != "last":
            return
        logger, callback = self.trainer.logger, self.trainer.checkpoint_callback
        init_args = getattr(self.config[self.subcommand].get("trainer.logger"), "init_args", None)
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

    before_fit = before_validate = before_test = before_predict = _before_run


def find_last(directories) -> Path | None:
    """The newest `last*.ckpt` in `directories`: a file, or a directory of shards under DeepSpeed."""
    found = [path for directory in directories for path in Path(directory).glob("last*.ckpt")]
    return max(found, key=lambda path: path.stat().st_mtime, default=None)


class ParseOnlyCLI(FalconCLI):
    """The same config files and overrides as `fit`, parsed but never instantiated (no weights, no GPU)."""

    def instantiate_classes(self) -> None:
        pass


def parse_only(cli_class: type[ParseOnlyCLI], args: list[str]) -> ParseOnlyCLI:
    # LightningCLI reads sys.argv when given no args; the extra subcommand is not one of its own, so drop it there.
    argv, sys.argv = sys.argv, [sys.argv[0], *args]
    try:
        return cli_class(FalconQLoRA, PromptDataModule, run=False, trainer_defaults=TRAINER_DEFAULTS)
    finally:
        sys.argv = argv


class SlurmArgsCLI(ParseOnlyCLI):
    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        # fit's own argument, passed through the sbatch scripts: a resubmitted job names its checkpoint.
        parser.add_argument("--ckpt_path", type=Optional[str], default=None, help="As for fit")


class PlanCLI(ParseOnlyCLI):
    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--devices", type=Optional[int], default=None, help="GPUs per node (default: the config's)")
        parser.add_argument("--num_nodes", type=Optional[int], default=None, help="Nodes (default: the config's)")
        parser.add_argument(
            "--gpu_memory", type=str, default="80GB", help="Memory of one GPU for the verdict, e.g. 24GB, 40GB, 80GB"
        )


def run_plan(args: list[str]) -> None:
    """Print the per-GPU memory of a config for its strategy and every alternative."""
    from lightning_falcon.plan import report

    config = parse_only(PlanCLI, args).config
    print(report(config.model, config.data, config.trainer, config.devices, config.num_nodes, config.gpu_memory))


def run_slurm_args(args: list[str]) -> None:
    """Inside a Slurm job: print the fit arguments its allocation implies, one per line (see slurm.py)."""
    from lightning_falcon.slurm import Allocation, fit_arguments

    alloc = Allocation.from_env()  # first: outside a job nothing else matters
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the arguments, for the sbatch script
        cli = parse_only(SlurmArgsCLI, args)
        explicit = cli.parser.parse_args(args, defaults=False)  # only what the config files and overrides set
    print("\n".join(fit_arguments(explicit, cli.config, alloc)))


def run_prefetch(args: list[str]) -> None:
    """Download the config's model, tokenizer and data into the caches a job without internet reads."""
    from lightning_falcon.offline import prefetch

    config = parse_only(ParseOnlyCLI, args).config
    print("\n".join(prefetch(config.model, config.data)))


SUBCOMMANDS = {"plan": run_plan, "slurm-args": run_slurm_args, "prefetch": run_prefetch}


def main(args: list[str] | None = None) -> None:
    """Entry point of `python -m lightning_falcon` and the `lightning-falcon` console script."""
    argv = sys.argv[1:] if args is None else args
    if "SLURM_JOB_ID" in os.environ:
        from lightning_falcon.preemption import listen

        listen()  # a warning signal during start-up or loading is kept for the first step, not fatal
    try:
        if argv[:1] and argv[0] in SUBCOMMANDS:
            SUBCOMMANDS[argv[0]](argv[1:])
            return
        FalconCLI(
            FalconQLoRA,
            PromptDataModule,
            args=args,
            save_config_kwargs={"overwrite": True},
            trainer_defaults=TRAINER_DEFAULTS,
        )
    except ConfigError as e:
        print(f"lightning_falcon: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

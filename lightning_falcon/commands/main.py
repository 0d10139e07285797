"""The entry point: `python -m lightning_falcon SUBCOMMAND --config X.yaml [--section.key value ...]`.

python -m lightning_falcon fit --config configs/tiny.yaml
python -m lightning_falcon fit --config configs/tiny.yaml --trainer.max_steps 50 --model.lora_r 16
python -m lightning_falcon fit --config configs/tiny.yaml --ckpt_path last      # resume the run
python -m lightning_falcon fit --config configs/tiny.yaml --print_config
python -m lightning_falcon plan --config configs/falcon-40b-qlora.yaml --gpu_memory 40GB   # per-GPU memory
python -m lightning_falcon slurm-args --config configs/tiny.yaml    # inside a Slurm job: the fit arguments it implies
python -m lightning_falcon prefetch --config configs/falcon-7b-qlora.yaml   # model + data cached for offline nodes
python -m lightning_falcon predict --config configs/tiny.yaml --ckpt_path last --generation.inputs '["a boy in snow"]'
python -m lightning_falcon chat --config configs/tiny.yaml --ckpt_path last         # talk to the trained model
python -m lightning_falcon serve --config configs/tiny.yaml --ckpt_path last        # OpenAI API + chat page, :8000
python -m lightning_falcon evaluate --config configs/tiny.yaml --ckpt_path last     # base vs fine-tuned report
python -m lightning_falcon export --adapter runs/tiny/version_0/adapter --output out --merge
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys

from lightning_falcon.commands.program import program

# Every subcommand, with its one line of help and where it lives ("module:function", imported only when it
# runs, so that the top-level help answers before torch, Lightning and transformers load). None: LightningCLI's.
COMMANDS: dict[str, tuple[str, str | None]] = {
    "fit": ("train LoRA adapters on a config's model and data; --ckpt_path last resumes", None),
    "validate": ("the validation loss and perplexity of a checkpoint or adapter", None),
    "test": ("the same as validate, logged as test/ scalars", None),
    "predict": ("generate for generation.inputs or .input_file: one JSON line per input", None),
    "chat": ("talk to a trained model: streamed on a terminal, one answer a line on a pipe", "chat:main"),
    "serve": ("an OpenAI-compatible server and a chat page: the base and several adapters", "serve:main"),
    "evaluate": ("the base against the fine-tuned model on the same prompts: a Markdown report", "evaluate:evaluate"),
    "export": ("an adapter, the merged model (--merge), or one GGUF file for llama.cpp (--format gguf)", "export:main"),
    "plan": ("per-GPU memory of a config, for each strategy, before anything loads", "plan:main"),
    "prefetch": ("download a config's model, tokenizer and data for offline nodes", "prefetch:main"),
    "slurm-args": ("inside a Slurm job: the fit arguments its allocation implies", "slurm_args:main"),
}


def usage() -> str:
    """The top-level help: every subcommand with its line."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {line}" for name, (line, _) in COMMANDS.items()]
    return "\n".join(
        [
            f"usage: {program()} SUBCOMMAND [--config X.yaml] [--section.key value ...]",
            "",
            "QLoRA fine-tuning of Falcon LLMs with PyTorch Lightning.",
            "",
            "subcommands:",
            *lines,
            "",
            f"`{program()} SUBCOMMAND --help` lists a subcommand's own options.",
            f"Start: {program()} fit --config configs/tiny.yaml",
        ]
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of `python -m lightning_falcon` and the `lightning-falcon` console script."""
    argv = sys.argv[1:] if args is None else args
    if not argv or argv[0] in ("-h", "--help"):
        with reader_may_leave():
            print(usage())
        return
    if argv[0] not in COMMANDS and not argv[0].startswith("-"):  # `-c X.yaml fit`: LightningCLI's root options
        print(f"{usage()}\n\nlightning_falcon: error: unknown subcommand {argv[0]!r}", file=sys.stderr)
        sys.exit(2)
    from lightning_falcon.commands.console import quiet_console

    quiet_console()  # before the libraries load: some speak on import
    from lightning_falcon.errors import ConfigError
    from lightning_falcon.model import NonFiniteLoss
    from lightning_falcon.training.checkpoint_io import DiskFull
    from lightning_falcon.training.preemption import listen

    if "SLURM_JOB_ID" in os.environ:
        listen()  # a warning signal during start-up or loading is kept for the first step, not fatal
    try:
        with reader_may_leave():
            run(argv)
    except ConfigError as e:
        print(f"lightning_falcon: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (NonFiniteLoss, DiskFull) as e:  # every rank stopped together; the last good checkpoint is on disk
        print(f"lightning_falcon: error: {e}", file=sys.stderr)
        end_process_group()
        sys.exit(1)
    end_process_group()


@contextlib.contextmanager
def reader_may_leave():
    """End quietly when the reader of stdout has gone (`--help | head`), as a command killed by SIGPIPE does."""
    try:
        yield
        sys.stdout.flush()  # here, so that a closed pipe is found inside this block
    except BrokenPipeError:
        # Python's own recipe: stdout to /dev/null, so the flush at exit does not raise once more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)


def run(argv: list[str]) -> None:
    """One subcommand: ours (`COMMANDS` with a function) or one of LightningCLI's."""
    where = COMMANDS.get(argv[0], ("", None))[1]
    if where is not None:
        module, function = where.split(":")
        getattr(importlib.import_module(f"lightning_falcon.commands.{module}"), function)(argv[1:])
        return
    from lightning_falcon.commands.cli import SINGLE_DEVICE, FalconCLI, build

    saving = {"save_config_kwargs": {"overwrite": True}}
    if argv[:1] == ["predict"]:
        # One process: one JSONL in input order (ranks would each write a share), and generation needs
        # no cross-rank lockstep (ZeRO-3 ranks given unequal shares would wait on each other forever).
        # Its output is the JSONL alone: no config.yaml.
        argv, saving = [*argv, *SINGLE_DEVICE], {"save_config_callback": None}
    build(FalconCLI, argv, None, **saving)


def end_process_group() -> None:
    """Destroy the process group a distributed run leaves behind (Lightning never does), while Python is whole.

    Left to interpreter exit, gloo's worker threads are torn down with the process and can abort it
    ("terminate called without an active exception", pytorch/pytorch#190489): Slurm then marks a job
    that trained and saved its adapter FAILED. torch's docs ask for this call at the end of every run.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

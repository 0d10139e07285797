"""A run's directory: where fit, predict and evaluate write, and which run a checkpoint or adapter belongs to.

`RUN` is a logger version (`runs/tiny/version_0`), or the trainer's root directory without a logger:

    RUN/checkpoints/step=N.ckpt, last.ckpt   fit's LoRA-only checkpoints (a directory of shards under DeepSpeed)
    RUN/adapter/                              the PEFT adapter, written at the end of fit
    RUN/config.yaml                           the config fit ran with
    RUN/predictions.jsonl                     predict's output
    RUN/evaluation.md, evaluation.json        evaluate's report

This module imports only the standard library, so every layer may use it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class RunDir:
    """One run's directory and the paths inside it."""

    path: Path

    @classmethod
    def of_trainer(cls, trainer) -> RunDir:
        """The run a trainer writes: its logger's version directory, else its root directory.

        `trainer.log_dir` is a broadcast from rank 0 under several ranks: every rank must ask, or rank 0 waits.
        """
        return cls(Path(trainer.log_dir or trainer.default_root_dir))

    @classmethod
    def of_source(cls, source: Path) -> RunDir:
        """The run of a checkpoint (`RUN/checkpoints/X.ckpt`) or an adapter (`RUN/adapter`)."""
        parent = Path(source).parent
        return cls(parent.parent if parent.name == CHECKPOINTS else parent)

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def predictions(self) -> Path:
        return self.path / "predictions.jsonl"

    @property
    def evaluation(self) -> Path:
        return self.path / "evaluation.md"


def find_last(directories: Iterable[Path]) -> Path | None:
    """The newest `last*.ckpt` in `directories`: a file, or a directory of shards under DeepSpeed."""
    found = [path for directory in directories for path in Path(directory).glob("last*.ckpt")]
    return max(found, key=lambda path: path.stat().st_mtime, default=None)


def is_deepspeed_checkpoint(path: Path) -> bool:
    """A DeepSpeed checkpoint is a directory holding `latest` and a tag directory of shards."""
    return (path / "latest").is_file() or (path / "checkpoint").is_dir()

"""Atomic checkpoint writes: a crash while saving leaves the previous checkpoint whole.

Lightning's `TorchCheckpointIO` writes through an fsspec transaction whose temporary file lives in the
system temp directory. On a cluster that is node-local while checkpoints sit on a shared filesystem, so
the final "rename" is a copy into the target path, and a job killed during it leaves a torn `last.ckpt`.
Here the temporary file sits beside the target, is flushed to disk, and `os.replace`s it: on POSIX the
target is at every moment either the old checkpoint or the new one.

A DeepSpeed checkpoint is a directory (one shard per rank), which no single rename can replace. It is
written whole under a hidden name, then swapped in with two renames. Between them the previous one
exists as `last.old-<tag>.ckpt`, which `--ckpt_path last` still finds (`cli.find_last`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (its entry is on disk, not only in the page cache)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Call `write(file)` on a temporary file beside `path`, then atomically move it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose saves are atomic on a local or shared POSIX filesystem."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def swap_in_directory(staged: Path, target: Path, tag: str) -> None:
    """Replace directory (or file) `target` with the complete directory `staged`, the previous kept to the end.

    `tag` names the previous copy while both exist: `<stem>.old-<tag><suffix>`, which still matches
    `last*.ckpt` if a crash falls between the two renames.
    """
    old = target.with_name(f"{target.stem}.old-{tag}{target.suffix}")
    if target.exists():
        os.replace(target, old)
    os.replace(staged, target)
    _fsync_directory(target.parent)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink(missing_ok=True)

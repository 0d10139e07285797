"""Atomic checkpoint writes: a crash while saving leaves the previous checkpoint whole.

Lightning's `TorchCheckpointIO` writes through an fsspec transaction whose temporary file lives in the
system temp directory. On a cluster that is node-local while checkpoints sit on a shared filesystem, so
the final "rename" is a copy into the target path, and a job killed during it leaves a torn `last.ckpt`.
Here the temporary file sits beside the target, is flushed to disk, and `os.replace`s it: on POSIX the
target is at every moment either the old checkpoint or the new one.

A DeepSpeed checkpoint is a directory (one shard per rank), which no single rename can replace. It is
written whole under a hidden name, then swapped in with two renames. Between them the previous one
exists as `last.old-<tag>.ckpt`, which `--ckpt_path last` still finds (`runs.find_last`).

A full disk is found before a write where possible (`room_problem`, checked on every rank by
`disk_space.DiskSpaceCheck`), and otherwise during it: the partial file is removed and `DiskFull`
names the directory.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_falcon.files import atomic_write
from lightning_falcon.runs import RunDir

# Room asked for beyond a checkpoint's tensor bytes: its pickle, and the filesystem's own rounding.
ROOM_MARGIN_BYTES = 1 << 20
ROOM_MARGIN_FRACTION = 0.05


def checkpoint_dir(trainer) -> Path:
    """Where this run's checkpoints go: ModelCheckpoint's directory, else `<log dir>/checkpoints` (its default)."""
    callback = trainer.checkpoint_callback
    if callback is not None and callback.dirpath:
        return Path(callback.dirpath)
    return RunDir.of_trainer(trainer).checkpoints


class DiskFull(OSError):
    """No room for a checkpoint; nothing partial is left and the previous checkpoint stays. The CLI prints it."""


def tensor_bytes(obj: Any) -> int:
    """Bytes of tensor storage in a nested checkpoint dict: what `torch.save` writes, less its small pickle."""
    seen: set[int] = set()

    def walk(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() in seen:  # views share their storage, which is saved once
                return 0
            seen.add(storage.data_ptr())
            return storage.nbytes()
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(walk(v) for v in value)
        return 0

    return walk(obj)


def _size_on_disk(path: Path) -> int:
    if path.is_dir():  # a DeepSpeed checkpoint: a directory of shards
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def room_problem(directory: Path, checkpoint: dict[str, Any]) -> str | None:
    """What stops `checkpoint` fitting in `directory` now, or None.

    The size is the larger of its tensors and the checkpoints already there: under DeepSpeed the optimizer
    state is written by the engine, outside this dict, and the earlier checkpoints show its real size.
    The new file is written beside the old one before replacing it, so it needs its whole size free.
    """
    existing = list(directory.glob("*.ckpt")) if directory.is_dir() else []
    size = max([tensor_bytes(checkpoint), *(_size_on_disk(p) for p in existing)])
    needed = int(size * (1 + ROOM_MARGIN_FRACTION)) + ROOM_MARGIN_BYTES
    probe = directory
    while not probe.exists():  # ModelCheckpoint creates its directory on the first save
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free >= needed:
        return None
    return (
        f"no room for a checkpoint in {directory}: it needs {needed / 2**20:.1f} MiB and {free / 2**20:.1f} MiB is free"
    )


def write_failed_for_space(error: BaseException | None, directory: Path) -> bool:
    """Whether a failed checkpoint write ran out of space or quota in `directory`.

    ENOSPC or EDQUOT (a quota, which free space does not show) anywhere in the error's chain: torch.save
    reports a failed write as a RuntimeError about stream positions, the OSError in its context. Without
    an errno, the disk itself: the partial file still fills it at this point.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return shutil.disk_usage(directory).free < ROOM_MARGIN_BYTES


def disk_full(path: Path) -> DiskFull:
    """The one-line report of a checkpoint write that ran out of space (its partial file is already gone)."""
    kept = f"the previous {path.name} stays" if path.exists() else "nothing was replaced"
    return DiskFull(
        f"the disk filled up while writing checkpoint {path}; the partial file was removed "
        f"and {kept}. Fix: free space in {path.parent}, or point --checkpoint.dirpath at a larger disk",
    )


def write_checkpoint(path: str | Path, write) -> None:
    """`files.atomic_write`, reporting a write that ran out of space or quota as `DiskFull`."""
    path = Path(path)
    atomic_write(path, write, on_error=lambda e: disk_full(path) if write_failed_for_space(e, path.parent) else None)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose saves are atomic on a local or shared POSIX filesystem."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        write_checkpoint(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, *args: Any, weights_only: bool | None = None, **kwargs: Any) -> dict[str, Any]:
        # Tensors and plain types only unless the user asks otherwise (`--weights_only false`): before torch 2.6
        # Lightning's default (None) unpickled whatever the file holds.
        return super().load_checkpoint(*args, weights_only=True if weights_only is None else weights_only, **kwargs)

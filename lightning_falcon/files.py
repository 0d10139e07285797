"""Writes that a crash cannot tear, and reads that run no code.

Checkpoints, tokenized data caches, random-weights checkpoints and exports are written through these:
- `atomic_write`: one file, written beside its target, flushed to disk and renamed over it. On POSIX
  the target is at every moment either the old file or the new one.
- `staged_directory`: a directory built whole under a hidden name beside its target, then renamed
  into place: a tokenized data cache, a random-weights checkpoint, an export. Either it is written
  once (a cache: when another process, perhaps on another node sharing the filesystem, renamed its
  identical copy first, theirs stands), or it replaces the previous one, which is kept until the new
  one is in place (`swap_in_directory`).

Both make what they write readable as the umask allows, as any other file the user creates: a
directory's files included, which libraries may have written private (safetensors writes 0600).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lightning_falcon.errors import ConfigError, first_line
from lightning_falcon.upstream import TORCH_REFUSED_GLOBAL


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (its entry is on disk, not only in the page cache)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(directory: Path) -> None:
    """Give `directory` and everything in it the modes a plain `open`/`mkdir` would have given them.

    mkdtemp makes a directory private to its user, and safetensors writes its files 0600: on a shared
    cluster a teammate could then not read an adapter or a cache this process wrote.
    """
    mask = umask()
    directory.chmod(0o777 & ~mask)
    for path in directory.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[Any], None],
    on_error: Callable[[Exception], Exception | None] | None = None,
) -> None:
    """Call `write(file)` on a temporary file beside `path`, then atomically move it to `path`.

    On any error the temporary file is removed and `path` is untouched. `on_error` may name the error
    better (a full disk): it is asked while the partial file still exists, and what it returns is raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        better = on_error(e) if on_error is not None else None
        if better is not None:
            raise better from e
        raise
    finally:
        tmp.unlink(missing_ok=True)
    fsync_directory(path.parent)


def swap_in_directory(staged: Path, target: Path, tag: str) -> None:
    """Replace directory (or file) `target` with the complete directory `staged`, the previous kept to the end.

    `tag` names the previous copy while both exist: `<stem>.old-<tag><suffix>`, which still matches
    `last*.ckpt` if a crash falls between the two renames.
    """
    old = target.with_name(f"{target.stem}.old-{tag}{target.suffix}")
    if target.exists():
        os.replace(target, old)
    os.replace(staged, target)
    fsync_directory(target.parent)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_directory(target: Path, complete: str | None = None) -> Iterator[Path]:
    """An empty hidden directory beside `target` to write into; it becomes `target` when the block ends cleanly.

    With `complete` (the file a whole copy holds), `target` is written once: if a whole copy appeared
    meanwhile (another process renamed its own first), it stands and this one is dropped, and anything
    else in the way is an error. Without it, an existing `target` is replaced (`swap_in_directory`).
    On an error in the block nothing is renamed and the staged directory is removed.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield staged
        follow_umask(staged)
        if complete is None:
            swap_in_directory(staged, target, tag=staged.name.rsplit("-", 1)[-1])
        else:
            try:
                os.replace(staged, target)
            except OSError:  # a non-empty target is in the way: another process's whole copy, or a stale one
                if not (target / complete).is_file():
                    raise
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def load_weights_only(path: str | os.PathLike, mmap: bool = False) -> Any:
    """`torch.load` of tensors and plain types only, which runs no code a checkpoint's pickle might carry."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(TORCH_REFUSED_GLOBAL, str(e))  # the refused global: the useful part of a long message
        refused = f"it would call {found.group(1)}" if found else first_line(e)
        raise ConfigError(
            f"checkpoint {path} holds Python objects besides tensors, so it does not load with weights_only=True "
            f"({refused}). Fix: use a checkpoint lightning_falcon wrote, which holds none"
        ) from None

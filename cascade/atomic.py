"""Crash-safe file writes: fsync a file or folder, and write a file atomically (hidden temporary name, fsync,
rename into place, fsync the folder), so a kill at any moment leaves either the old file or the new one.

A failed write (a full disk, a quota, a read-only file system) leaves nothing of its own behind:
`write_guard` removes the block's temporary files and partial outputs and names the file in the `OSError`
(errno kept: ENOSPC, EDQUOT, EROFS), which `cascade.errors.describe_failure` turns into one line naming the
disk, its free space and the fix."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_path(path: Path) -> None:
    """Flush ``path`` (a file or a folder, whose entries a rename changed) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_path(path: str | os.PathLike) -> None:
    """Remove a file or a folder tree if present; errors are ignored (a clean-up never hides the cause)."""
    p = Path(path)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


@contextlib.contextmanager
def write_guard(target: str | os.PathLike, *leftovers: str | os.PathLike) -> Iterator[None]:
    """A block that writes ``target``: if it raises, the ``leftovers`` (its temporary files or folders, or
    a partly written ``target``) are removed and an `OSError` without a file name gets ``target`` as its
    ``filename`` (same errno and type), so the one-line report names where the write failed."""
    try:
        yield
    except BaseException as err:
        for path in leftovers:
            remove_path(path)
        if isinstance(err, OSError) and err.errno and err.filename is None:
            raise OSError(err.errno, err.strerror or os.strerror(err.errno), str(target)) from err
        raise


def write_atomic_with(path: Path, write: Callable[[BinaryIO], object], tmp_suffix: str = ".tmp") -> None:
    """Write ``path`` by calling ``write(file)`` on the open temporary file ``.<name><tmp_suffix>`` beside it
    (readers and clean-ups recognise it by that name), fsync it, then rename it into place. On failure the
    temporary file is removed and the `OSError` names ``path`` (see `write_guard`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{tmp_suffix}")
    with write_guard(path, tmp):
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)


def write_atomic(path: Path, data: bytes | str, tmp_suffix: str = ".tmp") -> None:
    """Write ``data`` to ``path`` atomically (see `write_atomic_with`; a str is written as UTF-8)."""
    payload = data.encode() if isinstance(data, str) else data
    write_atomic_with(path, lambda f: f.write(payload), tmp_suffix)

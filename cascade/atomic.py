"""Crash-safe file writes: fsync a file or folder, and write a file atomically (hidden temporary name, fsync,
rename into place, fsync the folder), so a kill at any moment leaves either the old file or the new one."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush ``path`` (a file or a folder, whose entries a rename changed) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes | str, tmp_suffix: str = ".tmp") -> None:
    """Write ``data`` to ``path`` through the temporary file ``.<name><tmp_suffix>`` beside it (readers and
    clean-ups can recognise it by that name), then rename it into place."""
    tmp = path.with_name(f".{path.name}{tmp_suffix}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)

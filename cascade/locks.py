"""One writer per folder: an advisory lock that every tool writing a folder (a run folder, an --out folder)
takes before it writes its outputs there (only `ensure_writable_dir`'s probe file comes and goes before), and
gives back when it is done.

The lock is the file `.cascade.lock` in the folder, held with a POSIX record lock (`fcntl.lockf`: released by
the kernel when its owner ends, however it ends; not inherited by forked children such as data-loader
workers, which may outlive a killed owner for a moment; also honoured across hosts on NFS) and holding the
owner's pid, host, start time and command line, which the message refusing a second writer names. A lock
file left by an owner that was killed (kill -9, a lost node) is taken over with one warning line. Where the
file system has no record locks, the recorded owner decides instead: a live pid on this host, or any owner
on another host, keeps the folder; a pid gone from this host is taken over. Within one process a folder's
lock is held once (record locks are per process: a second `FolderLock` on it is refused without touching
the file, whose closing would let go of the first).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

LOCK_NAME = ".cascade.lock"
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_TAKEN = (errno.EACCES, errno.EAGAIN)
_HELD: dict[Path, dict[str, Any]] = {}  # lock files this process holds → their owner record


class FolderLocked(ValueError):
    """The folder is in use by another live writer (a bad input: exit code 2 at the tools' edge)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _read_owner(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        owner = json.loads(os.read(fd, 65536).decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    return owner if isinstance(owner, dict) else {}


def describe_owner(owner: dict[str, Any]) -> str:
    """"pid 123 on host node1, since 2026-01-01 12:00:00: python tools/x.py ..." (what is known of it)."""
    if not owner:
        return "an unknown process"
    text = f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}"
    if isinstance(owner.get("started"), (int, float)):
        text += f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner['started']))}"
    if owner.get("command"):
        text += f": {owner['command']}"
    return text


class FolderLock:
    """The write lock of ``folder``; ``option`` names it as the user typed it ("run_dir", "--out") in messages.

    `acquire()` creates the folder (and its parents) when missing, then takes the lock or raises FolderLocked
    (one line naming the owner's pid and host, and the fix); nothing else is written to the folder before the
    lock is held. `release()` removes the lock file; both are idempotent. A context manager: `with FolderLock(
    out, "--out"): ...`. A lock file left by a killed owner is taken over with a warning line on stderr.
    With ``enabled=False`` both do nothing: the processes of a multi-process run other than the one that
    writes the folder (rank 0), so that a second run is refused by its rank 0 and torchrun stops the others.
    """

    def __init__(self, folder: str | os.PathLike, option: str, *, enabled: bool = True):
        self.folder = Path(folder).absolute()
        self.option = option
        self.enabled = enabled
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self._created: list[Path] = []  # the folders `acquire` made, removed again by `release` when left empty

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FolderLock:
        if self._fd is not None or not self.enabled:
            return self
        if self.path in _HELD:
            self._refuse(_HELD[self.path])
        self._created = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = self._lock(fd)
                previous = _read_owner(fd)
                if not locked and previous and self._owner_alive(previous):
                    self._refuse(previous)
                if locked and not self._same_file(fd):
                    os.close(fd)  # a releasing owner removed this file in between: lock the new one
                    continue
            except BaseException:
                os.close(fd)
                self._remove_created()
                raise
            break
        if previous:
            print(f"warning: {self.option} {self.folder}: taking over the lock left by {describe_owner(previous)}, "
                  "which no longer runs (killed?)", file=sys.stderr)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        _HELD[self.path] = record
        return self

    def check_free(self) -> None:
        """FolderLocked when another live writer holds the folder now; creates and writes nothing (a check
        before work that writes beside the folder, e.g. hydra's logs; `acquire` still decides)."""
        if self._fd is not None or not self.enabled:
            return
        if self.path in _HELD:
            self._refuse(_HELD[self.path])
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return
        try:
            if not self._lock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB):
                owner = _read_owner(fd)
                if owner and self._owner_alive(owner):
                    self._refuse(owner)
        finally:
            os.close(fd)  # gives back the shared lock

    def _lock(self, fd: int, mode: int = fcntl.LOCK_EX | fcntl.LOCK_NB) -> bool:
        """True when the kernel lock is held; False where the file system has none; FolderLocked when taken."""
        try:
            fcntl.lockf(fd, mode)
        except OSError as err:
            if err.errno in _TAKEN:
                self._refuse(_read_owner(fd))
            if err.errno not in _NO_LOCKS:
                raise
            return False
        return True

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    @staticmethod
    def _owner_alive(owner: dict[str, Any]) -> bool:
        if owner.get("host") != socket.gethostname():
            return True  # a process on another host cannot be checked from here
        pid = owner.get("pid")
        return isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid)

    def _refuse(self, owner: dict[str, Any]) -> None:
        raise FolderLocked(f"{self.option} {self.folder} is in use by another run ({describe_owner(owner)}); wait "
                           f"for it to finish or choose another {self.option}")

    def release(self) -> None:
        """Remove the lock file and give the lock back, and the folders `acquire` created if they are empty
        now (a run refused or failed before it wrote anything leaves nothing); a no-op when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD.pop(self.path, None)
        try:
            if self._same_file(fd):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: kept, with its parents
        self._created = []

    def __enter__(self) -> FolderLock:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["LOCK_NAME", "FolderLock", "FolderLocked", "describe_owner"]

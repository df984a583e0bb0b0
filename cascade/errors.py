"""Failure and interruption conventions shared by the library's long-running parts and the tools.

- A bad input prints one line `<prog>: error: <message>` on stderr and exits with 2.
- A failure during a run prints one line naming the cause and, where known, the fix; exit code 1.
- A stop signal prints one line and exits with 128 + the signal: Ctrl-C / SIGINT 130, SIGTERM 143 (what Slurm,
  Kubernetes, `docker stop` and `timeout` send on preemption), SIGUSR1 138 (Slurm's `--signal` warning).
- Tracebacks are shown only with the debug flag: `CASCADE_DEBUG=1` (or hydra's `HYDRA_FULL_ERROR=1`).

Helpers: `cli_main` (the decorator applying these rules to a tool's `main`), `stop_signals_raise` (SIGTERM and
SIGUSR1 raise `StopSignal`, a KeyboardInterrupt, as SIGINT does), `GracefulInterrupt` (any stop signal → a flag
a loop checks at a safe point), `deferred_interrupts` (a block that a stop signal cannot cut in two),
`ensure_writable_dir` (an output folder checked before any work starts), `plural` (a count and its noun).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

DEBUG_ENV_VARS = ("CASCADE_DEBUG", "HYDRA_FULL_ERROR")
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, the shell's code for a process stopped by SIGINT
DEBUG_HINT = "rerun with CASCADE_DEBUG=1 for the traceback"
# The signals that stop a run at a safe point: Ctrl-C, preemption (Slurm, Kubernetes, docker stop, timeout) and
# Slurm's advance warning (`sbatch --signal=USR1@60`).
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, name))


def exit_code(signum: int) -> int:
    """The shell's exit code of a process stopped by ``signum``: 128 + the signal number (SIGTERM → 143)."""
    return 128 + int(signum)


def interrupted_by(signum: int) -> str:
    """"interrupted" for SIGINT (Ctrl-C), "interrupted by SIGTERM" (or the signal's name) for any other."""
    return "interrupted" if signum == signal.SIGINT else f"interrupted by {signal.Signals(signum).name}"


class StopSignal(KeyboardInterrupt):
    """A stop signal (`STOP_SIGNALS`) raised in the main thread as a KeyboardInterrupt; ``signum`` names it."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(signal.Signals(self.signum).name)


def signal_of(err: BaseException) -> int:
    """The signal behind an interrupt: ``err.signum`` where set, else SIGINT (Python's own KeyboardInterrupt)."""
    return int(getattr(err, "signum", signal.SIGINT))


class Interrupted(Exception):
    """A run stopped by a stop signal (``signum``, default SIGINT) at a safe point; the message says what was
    kept and how to go on."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        self.signum = int(signum)
        super().__init__(message)


class OutputNotWritable(ValueError):
    """An output folder that cannot be created or written to (checked before any work starts)."""


def debug_enabled() -> bool:
    """True when CASCADE_DEBUG or HYDRA_FULL_ERROR is set to a non-empty value other than 0."""
    return any(os.environ.get(name, "") not in ("", "0") for name in DEBUG_ENV_VARS)


def one_line(text: object, limit: int = 400) -> str:
    """``text`` with line breaks and runs of whitespace collapsed to single spaces, cut at ``limit`` chars."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """``n`` and the noun in the number it takes: plural(1, "image") → "1 image", plural(3, "class", "classes")
    → "3 classes" (``nouns`` defaults to ``noun`` + "s")."""
    return f"{n} {noun if n == 1 else (nouns or noun + 's')}"


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)  # no space left / disk quota exceeded
MIN_FREE_BYTES = 256 * 1024  # an output folder's disk needs at least this much free to start a run


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def disk_space(path: str | os.PathLike) -> str:
    """"<folder>: <free> free of <total>" for the disk holding ``path`` (its nearest existing folder), or ""
    when that cannot be read."""
    folder = Path(path).absolute()
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return ""
    return f"{folder}: {_size(usage.free)} free of {_size(usage.total)}"


def describe_failure(err: BaseException) -> str:
    """One line naming the cause of an unexpected failure and, for the common kinds, the fix. A full disk
    (ENOSPC, EDQUOT) whose error names a file also names that disk's folder and free space."""
    message = one_line(err) or type(err).__name__
    if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
        where = disk_space(err.filename) if err.filename else ""
        if not where:
            return f"{message}: the disk is full; free space, then run the same command again"
        return (f"{message}: the disk ran out of space ({where} now, partial files removed); free space there "
                "or choose another folder, then run the same command again")
    if isinstance(err, OSError) and err.errno == errno.EROFS:
        return f"{message}: the file system is read-only; choose a writable folder"
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM):
        return f"{message}: not allowed to write there; choose a writable folder"
    if isinstance(err, MemoryError) or "out of memory" in message.lower():
        return f"{type(err).__name__}: {message}: out of memory; lower the batch size"
    return f"{type(err).__name__}: {message} ({DEBUG_HINT})"


def ensure_writable_dir(path: str | os.PathLike, option: str) -> Path:
    """Check, before any work starts, that the folder ``path`` exists and takes new files, or can be created;
    OutputNotWritable (one line naming ``option``, e.g. "run_dir" or "--out") otherwise, also when its disk
    has less than ``MIN_FREE_BYTES`` free (a full disk, told before any work). Creates nothing: the check
    writes and removes one empty file in the folder or its nearest existing parent."""
    folder = Path(path).absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputNotWritable(f"{option} {folder} cannot be created: {existing} is a file; choose another {option}")
    probe = existing / f".write-test-{os.getpid()}-{threading.get_ident()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise OutputNotWritable(f"{option} {folder} is not writable ({reason} in {existing}); choose a writable "
                                f"{option}") from None
    if shutil.disk_usage(existing).free < MIN_FREE_BYTES:
        raise OutputNotWritable(f"{option} {folder}: the disk is full ({disk_space(existing)}); free space there "
                                f"or choose another {option}")
    return folder


class _SignalHandlers:
    """Installs ``handler`` for ``signals`` in the main thread, restoring the previous handlers on exit; elsewhere
    (signal handlers can be set only in the main thread) it does nothing."""

    def __init__(self, handler: Callable, signals: tuple[int, ...] = STOP_SIGNALS):
        self._handler, self._signals = handler, signals
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handler) for s in self._signals}

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


def _raise_stop(signum, frame) -> None:
    raise StopSignal(signum)


def stop_signals_raise() -> contextlib.AbstractContextManager:
    """A block in which SIGTERM and SIGUSR1 raise `StopSignal` (a KeyboardInterrupt naming the signal) as SIGINT
    raises KeyboardInterrupt: the code that cleans up after a Ctrl-C then runs for a preemption too, instead of
    the process dying at once with nothing said. SIGINT keeps its handler. `cli_main` wraps a tool in it."""
    return _SignalHandlers(_raise_stop, tuple(s for s in STOP_SIGNALS if s != signal.SIGINT))


class GracefulInterrupt:
    """Turns the stop signals (SIGINT, SIGTERM, SIGUSR1) into a flag (``requested``) that a loop checks at a safe
    point; ``signum`` is the first signal received (None before any), ``exit_code`` its 128 + signal.

    Installed only in the main thread (signal handlers can be set nowhere else); the previous handlers are
    restored on exit. The ``force_after``-th signal raises `StopSignal` (a KeyboardInterrupt) at once (a stuck
    run stays stoppable; torchrun forwards the terminal's Ctrl-C and a SIGTERM it receives, so each process
    may see two per key press or preemption).
    """

    def __init__(self, force_after: int = 3):
        self.count = 0
        self.signum: int | None = None
        self.force_after = force_after
        self._handlers = _SignalHandlers(self._handle)

    @property
    def requested(self) -> bool:
        return self.count > 0

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum if self.signum is not None else signal.SIGINT)

    def _handle(self, signum, frame) -> None:
        self.count += 1
        self.signum = self.signum or int(signum)
        if self.count >= self.force_after:
            raise StopSignal(self.signum)

    def __enter__(self) -> GracefulInterrupt:  # noqa: PYI034 - Python 3.10 has no typing.Self
        self._handlers.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._handlers.__exit__(*exc)


def ignore_stop_signals(*_: object) -> None:
    """In a worker process (e.g. a DataLoader's ``worker_init_fn``; any arguments are ignored): ignore the stop
    signals. They reach every process of a terminal's or a job's group (Ctrl-C; Slurm's SIGTERM); the main
    process alone then stops the run at a safe point and ends its workers the usual way."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold the stop signals for the duration of the block (e.g. renaming finished outputs into place), then
    raise `StopSignal` for the first one that arrived; outside the main thread the block runs unprotected."""
    with GracefulInterrupt(force_after=1 << 30) as guard:
        yield
    if guard.requested:
        raise StopSignal(guard.signum)


def print_error(prog: str, message: str) -> None:
    print(f"{prog}: error: {one_line(message, limit=2000)}", file=sys.stderr)


def cli_main(prog: str, *, bad_input: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError),
             interrupted: str = "interrupted; run the same command to start again") -> Callable:
    """Decorator for a tool's ``main``: bad input (``bad_input`` types) → one line, exit code 2; any other
    error → one line naming cause (and fix), exit code 1; `Interrupted` → its message, 128 + its signal;
    Ctrl-C, SIGTERM or SIGUSR1 (KeyboardInterrupt, `StopSignal`: `stop_signals_raise` is in force while
    ``main`` runs) → ``interrupted`` (its leading "interrupted" naming the signal when it is not SIGINT),
    128 + the signal. With the debug flag errors propagate with their traceback. The wrapped function
    returns the exit code instead of raising (SystemExit passes through)."""

    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def wrapper(*args, **kwargs):
            try:
                with stop_signals_raise():
                    return main(*args, **kwargs)
            except Interrupted as err:
                print(f"{prog}: {err}", file=sys.stderr)
                return exit_code(err.signum)
            except KeyboardInterrupt as err:
                if debug_enabled():
                    traceback.print_exc()
                signum = signal_of(err)
                line = interrupted
                if signum != signal.SIGINT and line.startswith("interrupted"):
                    line = interrupted_by(signum) + line.removeprefix("interrupted")
                print(f"{prog}: {line}", file=sys.stderr)
                return exit_code(signum)
            except bad_input as err:
                if debug_enabled():
                    raise
                print_error(prog, str(err))
                return EXIT_USAGE
            except Exception as err:  # the one-line rule covers every failure
                if debug_enabled():
                    raise
                print_error(prog, describe_failure(err))
                return EXIT_FAILURE

        return wrapper

    return decorate


__all__ = ["DEBUG_ENV_VARS", "DISK_FULL_ERRNOS", "EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_USAGE",
           "MIN_FREE_BYTES", "STOP_SIGNALS", "GracefulInterrupt", "Interrupted", "OutputNotWritable",
           "StopSignal", "cli_main", "debug_enabled", "deferred_interrupts", "describe_failure",
           "disk_space", "ensure_writable_dir", "exit_code", "ignore_stop_signals", "interrupted_by",
           "one_line", "plural", "print_error", "signal_of", "stop_signals_raise"]

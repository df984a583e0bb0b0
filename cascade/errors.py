"""Failure and interruption conventions shared by the library's long-running parts and the tools.

- A bad input prints one line `<prog>: error: <message>` on stderr and exits with 2.
- A failure during a run prints one line naming the cause and, where known, the fix; exit code 1.
- An interrupt (Ctrl-C, `timeout --signal=INT`) prints one line and exits with 130 (128 + SIGINT).
- Tracebacks are shown only with the debug flag: `CASCADE_DEBUG=1` (or hydra's `HYDRA_FULL_ERROR=1`).

Helpers: `cli_main` (the decorator applying these rules to a tool's `main`), `GracefulInterrupt` (SIGINT →
a flag a loop checks at a safe point), `deferred_interrupts` (a block that a Ctrl-C cannot cut in two),
`ensure_writable_dir` (an output folder checked before any work starts).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
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


class Interrupted(Exception):
    """A run stopped by an interrupt at a safe point; the message says what was kept and how to go on."""


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


def describe_failure(err: BaseException) -> str:
    """One line naming the cause of an unexpected failure and, for the common kinds, the fix."""
    message = one_line(err) or type(err).__name__
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return f"{message}: the disk is full; free space, then run the same command again"
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{message}: not allowed to write there; choose a writable folder"
    if isinstance(err, MemoryError) or "out of memory" in message.lower():
        return f"{type(err).__name__}: {message}: out of memory; lower the batch size"
    return f"{type(err).__name__}: {message} ({DEBUG_HINT})"


def ensure_writable_dir(path: str | os.PathLike, option: str) -> Path:
    """Check, before any work starts, that the folder ``path`` exists and takes new files, or can be created;
    OutputNotWritable (one line naming ``option``, e.g. "run_dir" or "--out") otherwise. Creates nothing:
    the check writes and removes one empty file in the folder or its nearest existing parent."""
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
    return folder


class GracefulInterrupt:
    """Turns SIGINT into a flag (``requested``) that a loop checks at a safe point.

    Installed only in the main thread (signal handlers can be set nowhere else); the previous handler is
    restored on exit. The ``force_after``-th SIGINT raises KeyboardInterrupt at once (a stuck run stays
    stoppable; torchrun forwards the terminal's Ctrl-C, so each process may see two per key press).
    """

    def __init__(self, force_after: int = 3):
        self.count = 0
        self.force_after = force_after
        self._previous: Any = None
        self._installed = False

    @property
    def requested(self) -> bool:
        return self.count > 0

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.count >= self.force_after:
            raise KeyboardInterrupt

    def __enter__(self) -> GracefulInterrupt:  # noqa: PYI034 - Python 3.10 has no typing.Self
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT for the duration of the block (e.g. renaming finished outputs into place), then raise
    KeyboardInterrupt if one arrived; outside the main thread the block runs unprotected."""
    with GracefulInterrupt(force_after=1 << 30) as guard:
        yield
    if guard.requested:
        raise KeyboardInterrupt


def print_error(prog: str, message: str) -> None:
    print(f"{prog}: error: {one_line(message, limit=2000)}", file=sys.stderr)


def cli_main(prog: str, *, bad_input: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError),
             interrupted: str = "interrupted; run the same command to start again") -> Callable:
    """Decorator for a tool's ``main``: bad input (``bad_input`` types) → one line, exit code 2; any other
    error → one line naming cause (and fix), exit code 1; `Interrupted` → its message, 130; Ctrl-C
    (KeyboardInterrupt) → ``interrupted``, 130. With the debug flag errors propagate with their traceback.
    The wrapped function returns the exit code instead of raising (SystemExit passes through)."""

    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def wrapper(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except Interrupted as err:
                print(f"{prog}: {err}", file=sys.stderr)
                return EXIT_INTERRUPTED
            except KeyboardInterrupt:
                if debug_enabled():
                    traceback.print_exc()
                print(f"{prog}: {interrupted}", file=sys.stderr)
                return EXIT_INTERRUPTED
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


__all__ = ["DEBUG_ENV_VARS", "EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_USAGE", "GracefulInterrupt", "Interrupted",
           "OutputNotWritable", "cli_main", "debug_enabled", "deferred_interrupts", "describe_failure",
           "ensure_writable_dir", "one_line", "plural", "print_error"]

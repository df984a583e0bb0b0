"""The start-up summary every command that trains, samples or evaluates prints: one short block of
``name: value`` lines on stderr, before the work starts, so a log file says what ran on what."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TextIO

__all__ = ["format_count", "format_summary", "print_summary", "read_summary"]


def format_count(n: float) -> str:
    """``n`` with an SI suffix and three significant digits: 1234567 → "1.23M", 2.5e9 → "2.50G", 512 → "512"."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}" if isinstance(n, float) and not float(n).is_integer() else str(int(n))


def format_summary(title: str, rows: Iterable[tuple[str, object]]) -> str:
    """A block: ``title`` then one ``  name : value`` line per row (names padded to one column); rows whose value
    is None are left out. No trailing newline."""
    rows = [(str(k), str(v)) for k, v in rows if v is not None]
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join([title, *(f"  {k.ljust(width)} : {v}" for k, v in rows)])


def print_summary(title: str, rows: Iterable[tuple[str, object]], file: TextIO | None = None) -> None:
    """Print `format_summary` to ``file`` (stderr by default: stdout stays for a command's results), flushed."""
    out = file if file is not None else sys.stderr
    print(format_summary(title, rows), file=out, flush=True)


def read_summary(text: str) -> dict[str, str]:
    """The ``name : value`` rows of every summary block in ``text`` (the inverse of `format_summary`'s rows; other
    lines, e.g. log lines or progress bars, are skipped). A later block's row replaces an earlier one of that name."""
    rows = {}
    for line in text.splitlines():
        name, sep, value = line.partition(" : ")
        if sep and line.startswith("  "):
            rows[name.strip()] = value
    return rows

"""What a training run prints while it trains (main process, stderr).

On a terminal (stderr a TTY) with ``trainer.progress=true``: a tqdm bar, with loss, img/s and the ETA in its
postfix. Otherwise (stderr a file or a pipe, or ``progress=false``): plain lines, never a carriage return, one
every ``trainer.log_seconds`` seconds (at the first logging window after that time, or between windows when a
window takes longer), plus the first window's and the last step's, so a log file grows by a line per
``log_seconds`` however fast the steps are::

    base32 step 120/2000 (6%) loss 0.1234 lr 2.00e-04 img/s 85.3 elapsed 0:01:23 eta 0:21:40

The ETA is the sooner of max_steps (at this invocation's rate, checkpoints and grids included) and the time
budget (``max_seconds``).
"""

from __future__ import annotations

import math
import re
import sys
import time
from typing import Any, TextIO

from tqdm.auto import tqdm

__all__ = ["ProgressDisplay", "eta_seconds", "format_duration", "is_run_output", "plain_line"]

_RUN_OUTPUT = re.compile(r"training \S+|quality proxy: .*|run report: .*|\S+ step \d+/\d+ \(\d+%\) .*")


def is_run_output(line: str) -> bool:
    """Whether a stderr line is what a training run prints as it goes (not a warning, an error or a stop): its
    start-up summary (title "training <stage>", indented rows), the quality proxy's set-up line, a plain line,
    the run report's path."""
    return line.startswith("  ") or _RUN_OUTPUT.fullmatch(line) is not None


def format_duration(seconds: float | None) -> str:
    """``seconds`` as h:mm:ss ("?" when unknown or infinite)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def eta_seconds(step: int, start_step: int, max_steps: int, elapsed: float, max_seconds: float) -> float | None:
    """Seconds left: the sooner of the steps left at the rate so far ((step − start_step) / elapsed) and, with a
    budget (``max_seconds`` > 0), the budget left. None when neither is known yet."""
    etas = []
    if step > start_step and elapsed > 0:
        etas.append((max_steps - step) * elapsed / (step - start_step))
    if max_seconds > 0:
        etas.append(max(0.0, max_seconds - elapsed))
    return min(etas) if etas else None


def plain_line(name: str, step: int, max_steps: int, *, loss: float | None, lr: float, img_per_s: float | None,
               elapsed: float, eta: float | None) -> str:
    """One log line (no carriage return) of a run at ``step``."""
    loss_text = "?" if loss is None else f"{loss:.4g}"
    rate = "?" if img_per_s is None else f"{img_per_s:.1f}"
    return (f"{name} step {step}/{max_steps} ({100 * step / max_steps:.0f}%) loss {loss_text} lr {lr:.2e} "
            f"img/s {rate} elapsed {format_duration(elapsed)} eta {format_duration(eta)}")


class ProgressDisplay:
    """The progress of one run on ``stream`` (stderr): a tqdm bar when ``bar`` (``trainer.progress``) and the
    stream is a TTY, else plain lines (`plain_line`); nothing at all when not ``enabled`` (a process other than
    the main one). ``clock``: seconds (time.perf_counter), replaceable in tests.

    Per step `advance(step)`; per logging window `window(record)` (a plain line when it is the first, the one at
    max_steps or ``log_seconds`` after the last line); `due()` says whether ``log_seconds`` passed since the last
    plain line (between windows the trainer then calls `line` with the main process's own window values);
    `close()` prints the last window's line if it was not printed."""

    def __init__(self, name: str, *, start_step: int, max_steps: int, max_seconds: float, log_seconds: float,
                 bar: bool, enabled: bool, stream: TextIO | None = None, clock=time.perf_counter):
        self.name, self.start_step, self.max_steps = name, start_step, max_steps
        self.max_seconds, self.log_seconds, self.enabled, self.clock = max_seconds, log_seconds, enabled, clock
        self.stream = stream if stream is not None else sys.stderr
        is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = tqdm(total=max_steps, initial=start_step, desc=name, unit="step", file=self.stream,
                        dynamic_ncols=True) if enabled and bar and is_tty else None
        self.started = self.last_line = clock()
        self.step = start_step
        self.printed_step: int | None = None  # the step of the last plain line
        self.last_record: dict[str, Any] | None = None  # the last window not yet printed

    @property
    def plain(self) -> bool:
        """Whether this display prints plain lines (enabled, no bar)."""
        return self.enabled and self.bar is None

    def elapsed(self) -> float:
        return self.clock() - self.started

    def eta(self) -> float | None:
        return eta_seconds(self.step, self.start_step, self.max_steps, self.elapsed(), self.max_seconds)

    def advance(self, step: int) -> None:
        self.step = step
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def due(self) -> bool:
        """A plain display's time line is due (``log_seconds`` since the last line)."""
        return self.plain and self.clock() - self.last_line >= self.log_seconds

    def line(self, *, loss: float | None, lr: float, img_per_s: float | None) -> None:
        """Print a plain line at the current step."""
        if not self.plain:
            return
        print(plain_line(self.name, self.step, self.max_steps, loss=loss, lr=lr, img_per_s=img_per_s,
                         elapsed=self.elapsed(), eta=self.eta()), file=self.stream, flush=True)
        self.last_line = self.clock()
        self.printed_step = self.step

    def window(self, record: dict[str, Any]) -> None:
        """A logging window's record (`cascade.training.metrics_log.window_record`): the bar's postfix or a line."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{record['loss']:.4g}", img_s=f"{record['img_per_s'] or 0:.1f}",
                                 eta=format_duration(self.eta()), refresh=False)
        elif self.printed_step is None or self.step >= self.max_steps or self.due():
            self.line(loss=record["loss"], lr=record["lr"], img_per_s=record["img_per_s"])
            self.last_record = None
        else:
            self.last_record = record

    def close(self) -> None:
        """Close the bar, or print the last window's line when it was not printed."""
        if self.bar is not None:
            self.bar.close()
        elif self.last_record is not None and self.printed_step != self.step:
            record, self.last_record = self.last_record, None
            self.line(loss=record["loss"], lr=record["lr"], img_per_s=record["img_per_s"])

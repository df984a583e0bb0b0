"""When the stage trainer's loop stops early: a stop signal, or too many non-finite steps in a row.

`StopCheck` runs at the top of every step. It reads the count of non-finite steps in a row as the host last
saw it (`NonFiniteWatch`: free on CPU, one step behind on CUDA, never stalling the GPU) and the stop signal
this process got (`cascade.errors.GracefulInterrupt`: SIGINT, SIGTERM, SIGUSR1); with several processes one
two-integer CPU all-reduce (gloo) makes every process stop at the same step with the same answer. Too many
non-finite steps raise `NonFiniteLossError` (no checkpoint of that state is written); a signal is returned
for the loop to checkpoint the step and raise `TrainingInterrupted`.
"""

from __future__ import annotations

import signal
from pathlib import Path

import torch

from cascade import checkpoint
from cascade.errors import GracefulInterrupt, Interrupted, interrupted_by

__all__ = ["NonFiniteLossError", "NonFiniteWatch", "StopCheck", "TrainingInterrupted"]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN or infinite loss."""


class TrainingInterrupted(Interrupted):
    """A stop signal (``signum``: SIGINT, SIGTERM, SIGUSR1) stopped the run at ``step``; ``checkpoint`` holds that
    step (None if nothing was trained)."""

    def __init__(self, step: int, checkpoint_path: Path | None, signum: int = signal.SIGINT):
        self.step, self.checkpoint = step, checkpoint_path
        super().__init__(f"{interrupted_by(signum)} at step {step}; run the same command to resume", signum)


class NonFiniteWatch:
    """The host's view of the consecutive non-finite step counter (``nan_in_row``, a 0-dim long tensor that
    `cascade.training.step.TrainStep` updates on the device), read every step without stalling an accelerator.

    ``record(step)`` after each optimizer step; ``read()`` → (non-finite steps in a row, the step they end at;
    step None before any). On CPU (any device but CUDA) reading costs nothing and gives the latest step. On
    CUDA ``record`` copies the counter into pinned host memory behind the step's kernels and ``read`` gives the
    step before the latest, waiting only for that copy while the latest step still runs: a run stopping on
    it has computed one step more than the limit, which it neither logs nor checkpoints.
    """

    def __init__(self, nan_in_row: torch.Tensor):
        self.counter = nan_in_row
        self.cuda = nan_in_row.device.type == "cuda"
        self._latest: tuple[int, int | None] = (0, None)
        self._recorded = 0
        if self.cuda:
            self._host = [torch.zeros((), dtype=torch.long).pin_memory() for _ in range(2)]
            self._events = [torch.cuda.Event() for _ in range(2)]
            self._steps: list[int | None] = [None, None]

    def record(self, step: int) -> None:
        if not self.cuda:
            self._latest = (int(self.counter), step)
            return
        slot = self._recorded % 2
        self._host[slot].copy_(self.counter, non_blocking=True)
        self._events[slot].record()
        self._steps[slot] = step
        self._recorded += 1

    def read(self) -> tuple[int, int | None]:
        if not self.cuda or self._recorded < 2:
            return self._latest
        slot = self._recorded % 2  # the older of the two copies: the step before the latest
        self._events[slot].synchronize()
        return int(self._host[slot]), self._steps[slot]


class StopCheck:
    """The per-step stop decision of a run writing to ``run_dir`` with ``limit`` = trainer.max_nan_in_row (≥ 1)
    over ``world_size`` processes (``group``: a gloo process group, None for the default one).

    ``record(step)`` after each step; ``check(interrupt)`` before the next → the stop signal any process got (0
    if none), raising `NonFiniteLossError` first if any process saw ``limit`` non-finite steps in a row;
    ``check_count(in_row, step)`` raises it for a count already agreed on (the logging window's)."""

    def __init__(self, nan_in_row: torch.Tensor, *, limit: int, run_dir: Path, world_size: int, group=None):
        self.watch = NonFiniteWatch(nan_in_row)
        self.limit, self.run_dir, self.world_size, self.group = limit, Path(run_dir), world_size, group

    def record(self, step: int) -> None:
        self.watch.record(step)

    def check(self, interrupt: GracefulInterrupt) -> int:
        in_row, at = self.watch.read()
        signum = interrupt.signum or 0
        if self.world_size > 1:
            flags = torch.tensor([signum, in_row], dtype=torch.int64)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=self.group)
            signum, in_row = int(flags[0]), int(flags[1])
        self.check_count(in_row, at)
        return signum

    def check_count(self, in_row: int, step: int | None) -> None:
        if in_row >= self.limit:
            last = checkpoint.latest_checkpoint(self.run_dir)
            raise NonFiniteLossError(
                f"stopping at step {step}: the loss was NaN or infinite for {in_row} steps in a row "
                f"(trainer.max_nan_in_row={self.limit}); "
                + (f"the last good checkpoint is {last}" if last else "no checkpoint was written"))

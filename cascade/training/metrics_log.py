"""The training run's metrics: one JSON record per logging window (`window_record`) appended to
``metrics.jsonl`` in the run folder (`MetricsLog`): one line per logged step, the step's sample grid time and
quality proxy numbers merged into it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from cascade.atomic import write_atomic, write_guard

__all__ = ["METRICS_FILE", "MetricsLog", "window_record"]

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """JSONL metrics in the run folder (main process); on resume, records after the resumed step go. A write
    that fails (a full disk: OSError ENOSPC naming the file) leaves the file as it was before it."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is None:
            write_atomic(path, "")
        elif path.is_file():
            kept = [ln for ln in path.read_text(errors="replace").splitlines() if self._step_of(ln) is not None
                    and self._step_of(ln) <= resume_step]
            write_atomic(path, "".join(ln + "\n" for ln in kept))

    @staticmethod
    def _step_of(line: str) -> int | None:
        """The step of a record line, None for a blank or cut-off one (a run killed mid-write)."""
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            return None

    def write(self, record: dict[str, Any]) -> None:
        data = memoryview((json.dumps(record) + "\n").encode())
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            start = os.fstat(fd).st_size
            with write_guard(self.path):
                try:
                    while data:
                        data = data[os.write(fd, data):]
                except OSError:
                    os.ftruncate(fd, start)  # no cut-off record left behind
                    raise
        finally:
            os.close(fd)


def window_record(sums: dict[str, torch.Tensor], *, step: int, steps: int, images: int, seconds: float,
                  world_size: int, lr: float, nan_skips: int, classifier: bool) -> dict[str, Any]:
    """The record of one logging window from its sums over every process (`cascade.training.step.new_window`,
    reduced): mean loss and gradient norm per trained step (skipped steps add 0), the mean loss per quarter of the
    timestep range (None where no finite loss fell), the rate ``lr`` of the last step, the window's ``seconds`` of
    training (no checkpoint, grid or proxy time) and the images per second over them, the non-finite steps
    skipped so far and, for a classifier, its accuracy in [0, 1]. The trainer adds ``grid_seconds`` and the
    quality proxy's keys (``proxy_*``, `cascade.evaluation.proxy`) to the record of the step they were taken at."""
    per_step = max(steps, 1)
    loss_sum, grad_sum = float(sums["loss"]) / world_size, float(sums["grad_norm"]) / world_size
    q_sum, q_count = sums["q_sum"].tolist(), sums["q_count"].tolist()
    record = {"step": step, "loss": loss_sum / per_step,
              **{f"loss_q{i}": (q_sum[i] / q_count[i] if q_count[i] else None) for i in range(4)},
              "lr": lr, "grad_norm": grad_sum / per_step,
              "seconds": seconds, "img_per_s": images / seconds if seconds > 0 else None, "nan_skips": nan_skips}
    if classifier:
        record["accuracy"] = float(sums["correct"]) / max(float(sums["seen"]), 1.0)
    return record

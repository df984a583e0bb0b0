"""Where a training run resumes: the checkpoint ``resume`` names (never / auto / a path), read whole, with
``resume=auto`` stepping back past damaged checkpoints to the newest readable one, and where in its data
segment the run picks up (`resume_segment`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from cascade import checkpoint
from cascade.config import StageConfig
from cascade.training.runtime import warn

__all__ = ["SEGMENT_STEPS", "ResumePoint", "read_resume_point", "resume_candidates", "resume_segment"]


class ResumePoint(NamedTuple):
    """A checkpoint to resume from: its step folder, model and EMA weights and training state (all None: start
    afresh)."""

    path: Path | None
    model_weights: dict[str, torch.Tensor] | None
    ema_weights: dict[str, torch.Tensor] | None
    state: dict[str, Any] | None


def _stage_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _stage_differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} → {vb!r}")
    return out


def resume_candidates(run_dir: Path, resume: str) -> list[Path]:
    """Checkpoints to try, in order: resume=auto tries older ones when the newest is damaged; resume=never
    raises ValueError when ``run_dir`` already holds a checkpoint; a path names one."""
    if resume == "never":
        found = checkpoint.latest_checkpoint(run_dir)
        if found is not None:
            raise ValueError(f"{run_dir} already holds checkpoint {found}; use resume=auto to continue "
                             "it or choose another run_dir")
        return []
    if resume == "auto":
        return checkpoint.checkpoint_candidates(run_dir)
    return [checkpoint.resolve_checkpoint(resume)]


def read_resume_point(run_dir: Path, resume: str, stage: StageConfig, device: torch.device, *,
                      main_process: bool, model: nn.Module | None = None) -> ResumePoint:
    """The newest readable checkpoint to resume (EMA weights on ``device``). ValueError (one line) when its stage
    configuration differs from ``stage`` or every candidate is damaged; `checkpoint.CheckpointError` for a damaged
    checkpoint (a missing or unreadable file, invalid settings in config.json, or, given the run's ``model``,
    weights that do not fit it) unless resume=auto, which warns (main process) and tries the next older one."""
    damaged = []
    for path in resume_candidates(run_dir, resume):
        try:
            recorded = checkpoint.load_stage_config(path)
            # through StageConfig: a record written before a field existed compares with its default
            diff = _stage_differences(recorded.to_dict(), stage.to_dict())
            if diff:  # a plain ValueError: not damage, resume=auto stops here
                raise ValueError(f"cannot resume from {path}: its stage configuration differs from "
                                 f"this run's ({'; '.join(diff)})")
            model_w = checkpoint.load_weights(path, "model")
            ema_w = checkpoint.load_weights(path, "ema", device=device)
            state = checkpoint.load_training_state(path)
            if model is not None:  # the run's network, the one config.json describes
                checkpoint.check_weights_fit(model, model_w, path, "model")
                checkpoint.check_weights_fit(model, ema_w, path, "ema")
        except checkpoint.CheckpointError as err:
            if resume != "auto":
                raise
            damaged.append(path)
            if main_process:
                warn(f"checkpoint {path} is damaged, skipping it: {err}")
            continue
        if damaged and main_process:
            warn(f"resuming from the older checkpoint {path} instead of the damaged {damaged[0]}")
        return ResumePoint(path, model_w, ema_w, state)
    if damaged:
        raise ValueError(f"every checkpoint in {run_dir / checkpoint.CHECKPOINTS_DIR} is damaged (newest: "
                         f"{damaged[0]}); move them away to start afresh, or resume=PATH from a copy")
    return ResumePoint(None, None, None, None)


SEGMENT_STEPS = 1000  # a new data segment every this many steps (and at the final checkpoint)


def resume_segment(state: dict | None, step: int, world_size: int, rank: int) -> tuple[int, list | None, dict | None]:
    """Where a run resuming from the training ``state`` of a checkpoint at ``step`` picks up its data stream:
    (the segment's first step, every rank's RNG states at that start, this rank's RNG state at ``step``, or None
    where the checkpoint starts a segment itself: a fresh run, a checkpoint on a segment boundary or written by
    another number of processes). Resuming within a segment skips its batches up to ``step``: at most
    ``SEGMENT_STEPS`` - 1 steps' worth, loaded but not trained on."""
    if state is None:
        return step, None, None
    start = int(state.get("data", {}).get("segment_start", step))
    at_step = state.get("rng_at_step")
    if start == step or at_step is None or len(at_step) != world_size:
        return step, state["rng"], None
    return start, state["rng"], at_step[rank]

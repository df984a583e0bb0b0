"""The trainer's sample grids: PNGs of EMA samples written while a stage trains, sampled through the one stage
sampler (`cascade.pipeline.stage_sampling.sample_stage`) with the stage's own `SamplingSettings`.

Base stages: one row per class (up to ``count`` classes), ``count`` samples each. SR stages: ``count`` val
inputs as three rows: the low-resolution input upsampled, the sample, the real image. The noise is seeded by
the run's seed per sample, so the grids of one run differ only by the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cascade.atomic import write_atomic_with
from cascade.config import StageConfig, StageKind
from cascade.evaluation.val_inputs import read_val_inputs as read_grid_inputs
from cascade.imageops import image_grid, upsample
from cascade.pipeline.plan import monitor_settings
from cascade.pipeline.stage_sampling import sample_stage

__all__ = ["read_grid_inputs", "write_sample_grid"]


@torch.no_grad()
def write_sample_grid(path: Path, model: torch.nn.Module, diffusion: Any, stage: StageConfig, *, steps: int | str,
                      count: int, seed: int, device: torch.device, inputs: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a PNG grid of ``model``'s samples to ``path`` (its folder is made) and return ``path``.

    ``diffusion``: the stage's, on its training timesteps; ``steps``: the respaced steps to sample over (replacing
    ``stage.sampling.steps``, except a consistency student's: `cascade.pipeline.plan.monitor_settings`; a count, a
    spacing string such as "ddim25"); ``count``: samples per class (base) or
    inputs (SR); ``inputs``: an SR stage's `read_grid_inputs`. Sample i's noise is seeded by (``seed``, stage, i).
    """
    settings = monitor_settings(stage, steps)
    if stage.kind is StageKind.base:
        labels = torch.arange(min(stage.num_classes, count)).repeat_interleave(count)
        images = sample_stage(model, diffusion, stage, settings, labels, seed=seed, device=device)
        grid = image_grid(images, ncol=count)
    else:
        images = sample_stage(model, diffusion, stage, settings, inputs["y"], inputs["x_low"], seed=seed,
                              device=device)
        rows = torch.cat([upsample(inputs["x_low"], stage.resolution), images, inputs["x"]])
        grid = image_grid(rows, ncol=len(inputs["y"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_with(path, lambda f: grid.save(f, format="PNG"))  # a failed write leaves no partial file
    return path

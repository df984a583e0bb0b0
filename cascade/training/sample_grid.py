"""The trainer's sample grids: PNGs of EMA samples written while a stage trains, sampled through the one stage
sampler (`cascade.pipeline.stage_sampling.sample_stage`) with the stage's own `SamplingSettings`.

Base stages: one row per class (up to ``count`` classes), ``count`` samples each. SR stages: ``count`` val
inputs as three rows: the low-resolution input upsampled, the sample, the real image. The noise is seeded by
the run's seed per sample, so the grids of one run differ only by the weights.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from cascade.atomic import write_atomic_with
from cascade.config import StageConfig, StageKind
from cascade.data.loader import make_stage_loader
from cascade.imageops import image_grid, upsample
from cascade.pipeline.stage_sampling import sample_stage
from cascade.training.runtime import warn

__all__ = ["read_grid_inputs", "write_sample_grid"]


def read_grid_inputs(root: str, dataset_info: dict[str, Any], stage: StageConfig, count: int) -> dict[str, torch.Tensor]:
    """The first ``count`` val examples of the shards at ``root`` (the conditioning of an SR stage's grids): {"x":
    N×3×R×R, "x_low": N×3×r×r in [-1, 1], "y": N} on the CPU; without a val split, the first train examples in
    shard order (with a warning on stderr). ValueError (one line) when no example is readable."""
    sources = [("val", root)] if dataset_info["shards"].get("val") else []
    sources.append(("train", [str(Path(root) / n) for n in dataset_info["shards"]["train"]]))
    for split, source in sources:
        # read in val mode (each sample once, in shard order, no flips), whichever split it is
        loader = make_stage_loader(source, split="val", resolution=stage.resolution,
                                   low_resolution=stage.low_resolution, batch_size=count, rank=0, world_size=1,
                                   num_workers=0)
        batch = next(iter(loader), None)
        if batch is not None:
            if split == "train":
                warn(f"{root} has no val samples; the sample grids take their low-resolution inputs from the "
                     "train split")
            return {k: batch[k] for k in ("x", "x_low", "y")}
    raise ValueError(f"no readable sample in {root} for the sample grids; rewrite the shards "
                     "(tools/make_shards.py) or set trainer.sample_every=0")


@torch.no_grad()
def write_sample_grid(path: Path, model: torch.nn.Module, diffusion: Any, stage: StageConfig, *, steps: int | str,
                      count: int, seed: int, device: torch.device, inputs: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a PNG grid of ``model``'s samples to ``path`` (its folder is made) and return ``path``.

    ``diffusion``: the stage's, on its training timesteps; ``steps``: the respaced steps to sample over (replacing
    ``stage.sampling.steps``; a count, a spacing string such as "ddim25"); ``count``: samples per class (base) or
    inputs (SR); ``inputs``: an SR stage's `read_grid_inputs`. Sample i's noise is seeded by (``seed``, stage, i).
    """
    settings = dataclasses.replace(stage.sampling, steps=steps)
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

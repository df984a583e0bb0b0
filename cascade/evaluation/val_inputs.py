"""Real val examples as the conditioning of an SR stage's samples: what the trainer's sample grids and the
in-training quality proxy (`cascade.evaluation.proxy`) take as their low-resolution inputs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from cascade.config import StageConfig
from cascade.data.loader import make_stage_loader

__all__ = ["read_val_inputs"]


def read_val_inputs(root: str | Path, dataset_info: dict[str, Any], stage: StageConfig, count: int, *,
                    purpose: str = "the sample grids", switch_off: str = "set trainer.sample_every=0",
                    train_fallback: bool = True) -> dict[str, torch.Tensor]:
    """The first ``count`` val examples of the shards at ``root`` in shard order: {"x": N×3×R×R (the real image at
    the stage's resolution R), "x_low": N×3×r×r (at its input resolution r), both float in [-1, 1], "y": N
    class indices} on the CPU, N ≤ ``count``. Without a readable val example and with ``train_fallback``, the
    first train examples instead (a warning on stderr naming ``purpose``). ValueError (one line naming
    ``purpose`` and the fixes: rewrite the shards, or ``switch_off``) when no example is readable."""
    sources = [("val", str(root))] if dataset_info["shards"].get("val") else []
    if train_fallback:
        sources.append(("train", [str(Path(root) / n) for n in dataset_info["shards"]["train"]]))
    for split, source in sources:
        # read in val mode (each sample once, in shard order, no flips), whichever split it is
        loader = make_stage_loader(source, split="val", resolution=stage.resolution,
                                   low_resolution=stage.low_resolution, batch_size=count, rank=0, world_size=1,
                                   num_workers=0)
        batch = next(iter(loader), None)
        if batch is not None:
            if split == "train":
                print(f"warning: {root} has no val samples; {purpose} take their low-resolution inputs from the "
                      "train split", file=sys.stderr)
            return {k: batch[k] for k in ("x", "x_low", "y")}
    where = "val sample" if not train_fallback else "sample"
    raise ValueError(f"no readable {where} in {root} for {purpose}; rewrite the shards (tools/make_shards.py) "
                     f"or {switch_off}")

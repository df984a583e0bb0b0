"""The training batches of one process: its part of the train split (`cascade.data.loader.make_stage_loader`,
seeded per data segment) repeated for as long as the run asks, moved to the device; and the checks that the
shards hold the stage's classes and that every train shard is there."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from cascade.config import StageConfig
from cascade.data.loader import make_stage_loader
from cascade.data.shard_folder import resolve_shards
from cascade.errors import plural
from cascade.training.trainer_config import DataConfig

__all__ = ["batches_on_device", "check_classes", "check_train_shards", "make_train_loader"]


def check_classes(info: dict[str, Any], stage: StageConfig, root: str) -> None:
    """ValueError (one line) unless the dataset record ``info`` of the shards at ``root`` has the stage's class
    count."""
    if len(info["class_names"]) != stage.num_classes:
        raise ValueError(f"stage {stage.name} has {plural(stage.num_classes, 'class', 'classes')} but the shards in "
                         f"{root} have {len(info['class_names'])}")


def check_train_shards(root: str) -> None:
    """FileNotFoundError (one line naming them) when train shards that the dataset.json at ``root`` lists are
    missing; ValueError when it lists none: found before training starts, not by a loader worker mid-run."""
    resolve_shards(root, "train")


def make_train_loader(data: DataConfig, stage: StageConfig, *, batch_size: int, seed: int, rank: int,
                      world_size: int, num_workers: int, device: torch.device) -> Iterable[dict[str, torch.Tensor]]:
    """The loader of ``rank``'s shuffled share of the train split at ``data.root``: batches of ``batch_size`` images at
    the stage's resolution (and low resolution), their order seeded by ``seed``. Raises ValueError (one line) when
    the shards lack a resolution the stage needs."""
    return make_stage_loader(data.root, split="train", resolution=stage.resolution,
                             low_resolution=stage.low_resolution, batch_size=batch_size, seed=seed, rank=rank,
                             world_size=world_size, num_workers=num_workers, shuffle_buffer=data.shuffle_buffer,
                             hflip=data.hflip, pin_memory=device.type == "cuda")


def batches_on_device(loader: Iterable[dict[str, torch.Tensor]], device: torch.device, *, channels_last: bool,
                      root: str) -> Iterator[dict[str, torch.Tensor]]:
    """``loader``'s batches, passed over again and again, each tensor on ``device`` (4-d ones channels-last when
    asked). ValueError (one line) when a pass yields no batch."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            out = {}
            for k, v in batch.items():
                v = v.to(device, non_blocking=True)
                if channels_last and v.ndim == 4:
                    v = v.contiguous(memory_format=torch.channels_last)
                out[k] = v
            yield out
        if empty:
            raise ValueError(f"the train split of {root} yielded no batch")

"""How the loader's work is spread over processes: the worker count, each (rank, worker)'s train shards and
the seeds of its random streams."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch


def resolve_num_workers(num_workers: int | str, device: torch.device) -> int:
    """``data.num_workers`` (validated by `cascade.data.settings.DataConfig`): an integer as it is; ``"auto"`` →
    on CPU the cores this process may use (its share under torchrun, by LOCAL_WORLD_SIZE) that its torch threads
    leave free, at most 4 (loader processes on the cores that compute slow training down; measured:
    docs/results/2026-12-02.md); with an accelerator all its usable cores but one, at most 8."""
    if num_workers != "auto":
        return num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # torchrun: this process's share of the node
    if device.type == "cpu":
        return min(4, max(0, cores - torch.get_num_threads()))
    return min(8, max(0, cores - 1))


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed when initialised, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def assign_shards(urls: Sequence[str], rank: int, world_size: int, worker: int,
                  num_workers: int) -> list[str]:
    """Train shard slice of (rank, worker): split by node then by worker; all shards when too few."""
    slot, slots = rank * num_workers + worker, world_size * num_workers
    return list(urls[slot::slots]) if len(urls) >= slots else list(urls)


def worker_seeds(seed: int, rank: int, worker: int, epoch: int) -> tuple[int, int, int]:
    """Independent seeds (shard resampling, shuffle buffer, flips) for one worker and epoch."""
    a, b, c = np.random.SeedSequence([seed, rank, worker, epoch]).generate_state(3, dtype=np.uint32)
    return int(a), int(b), int(c)

"""How the loader's work is spread over processes: the worker count, each (rank, worker)'s train shards, the
seeds of its random streams, and errors raised in a worker carried to the main process intact."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import NoReturn

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


class WorkerFailure:
    """An error raised in a loader worker process, sent to the main process as an item of the stream (torch
    would re-raise it there wrapped in the worker's multi-line traceback): `reraise` raises the original
    exception, its type and message intact (a RuntimeError naming the type when it cannot be pickled)."""

    def __init__(self, err: Exception):
        self.type_name, self.message = type(err).__name__, str(err)
        try:
            self.pickled: bytes | None = pickle.dumps(err)
        except Exception:  # noqa: BLE001 - any pickling failure: the type name and message still travel
            self.pickled = None

    def reraise(self) -> NoReturn:
        err = None
        if self.pickled is not None:
            try:
                err = pickle.loads(self.pickled)
            except Exception:  # noqa: BLE001 - an exception whose constructor rejects its own args
                err = None
        if not isinstance(err, BaseException):
            err = RuntimeError(f"{self.type_name}: {self.message}")
        raise err


def forward_failures(make: Callable[[], Iterable]) -> Iterator:
    """The items of ``make()``; in a loader worker process an Exception raised while building or reading them
    becomes a last `WorkerFailure` item instead (in the main process it propagates as it is)."""
    if torch.utils.data.get_worker_info() is None:
        yield from make()
        return
    try:
        yield from make()
    except Exception as err:  # noqa: BLE001 - every error reaches the main process, where it is raised again
        yield WorkerFailure(err)


def raise_failures(items: Iterable) -> Iterator:
    """``items`` from a DataLoader, raising the original exception of each `WorkerFailure` met."""
    for item in items:
        if isinstance(item, WorkerFailure):
            item.reraise()
        yield item

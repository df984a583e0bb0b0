"""Stage loader: webdataset shards (written by `cascade.data.shards`) → batches for one stage.

A batch is `{"x": B×3×R×R, "x_low": B×3×r×r (only with low_resolution), "y": B long}`, floats in
[-1, 1]; only the two sizes a stage needs are read from the tar and decoded (`cascade.data.decoding`).

Train (webdataset's recipe for distributed training): every (rank, DataLoader worker) gets a disjoint
slice of the shard list (split by node, then by worker; when there are fewer shards than
rank×worker slots every worker draws from all shards instead, with a warning), resamples shards
from its slice with replacement (`ResampledShards`), shuffles samples in a buffer, flips both sizes
together and batches; `with_epoch` fixes the number of batches per epoch. All randomness comes from
RNGs seeded by (seed, rank, worker, epoch) (`cascade.data.workers`), so (seed, rank, world_size,
num_workers) determine the stream exactly; the epoch counter advances each time the loader is iterated.

Val: every val sample exactly once across ranks and workers, in shard order, no flips, last batch
partial (whole shards per worker when there are enough shards, else every worker reads all shards
and keeps every n-th sample).

Corrupt input is skipped with a warning and counted in `LoaderStats`, shared by all worker processes.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import webdataset as wds

from cascade.data.decoding import (
    Decoder,
    LoaderStats,
    Skips,
    decode_stage,
    every_nth,
    select_files,
    split_batch,
    stage_collate,
)
from cascade.data.shard_folder import dataset_hflip, resolve_shards
from cascade.data.workers import (
    assign_shards,
    distributed_rank_world,
    forward_failures,
    raise_failures,
    worker_seeds,
)
from cascade.errors import ignore_stop_signals, plural
from cascade.imageops import uint8_to_float


class _StageDataset(torch.utils.data.IterableDataset):
    """Builds the webdataset pipeline inside each worker (seeded from seed, rank, worker and epoch)."""

    def __init__(self, urls, *, train, resolution, low_resolution, batch_size, seed, shuffle_buffer,
                 rank, world_size, batches_per_epoch, hflip, num_classes, stats, keep_keys):
        super().__init__()
        self.urls, self.train = list(urls), train
        self.resolution, self.low_resolution = resolution, low_resolution
        self.batch_size, self.seed, self.shuffle_buffer = batch_size, seed, shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch, self.hflip, self.num_classes = batches_per_epoch, hflip, num_classes
        self.stats, self.keep_keys = stats, keep_keys
        self.epoch = 0

    def __iter__(self) -> Iterator[dict]:
        return forward_failures(self._batches)  # a worker's error reaches the main process as it was raised

    def _batches(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        resolutions = [self.resolution] + ([self.low_resolution] if self.low_resolution is not None else [])
        collate = stage_collate(self.resolution, self.low_resolution, self.keep_keys)
        slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
        if self.train:
            shard_seed, shuffle_seed, flip_seed = worker_seeds(self.seed, self.rank, worker, self.epoch)
            skips = Skips(self.stats)
            n_batches = self.batches_per_epoch // num_workers + (worker < self.batches_per_epoch % num_workers)
            if n_batches == 0:
                return iter(())
            shards = assign_shards(self.urls, self.rank, self.world_size, worker, num_workers)
            pipeline = wds.DataPipeline(
                wds.ResampledShards(shards, deterministic=True, worker_seed=lambda: shard_seed, seed=0),
                wds.tarfile_to_samples(handler=skips.shard_handler, select_files=select_files(resolutions)),
                wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=random.Random(shuffle_seed)),
                decode_stage(Decoder(resolutions, self.num_classes, skips),
                             np.random.default_rng(flip_seed) if self.hflip else None),
                wds.batched(self.batch_size, collation_fn=collate, partial=False),
            ).with_epoch(n_batches)
            return iter(pipeline)
        whole_shards = len(self.urls) >= slots
        shards = self.urls[slot::slots] if whole_shards else self.urls
        if not shards:
            return iter(())
        # with sample-level splitting every worker reads every shard: only slot 0 counts shard errors
        skips = Skips(self.stats, count_shard_errors=whole_shards or slot == 0)
        stages = [wds.SimpleShardList(shards),
                  wds.tarfile_to_samples(handler=skips.shard_handler, select_files=select_files(resolutions))]
        if not whole_shards:
            stages.append(every_nth(slot, slots))
        stages += [decode_stage(Decoder(resolutions, self.num_classes, skips), None),
                   wds.batched(self.batch_size, collation_fn=collate, partial=True)]
        return iter(wds.DataPipeline(*stages))


class StageLoader:
    """Iterable over batches; each iteration is one epoch (train: `len(loader)` batches per rank).

    `stats` counts skipped input across all workers; `epoch` is the index of the next epoch; `info` is the
    dataset.json (None for url lists without one).
    """

    def __init__(self, dataset: _StageDataset, *, num_workers: int, pin_memory: bool, prefetch_factor: int,
                 info: dict | None):
        self.dataset, self.num_workers = dataset, num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.stats: LoaderStats = dataset.stats
        self.info = info
        self.epoch = 0

    def __iter__(self) -> Iterator[dict]:
        self.dataset.epoch = self.epoch  # workers are re-created each epoch and receive this value
        self.epoch += 1
        # The workers leave Ctrl-C and preemption signals, which reach the whole process group, to this process.
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None, persistent_workers=False,
            worker_init_fn=ignore_stop_signals)
        return raise_failures(loader)

    def __len__(self) -> int:
        if not self.dataset.train:
            raise TypeError("the val loader has no fixed length per rank; iterate it to the end")
        return self.dataset.batches_per_epoch


def make_stage_loader(root_or_urls, *, split: str = "train", resolution: int, low_resolution: int | None = None,
                      batch_size: int, num_workers: int = 2, seed: int = 0, shuffle_buffer: int = 1000,
                      rank: int | None = None, world_size: int | None = None, epoch_length: int | None = None,
                      hflip: str | bool = "auto", keep_keys: bool = False, pin_memory: bool = False,
                      prefetch_factor: int = 2, stats: LoaderStats | None = None) -> StageLoader:
    """Loader of one stage's batches from a shard folder (with dataset.json), a url pattern or a url list.

    resolution / low_resolution: the stage's image sizes in pixels (0 < low_resolution < resolution); batch_size
    ≥ 1, num_workers ≥ 0 (worker processes; `cascade.data.workers.resolve_num_workers` resolves "auto") and
    shuffle_buffer ≥ 1 (samples) come from validated settings (`TrainerConfig`, `DataConfig`).
    epoch_length: train batches per rank and epoch (default: ceil(train samples / (batch_size·world_size)),
    from dataset.json). rank/world_size default to torch.distributed when initialised, else 0/1.
    Val reads every sample once, never flips; train flips at random when `dataset_hflip(info, hflip)` says so
    ("auto": the dataset's declaration). keep_keys adds `"key"` (list of sample keys) to batches.
    Raises ValueError (bad split, sizes, rank, epoch_length; the shards lack a size or the split) or
    FileNotFoundError (no such folder or shard).
    """
    if resolution < 1 or (low_resolution is not None and not 0 < low_resolution < resolution):
        raise ValueError(f"need 0 < low_resolution < resolution, got {low_resolution} and {resolution}")
    default_rank, default_world = distributed_rank_world()
    rank = default_rank if rank is None else rank
    world_size = default_world if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 ≤ rank < world_size, got rank {rank}, world_size {world_size}")
    urls, info, where = resolve_shards(root_or_urls, split)
    num_classes = None
    if info is not None:
        available = sorted(info["resolutions"])
        needed = [r for r in (resolution, low_resolution) if r is not None]
        lacking = [r for r in needed if r not in available]
        if lacking:
            raise ValueError(f"dataset {where} has resolutions {available}, but the stage needs {needed} "
                             f"(missing {lacking}); rewrite the shards with --max-res ≥ {max(needed)}")
        num_classes = len(info["class_names"])
    train = split == "train"
    if train:
        if epoch_length is None:
            if info is None:
                raise ValueError(f"epoch_length is required: {where} has no dataset.json to count samples")
            epoch_length = math.ceil(info["counts"]["train"]["total"] / (batch_size * world_size))
        if epoch_length < 1:
            raise ValueError(f"epoch_length must be ≥ 1, got {epoch_length}")
        slots = world_size * max(num_workers, 1)
        if len(urls) < slots:
            warnings.warn(f"cascade.data.loader: {plural(len(urls), 'train shard')} < {slots} rank×worker slots; "
                          "every worker resamples from all shards (write smaller shards for disjoint slices)",
                          stacklevel=2)
    dataset = _StageDataset(
        urls, train=train, resolution=resolution, low_resolution=low_resolution, batch_size=batch_size, seed=seed,
        shuffle_buffer=shuffle_buffer, rank=rank, world_size=world_size, batches_per_epoch=epoch_length,
        hflip=dataset_hflip(info, hflip) and train, num_classes=num_classes, stats=stats or LoaderStats(), keep_keys=keep_keys)
    return StageLoader(dataset, num_workers=num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                       info=info)


def iterate_split(root_or_urls, split: str, resolutions: Sequence[int], *, batch_size: int | None = None,
                  stats: LoaderStats | None = None) -> Iterator[dict]:
    """Every sample of a split once, in shard order, in this process (for evaluation).

    Yields `{"key": str, "y": int, "images": {res: 3×res×res float in [-1, 1]}}`, or with batch_size
    `{"key": [str], "y": B long, "images": {res: B×3×res×res}}` (last batch partial). Corrupt samples are
    skipped, warned about and counted in `stats`. Raises ValueError (bad split, no resolutions, sizes the
    shards lack) or FileNotFoundError (no such folder or shard) when first advanced.
    """
    if not resolutions:
        raise ValueError("resolutions must name at least one size")
    urls, info, where = resolve_shards(root_or_urls, split)
    if info is not None and any(r not in info["resolutions"] for r in resolutions):
        raise ValueError(f"dataset {where} has resolutions {sorted(info['resolutions'])}, "
                         f"asked for {list(resolutions)}")
    skips = Skips(stats or LoaderStats())
    samples = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(handler=skips.shard_handler, select_files=select_files(resolutions)),
        decode_stage(Decoder(resolutions, len(info["class_names"]) if info else None, skips), None),
    )
    if batch_size is None:
        for key, y, images in samples:
            yield {"key": key, "y": y, "images": {r: uint8_to_float(im) for r, im in images.items()}}
        return
    collected = []
    for sample in samples:
        collected.append(sample)
        if len(collected) == batch_size:
            yield split_batch(collected, resolutions)
            collected = []
    if collected:
        yield split_batch(collected, resolutions)

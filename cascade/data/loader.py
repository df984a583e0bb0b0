"""Stage loader: webdataset shards (written by `cascade.data.shards`) → batches for one stage.

A batch is `{"x": B×3×R×R, "x_low": B×3×r×r (only with low_resolution), "y": B long}`, floats in
[-1, 1]; only the two sizes a stage needs are read from the tar and decoded.

Train (webdataset's recipe for distributed training): every (rank, DataLoader worker) gets a disjoint
slice of the shard list (split by node, then by worker; when there are fewer shards than
rank×worker slots every worker draws from all shards instead, with a warning), resamples shards
from its slice with replacement (`ResampledShards`), shuffles samples in a buffer, flips both sizes
together and batches; `with_epoch` fixes the number of batches per epoch. All randomness comes from
RNGs seeded by (seed, rank, worker, epoch), so (seed, rank, world_size, num_workers) determine the
stream exactly; the epoch counter advances each time the loader is iterated.

Val: every val sample exactly once across ranks and workers, in shard order, no flips, last batch
partial (whole shards per worker when there are enough shards, else every worker reads all shards
and keeps every n-th sample).

Corrupt input (unreadable or truncated shards, bad image bytes, missing or bad class, wrong size) is
skipped with a warning and counted in `LoaderStats`, shared by all worker processes.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from cascade.checks import check_num_workers
from cascade.imageops import uint8_to_float

_MAX_WARNINGS_PER_PROCESS = 20
_MAX_CONSECUTIVE_FAILURES = 1000


class LoaderStats:
    """Counters of skipped input, shared between the loader's worker processes (read with `as_dict`)."""

    FIELDS = ("shard_errors", "corrupt_images", "missing_fields", "bad_class", "wrong_size")

    def __init__(self):
        self._counts = multiprocessing.Array("q", len(self.FIELDS))

    def add(self, name: str, n: int = 1) -> None:
        with self._counts.get_lock():
            self._counts[self.FIELDS.index(name)] += n

    def as_dict(self) -> dict[str, int]:
        with self._counts.get_lock():
            return dict(zip(self.FIELDS, self._counts[:]))

    @property
    def total(self) -> int:
        return sum(self.as_dict().values())

    def __repr__(self) -> str:
        return f"LoaderStats({self.as_dict()})"


class _Skips:
    """Counts and warns about skipped input in one process; raises when nothing readable is left."""

    def __init__(self, stats: LoaderStats, count_shard_errors: bool = True):
        self.stats, self.count_shard_errors = stats, count_shard_errors
        self.warned = 0
        self.consecutive = 0

    def skip(self, field: str, message: str, count: bool = True) -> None:
        if count:
            self.stats.add(field)
            if self.warned < _MAX_WARNINGS_PER_PROCESS:
                self.warned += 1
                suffix = "; further skips in this process are counted silently" if (
                    self.warned == _MAX_WARNINGS_PER_PROCESS) else ""
                warnings.warn(f"cascade.data.loader: skipped ({field}) {message}{suffix}", RuntimeWarning, stacklevel=2)
        self.consecutive += 1
        if self.consecutive >= _MAX_CONSECUTIVE_FAILURES:
            raise RuntimeError(f"cascade.data.loader: {self.consecutive} consecutive unreadable shards/samples; "
                               f"the dataset looks corrupt (last: {message}); counts: {self.stats.as_dict()}")

    def ok(self) -> None:
        self.consecutive = 0

    def shard_handler(self, exn: Exception) -> bool:
        """webdataset exception handler: skip the shard (rest) and continue."""
        self.skip("shard_errors", f"{type(exn).__name__}: {str(exn)[:300]}", count=self.count_shard_errors)
        return True


class _Decoder:
    """Raw tar sample → (key, class, {res: H×W×3 uint8}) or None (skipped and counted)."""

    def __init__(self, resolutions: Sequence[int], num_classes: int | None, skips: _Skips):
        self.resolutions, self.num_classes, self.skips = tuple(resolutions), num_classes, skips

    def __call__(self, sample: dict) -> tuple[str, int, dict[int, np.ndarray]] | None:
        key = sample.get("__key__", "?")
        where = f"{key} in {sample.get('__url__', '?')}"
        missing = [f for f in ["cls"] + [f"{r}.png" for r in self.resolutions] if f not in sample]
        if missing:
            self.skips.skip("missing_fields", f"{where}: no {', '.join(missing)}")
            return None
        try:
            y = int(sample["cls"].decode().strip())
        except (UnicodeDecodeError, ValueError):
            self.skips.skip("bad_class", f"{where}: class {sample['cls'][:20]!r} is not an integer")
            return None
        if y < 0 or (self.num_classes is not None and y >= self.num_classes):
            self.skips.skip("bad_class", f"{where}: class {y} outside [0, {self.num_classes})")
            return None
        images = {}
        for res in self.resolutions:
            try:
                with Image.open(io.BytesIO(sample[f"{res}.png"])) as im:
                    im.load()
                    image = np.array(im.convert("RGB") if im.mode != "RGB" else im)
            except Exception as exc:  # noqa: BLE001 - any decoder failure means bad image bytes
                self.skips.skip("corrupt_images", f"{where}: {res}.png: {type(exc).__name__}: {exc}")
                return None
            if image.shape[:2] != (res, res):
                self.skips.skip("wrong_size", f"{where}: {res}.png is {image.shape[1]}×{image.shape[0]}")
                return None
            images[res] = image
        self.skips.ok()
        return key, y, images


def _decode_stage(decoder: _Decoder, flip_rng: np.random.Generator | None):
    def run(src):
        for sample in src:
            decoded = decoder(sample)
            if decoded is None:
                continue
            key, y, images = decoded
            if flip_rng is not None and flip_rng.random() < 0.5:
                images = {r: im[:, ::-1] for r, im in images.items()}  # same flip for every size
            yield key, y, images

    return run


def _every_nth(index: int, n: int):
    def run(src):
        for i, sample in enumerate(src):
            if i % n == index:
                yield sample

    return run


def _collate(resolution: int, low_resolution: int | None, keep_keys: bool):
    def collate(samples):
        batch = {"x": uint8_to_float(np.stack([s[2][resolution] for s in samples]))}
        if low_resolution is not None:
            batch["x_low"] = uint8_to_float(np.stack([s[2][low_resolution] for s in samples]))
        batch["y"] = torch.tensor([s[1] for s in samples], dtype=torch.long)
        if keep_keys:
            batch["key"] = [s[0] for s in samples]
        return batch

    return collate


def assign_shards(urls: Sequence[str], rank: int, world_size: int, worker: int,
                  num_workers: int) -> list[str]:
    """Train shard slice of (rank, worker): split by node then by worker; all shards when too few."""
    slot, slots = rank * num_workers + worker, world_size * num_workers
    return list(urls[slot::slots]) if len(urls) >= slots else list(urls)


def worker_seeds(seed: int, rank: int, worker: int, epoch: int) -> tuple[int, int, int]:
    """Independent seeds (shard resampling, shuffle buffer, flips) for one worker and epoch."""
    a, b, c = np.random.SeedSequence([seed, rank, worker, epoch]).generate_state(3, dtype=np.uint32)
    return int(a), int(b), int(c)


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

    def _select(self, fname: str) -> bool:
        suffixes = [".cls", f".{self.resolution}.png"]
        if self.low_resolution is not None:
            suffixes.append(f".{self.low_resolution}.png")
        return fname.endswith(tuple(suffixes))

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        resolutions = [self.resolution] + ([self.low_resolution] if self.low_resolution is not None else [])
        collate = _collate(self.resolution, self.low_resolution, self.keep_keys)
        slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
        if self.train:
            shard_seed, shuffle_seed, flip_seed = worker_seeds(self.seed, self.rank, worker, self.epoch)
            skips = _Skips(self.stats)
            n_batches = self.batches_per_epoch // num_workers + (worker < self.batches_per_epoch % num_workers)
            if n_batches == 0:
                return iter(())
            shards = assign_shards(self.urls, self.rank, self.world_size, worker, num_workers)
            pipeline = wds.DataPipeline(
                wds.ResampledShards(shards, deterministic=True, worker_seed=lambda: shard_seed, seed=0),
                wds.tarfile_to_samples(handler=skips.shard_handler, select_files=self._select),
                wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=random.Random(shuffle_seed)),
                _decode_stage(_Decoder(resolutions, self.num_classes, skips),
                              np.random.default_rng(flip_seed) if self.hflip else None),
                wds.batched(self.batch_size, collation_fn=collate, partial=False),
            ).with_epoch(n_batches)
            return iter(pipeline)
        whole_shards = len(self.urls) >= slots
        shards = self.urls[slot::slots] if whole_shards else self.urls
        if not shards:
            return iter(())
        # with sample-level splitting every worker reads every shard: only slot 0 counts shard errors
        skips = _Skips(self.stats, count_shard_errors=whole_shards or slot == 0)
        stages = [wds.SimpleShardList(shards),
                  wds.tarfile_to_samples(handler=skips.shard_handler, select_files=self._select)]
        if not whole_shards:
            stages.append(_every_nth(slot, slots))
        stages += [_decode_stage(_Decoder(resolutions, self.num_classes, skips), None),
                   wds.batched(self.batch_size, collation_fn=collate, partial=True)]
        return iter(wds.DataPipeline(*stages))


class StageLoader:
    """Iterable over batches; each iteration is one epoch (train: `len(loader)` batches per rank).

    `stats` counts skipped input across all workers; `epoch` is the index of the next epoch.
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
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None, persistent_workers=False)
        return iter(loader)

    def __len__(self) -> int:
        if not self.dataset.train:
            raise TypeError("the val loader has no fixed length per rank; iterate it to the end")
        return self.dataset.batches_per_epoch


# ----------------------------------------------------------------------------------------------- datasets

def read_dataset_info(root: str | Path) -> dict:
    """The dataset.json of a shard folder (FileNotFoundError / ValueError with a one-line reason)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    path = root / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"{root} has no dataset.json (write shards with tools/make_shards.py)")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    for field in ("resolutions", "class_names", "counts", "shards"):
        if field not in info:
            raise ValueError(f"{path} lacks the field {field!r}")
    return info


def dataset_hflip(info: dict | None, setting: str | bool = "auto") -> bool:
    """Whether training flips images horizontally at random. ``setting`` "auto" follows the dataset's declaration
    (dataset.json "hflip", written by `cascade.data.shards.write_shards` from its source: False for digits; shards
    written before the field existed, or url lists without dataset.json, count as mirror-symmetric); True / False
    override it. Raises ValueError for any other setting."""
    if setting == "auto":
        return bool((info or {}).get("hflip", True))
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"hflip must be auto, true or false, got {setting!r}")


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _resolve(root_or_urls, split: str) -> tuple[list[str], dict | None, str]:
    """(shard urls, dataset.json or None, description) for a shard folder, a url pattern or a url list."""
    if isinstance(root_or_urls, (list, tuple)):
        urls = [str(u) for u in root_or_urls]
    else:
        text = str(root_or_urls)
        if Path(text).is_dir():
            info = read_dataset_info(text)
            names = info["shards"].get(split, [])
            if not names:
                raise ValueError(f"dataset {text} has no {split} shards ({info['counts'].get(split, {}).get('total', 0)} {split} "
                                 f"samples); rewrite it with tools/make_shards.py"
                                 + (" and a larger --val-fraction" if split == "val" else ""))
            return [str(Path(text) / n) for n in names], info, text
        if _is_local(text) and "{" not in text and "::" not in text and not Path(text).exists():
            raise FileNotFoundError(f"dataset not found: {text}")
        urls = wds.shardlists.expand_urls(text)
    if not urls:
        raise ValueError(f"no shards in {root_or_urls!r}")
    missing = [u for u in urls if _is_local(u) and not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) not found, e.g. {missing[0]}")
    info = None
    if _is_local(urls[0]) and (Path(urls[0]).parent / "dataset.json").is_file():
        info = read_dataset_info(Path(urls[0]).parent)
    return urls, info, str(root_or_urls)


def _distributed_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def resolve_num_workers(num_workers: int | str, device: torch.device) -> int:
    """``data.num_workers``: an integer as it is; ``"auto"`` → on CPU the cores this process may use (its share
    under torchrun, by LOCAL_WORLD_SIZE) that its torch threads leave free, at most 4 (loader processes on the
    cores that compute slow training down: measured on 2 cores, README "Benchmarks"); with an accelerator all
    its usable cores but one, at most 8. Raises ValueError on anything else."""
    check_num_workers(num_workers)
    if num_workers != "auto":
        return num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # torchrun: this process's share of the node
    if device.type == "cpu":
        return min(4, max(0, cores - torch.get_num_threads()))
    return min(8, max(0, cores - 1))


def make_stage_loader(root_or_urls, *, split: str = "train", resolution: int, low_resolution: int | None = None,
                      batch_size: int, num_workers: int = 2, seed: int = 0, shuffle_buffer: int = 1000,
                      rank: int | None = None, world_size: int | None = None, epoch_length: int | None = None,
                      hflip: str | bool = "auto", keep_keys: bool = False, pin_memory: bool = False,
                      prefetch_factor: int = 2, stats: LoaderStats | None = None) -> StageLoader:
    """Loader of one stage's batches from a shard folder (with dataset.json), a url pattern or a url list.

    epoch_length: train batches per rank and epoch (default: ceil(train samples / (batch_size·world_size)),
    from dataset.json). rank/world_size default to torch.distributed when initialised, else 0/1.
    Val reads every sample once, never flips; train flips at random when `dataset_hflip(info, hflip)` says so
    ("auto": the dataset's declaration). keep_keys adds `"key"` (list of sample keys) to batches.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if resolution < 1 or (low_resolution is not None and not 0 < low_resolution < resolution):
        raise ValueError(f"need 0 < low_resolution < resolution, got {low_resolution} and {resolution}")
    if batch_size < 1 or num_workers < 0 or shuffle_buffer < 1:
        raise ValueError(f"need batch_size ≥ 1, num_workers ≥ 0, shuffle_buffer ≥ 1; got {batch_size}, "
                         f"{num_workers}, {shuffle_buffer}")
    default_rank, default_world = _distributed_rank_world()
    rank = default_rank if rank is None else rank
    world_size = default_world if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 ≤ rank < world_size, got rank {rank}, world_size {world_size}")
    urls, info, where = _resolve(root_or_urls, split)
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
            warnings.warn(f"cascade.data.loader: {len(urls)} train shards < {slots} rank×worker slots; every worker "
                          "resamples from all shards (write smaller shards for disjoint slices)", stacklevel=2)
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
    skipped, warned about and counted in `stats`.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not resolutions:
        raise ValueError("resolutions must name at least one size")
    urls, info, where = _resolve(root_or_urls, split)
    if info is not None and any(r not in info["resolutions"] for r in resolutions):
        raise ValueError(f"dataset {where} has resolutions {sorted(info['resolutions'])}, "
                         f"asked for {list(resolutions)}")
    skips = _Skips(stats or LoaderStats())
    decoder = _Decoder(resolutions, len(info["class_names"]) if info else None, skips)
    wanted = tuple([".cls"] + [f".{r}.png" for r in resolutions])
    samples = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(handler=skips.shard_handler, select_files=lambda f: f.endswith(wanted)),
        _decode_stage(decoder, None),
    )
    if batch_size is None:
        for key, y, images in samples:
            yield {"key": key, "y": y, "images": {r: uint8_to_float(im) for r, im in images.items()}}
        return
    collected = []
    for sample in samples:
        collected.append(sample)
        if len(collected) == batch_size:
            yield _batch_of(collected, resolutions)
            collected = []
    if collected:
        yield _batch_of(collected, resolutions)


def _batch_of(samples: list, resolutions: Sequence[int]) -> dict:
    return {"key": [s[0] for s in samples], "y": torch.tensor([s[1] for s in samples], dtype=torch.long),
            "images": {r: uint8_to_float(np.stack([s[2][r] for s in samples])) for r in resolutions}}

"""Shard writer: source images → square crop → resolution pyramid + class → webdataset tar shards.

Shard format (read by `cascade.data.loader`): `train-%06d.tar` and `val-%06d.tar`, each sample holding
`{key}.32.png`, `{key}.64.png`, `{key}.128.png`, `{key}.256.png` (only resolutions ≤ max_res, made by
`cascade.data.pyramid`) and `{key}.cls` (decimal class index). `dataset.json` records class names, counts,
shard names, resolutions, source, seed, how it was made and the report of the bad-input policy
(`cascade.data.bad_input`). Output is a pure function of (source, options, seed): fixed tar mtimes, owners and
member order, any number of workers.

Interrupted writes: each shard is written under a hidden temporary name, fsynced and renamed into place;
`dataset.json` is written last, the same way, so a folder holds a dataset only once it is complete (readers
need dataset.json). While writing, the marker file `.incomplete` is present; a later call removes what an
interrupted one left (marker, shards, temporary files) and writes the same bytes again, without
`overwrite`.

Split: per class, a seeded permutation puts round(val_fraction · n) items in `val`; both splits are
then shuffled (seeded) so every shard mixes classes.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from cascade.atomic import fsync_path, remove_path, write_atomic, write_guard
from cascade.data.bad_input import BadInputReport, SkipImage
from cascade.data.pyramid import prepare_image, pyramid_pngs
from cascade.data.shard_folder import SPLITS
from cascade.data.sources import Source, SourceItem

RESOLUTIONS = (32, 64, 128, 256)
FORMAT_VERSION = 1
INCOMPLETE_MARKER = ".incomplete"
_TAR_MTIME = 0  # fixed member mtime → byte-identical shards for a seed

_WORKER_SOURCE: Source | None = None


def _init_worker(source: Source) -> None:
    global _WORKER_SOURCE
    _WORKER_SOURCE = source
    torch.set_num_threads(1)


def _init_pool_worker(source: Source) -> None:
    # Ctrl-C reaches every process of the terminal's group: only the parent handles it (and stops the
    # pool); a worker would otherwise die printing a KeyboardInterrupt traceback. SIGTERM and SIGUSR1 end a
    # worker quietly (the pool's own way to stop one) instead of the parent's handler it inherits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in (signal.SIGTERM, getattr(signal, "SIGUSR1", signal.SIGTERM)):
        signal.signal(signum, signal.SIG_DFL)
    _init_worker(source)


def _process(job: tuple[SourceItem, tuple[int, ...], int]) -> tuple[SourceItem, dict | None, list[str]]:
    """Load one item and make its pyramid; returns (item, files or None when skipped, report events)."""
    item, resolutions, min_size = job
    try:
        try:
            image = _WORKER_SOURCE.load(item)
        except UnidentifiedImageError as exc:
            raise SkipImage("skipped_not_image", str(exc)) from exc
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise SkipImage("skipped_unreadable", f"{type(exc).__name__}: {exc}") from exc
        with image:
            pixels, events = prepare_image(image, max(resolutions), min_size)
    except SkipImage as skip:
        return item, None, [skip.category]
    files = pyramid_pngs(pixels, resolutions)
    files["cls"] = str(item.class_index).encode()
    return item, files, events


def split_items(per_class: list[list[SourceItem]], val_fraction: float,
                seed: int) -> dict[str, list[SourceItem]]:
    """Stratified seeded split (round(val_fraction · n) of each class's n items to val, val_fraction in [0, 1));
    each split is then shuffled so that shards mix classes."""
    rng = np.random.default_rng([seed, 1])
    splits = {"train": [], "val": []}
    for items in per_class:
        order = rng.permutation(len(items))
        n_val = round(val_fraction * len(items))
        splits["val"].extend(items[i] for i in order[:n_val])
        splits["train"].extend(items[i] for i in order[n_val:])
    for name in SPLITS:
        splits[name] = [splits[name][i] for i in rng.permutation(len(splits[name]))]
    return splits


def _dataset_files(out: Path) -> list[Path]:
    """What a dataset consists of in ``out``: shards, dataset.json and temporary files of an interrupted write."""
    return (sorted(out.glob("train-*.tar")) + sorted(out.glob("val-*.tar")) + sorted(out.glob("dataset.json"))
            + sorted(out.glob(".train-*.tar.tmp")) + sorted(out.glob(".val-*.tar.tmp"))
            + sorted(out.glob(".dataset.json.tmp")))


class _ShardSink:
    """Writes `{split}-%06d.tar` shards of `shard_size` samples, each atomically (temp file + rename); `abort`
    drops the shard being written and its temporary file (after a failed write, e.g. a full disk)."""

    def __init__(self, out_dir: Path, split: str, shard_size: int):
        self.out_dir, self.split, self.shard_size = out_dir, split, shard_size
        self.names: list[str] = []
        self.count = 0
        self._writer = None
        self._file = None
        self._tmp = None

    def write(self, cls_files: dict) -> None:
        if self._writer is None:
            name = f"{self.split}-{len(self.names):06d}.tar"
            self.names.append(name)
            self._tmp = self.out_dir / f".{name}.tmp"
            self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed by _finish or abort
            self._writer = wds.TarWriter(self._file, mtime=_TAR_MTIME, encoder=False)
        with write_guard(self.out_dir / self.names[-1]):
            self._writer.write({"__key__": f"{self.split}{self.count:08d}", **cls_files})
        self.count += 1
        if self.count % self.shard_size == 0:
            self._finish()

    def _finish(self) -> None:
        if self._writer is not None:
            with write_guard(self.out_dir / self.names[-1]):
                self._writer.close()
                self._file.close()
                fsync_path(self._tmp)
                os.replace(self._tmp, self.out_dir / self.names[-1])
            self._writer = self._file = None

    def abort(self) -> None:
        if self._writer is not None:
            # closing once marks the tar stream closed, so that its finaliser does not write (and fail) again
            with contextlib.suppress(OSError, ValueError):
                self._writer.close()
            with contextlib.suppress(OSError, ValueError):
                self._file.close()
            remove_path(self._tmp)
            self._writer = self._file = None

    def close(self) -> None:
        self._finish()


def _ordered_results(jobs: list, workers: int, source: Source) -> Iterator:
    if workers <= 1:  # in this process, on one torch thread (write_shards gives the caller its count back)
        _init_worker(source)
        yield from map(_process, jobs)
        return
    with multiprocessing.get_context().Pool(workers, initializer=_init_pool_worker, initargs=(source,)) as pool:
        yield from pool.imap(_process, jobs, chunksize=8)  # imap keeps the input order → deterministic


def write_shards(source: Source, out_dir: str | os.PathLike, *, shard_size: int = 1000, val_fraction: float = 0.05,
                 seed: int = 0, workers: int = 1, max_res: int = 256, min_size: int = 16,
                 overwrite: bool = False, progress: bool | Callable = False) -> dict:
    """Write the source as train/val shards + dataset.json into out_dir; returns the dataset.json dict.

    shard_size: samples per shard; val_fraction in [0, 1): the share of each class in val; workers: processes
    (≤ 1: this one); max_res: the largest size written (one of RESOLUTIONS, pixels); min_size: skip images whose
    short side is below it (pixels); progress: a tqdm bar, or a callable(iterable, total) wrapping the results.
    Raises ValueError (bad options, no images, no valid image) or FileExistsError (a dataset is there and not
    overwrite).
    """
    if max_res not in RESOLUTIONS:
        raise ValueError(f"--max-res (max_res) must be one of {RESOLUTIONS}, got {max_res}")
    if shard_size < 1:
        raise ValueError(f"--shard-size (shard_size) must be ≥ 1, got {shard_size}")
    if min_size < 1:
        raise ValueError(f"--min-size (min_size) must be ≥ 1, got {min_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction (val_fraction) must be in [0, 1), got {val_fraction}")
    resolutions = tuple(r for r in RESOLUTIONS if r <= max_res)
    out = Path(out_dir)
    existing = _dataset_files(out)
    unfinished = (out / INCOMPLETE_MARKER).is_file()  # left by an interrupted write: replaced without asking
    if existing and not overwrite and not unfinished:
        raise FileExistsError(f"{out} already holds a dataset ({existing[0].name}, …); pass --overwrite "
                              "(overwrite=True) to replace it")
    per_class = source.items_per_class()
    if sum(len(items) for items in per_class) == 0:
        raise ValueError("the source has no images")
    splits = split_items(per_class, val_fraction, seed)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / INCOMPLETE_MARKER, b"make_shards is writing (or was interrupted writing) this folder\n")
    for path in sorted(existing, key=lambda p: p.name != "dataset.json"):  # the dataset stops being one first
        path.unlink()
    fsync_path(out)

    report = BadInputReport(notes={k: list(v) for k, v in source.notes().items() if v})
    jobs = [(item, resolutions, min_size) for name in SPLITS for item in splits[name]]
    split_of = {id(item): name for name in SPLITS for item in splits[name]}
    sinks = {name: _ShardSink(out, name, shard_size) for name in SPLITS}
    per_class_counts = {name: [0] * len(source.class_names) for name in SPLITS}
    threads = torch.get_num_threads()  # workers=1 processes here on one thread: the caller gets its count back
    try:
        results = _ordered_results(jobs, workers, source)
        if progress:
            results = (progress if callable(progress) else _tqdm)(results, total=len(jobs))
        for job, (item, files, events) in zip(jobs, results):
            split = split_of[id(job[0])]
            for event in events:
                report.add(event, item.name)
            if files is not None:
                sinks[split].write(files)
                per_class_counts[split][item.class_index] += 1
        for sink in sinks.values():
            sink.close()
    except BaseException:  # a failed write (full disk) or an interrupt: no temporary shard stays behind
        for sink in sinks.values():
            sink.abort()
        raise
    finally:
        torch.set_num_threads(threads)
    if sinks["train"].count == 0:
        for sink in sinks.values():
            for name in sink.names:
                (out / name).unlink()
        (out / INCOMPLETE_MARKER).unlink()
        raise ValueError(f"no valid images in the source ({report.num_skipped} skipped: "
                         + "; ".join(report.summary_lines(3)) + ")")

    info = {
        "format_version": FORMAT_VERSION,
        "source": source.describe(),
        "seed": seed,
        "num_classes": len(source.class_names),
        "class_names": list(source.class_names),
        "hflip": bool(source.hflip),  # random horizontal flips keep an image in its class (training augmentation)
        "resolutions": list(resolutions),
        "image_format": {str(r): "png" for r in resolutions},
        "counts": {name: {"total": sinks[name].count, "per_class": per_class_counts[name]} for name in SPLITS},
        "shards": {name: sinks[name].names for name in SPLITS},
        "shard_size": shard_size,
        "val_fraction": val_fraction,
        "min_size": min_size,
        "how_made": ("cascade.data.shards.write_shards: policy-converted to 8-bit RGB, short side resized to "
                     f"{max(resolutions)} (box halving + bicubic) and centre-cropped; smaller sizes by "
                     "cascade.imageops.downsample (kornia antialiased bicubic) from the largest"),
        "bad_input": report.to_dict(),
    }
    write_atomic(out / "dataset.json", (json.dumps(info, indent=2) + "\n").encode())
    (out / INCOMPLETE_MARKER).unlink()
    fsync_path(out)
    return info


def _tqdm(iterable, total):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc="writing shards", unit="img")


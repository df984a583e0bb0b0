"""Raw tar samples → decoded images → batches, skipping (and counting) what cannot be read.

A raw sample is webdataset's dict of file bytes (`"cls"`, `"{res}.png"`, `"__key__"`, `"__url__"`); a decoded
sample is `(key, class index, {res: res×res×3 uint8})`. Corrupt input (unreadable or truncated shards, bad
image bytes, a missing or bad class, a wrong size) is skipped with a warning (at most
`MAX_WARNINGS_PER_PROCESS` per process) and counted in `LoaderStats`, shared by all worker processes; after
`MAX_CONSECUTIVE_FAILURES` skips in a row reading stops with a RuntimeError.
"""

from __future__ import annotations

import io
import multiprocessing
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from cascade.imageops import uint8_to_float

MAX_WARNINGS_PER_PROCESS = 20
MAX_CONSECUTIVE_FAILURES = 1000

Decoded = tuple[str, int, dict[int, np.ndarray]]


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


class Skips:
    """Counts and warns about skipped input in one process; raises RuntimeError when nothing readable is left.

    count_shard_errors=False: shard errors still break a run of consecutive failures but are not counted (when
    every worker reads the same shards, one of them counts).
    """

    def __init__(self, stats: LoaderStats, count_shard_errors: bool = True):
        self.stats, self.count_shard_errors = stats, count_shard_errors
        self.warned = 0
        self.consecutive = 0

    def skip(self, field: str, message: str, count: bool = True) -> None:
        if count:
            self.stats.add(field)
            if self.warned < MAX_WARNINGS_PER_PROCESS:
                self.warned += 1
                suffix = "; further skips in this process are counted silently" if (
                    self.warned == MAX_WARNINGS_PER_PROCESS) else ""
                warnings.warn(f"cascade.data.loader: skipped ({field}) {message}{suffix}", RuntimeWarning, stacklevel=2)
        self.consecutive += 1
        if self.consecutive >= MAX_CONSECUTIVE_FAILURES:
            raise RuntimeError(f"cascade.data.loader: {self.consecutive} consecutive unreadable shards/samples; "
                               f"the dataset looks corrupt (last: {message}); counts: {self.stats.as_dict()}")

    def ok(self) -> None:
        self.consecutive = 0

    def shard_handler(self, exn: Exception) -> bool:
        """webdataset exception handler: skip the shard (rest) and continue."""
        self.skip("shard_errors", f"{type(exn).__name__}: {str(exn)[:300]}", count=self.count_shard_errors)
        return True


class Decoder:
    """Raw tar sample → `Decoded` or None (skipped and counted); classes outside [0, num_classes) are skipped
    (num_classes None: any class ≥ 0)."""

    def __init__(self, resolutions: Sequence[int], num_classes: int | None, skips: Skips):
        self.resolutions, self.num_classes, self.skips = tuple(resolutions), num_classes, skips

    def __call__(self, sample: dict) -> Decoded | None:
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


def select_files(resolutions: Iterable[int]) -> Callable[[str], bool]:
    """Tar member filter: only the class and the PNGs of `resolutions` are read from a shard."""
    wanted = tuple([".cls"] + [f".{r}.png" for r in resolutions])
    return lambda fname: fname.endswith(wanted)


def decode_stage(decoder: Decoder, flip_rng: np.random.Generator | None):
    """Pipeline stage: raw samples → decoded ones (skips dropped); with `flip_rng`, each sample flipped
    horizontally with probability 1/2, every size alike."""

    def run(src: Iterable[dict]) -> Iterator[Decoded]:
        for sample in src:
            decoded = decoder(sample)
            if decoded is None:
                continue
            key, y, images = decoded
            if flip_rng is not None and flip_rng.random() < 0.5:
                images = {r: im[:, ::-1] for r, im in images.items()}  # same flip for every size
            yield key, y, images

    return run


def every_nth(index: int, n: int):
    """Pipeline stage: the samples at positions index, index + n, index + 2n, …"""

    def run(src: Iterable) -> Iterator:
        for i, sample in enumerate(src):
            if i % n == index:
                yield sample

    return run


def stage_collate(resolution: int, low_resolution: int | None, keep_keys: bool):
    """Decoded samples → `{"x": B×3×R×R, "x_low": B×3×r×r (with low_resolution), "y": B long, "key": [str]
    (with keep_keys)}`, floats in [-1, 1]."""

    def collate(samples: list[Decoded]) -> dict:
        batch = {"x": uint8_to_float(np.stack([s[2][resolution] for s in samples]))}
        if low_resolution is not None:
            batch["x_low"] = uint8_to_float(np.stack([s[2][low_resolution] for s in samples]))
        batch["y"] = torch.tensor([s[1] for s in samples], dtype=torch.long)
        if keep_keys:
            batch["key"] = [s[0] for s in samples]
        return batch

    return collate


def split_batch(samples: list[Decoded], resolutions: Sequence[int]) -> dict:
    """Decoded samples → `{"key": [str], "y": B long, "images": {res: B×3×res×res float in [-1, 1]}}`."""
    return {"key": [s[0] for s in samples], "y": torch.tensor([s[1] for s in samples], dtype=torch.long),
            "images": {r: uint8_to_float(np.stack([s[2][r] for s in samples])) for r in resolutions}}

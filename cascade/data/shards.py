"""Shard writer: source images → square crop → resolution pyramid + class → webdataset tar shards.

Shard format (read by `cascade.data.loader`): `train-%06d.tar` and `val-%06d.tar`, each sample holding
`{key}.32.png`, `{key}.64.png`, `{key}.128.png`, `{key}.256.png` (only resolutions ≤ max_res) and
`{key}.cls` (decimal class index). Every size is lossless 8-bit RGB PNG (the 256² one too: SR stages
then see exactly the pixels their low-resolution inputs were made from). The largest size is the
source image centre-cropped and resized (short side → max_res: halve with a box filter while at least
twice too large, then bicubic, as guided-diffusion prepares ImageNet); every smaller size is made from
the largest with `cascade.imageops.downsample`. `dataset.json` records class names, counts, shard
names, resolutions, source, seed, how it was made and the bad-input report. Output is a pure function
of (source, options, seed): fixed tar mtimes, owners and member order, any number of workers.

Interrupted writes: each shard is written under a hidden temporary name, fsynced and renamed into place;
`dataset.json` is written last, the same way, so a folder holds a dataset only once it is complete (readers
need dataset.json). While writing, the marker file `.incomplete` is present; a later call removes what an
interrupted one left (marker, shards, temporary files) and writes the same bytes again, without
`overwrite`.

Split: per class, a seeded permutation puts round(val_fraction · n) items in `val`; both splits are
then shuffled (seeded) so every shard mixes classes.

Bad-input policy (nothing crashes the run, nothing valid is lost; all reported at the end):
- grayscale (1, L), palette (P), CMYK, YCbCr/LAB/HSV → converted to 8-bit RGB (counted per mode);
- transparency (RGBA, LA, PA, P with a transparent colour) → composited on white, then RGB; so is a
  single transparent colour (PNG tRNS, `info["transparency"]`) of RGB, L, 1 and 16-bit I;16 images, decided
  from the image's own values before any bit-depth conversion and reported as "<mode>+transparency";
- 16-bit and 32-bit integer images (I;16*, I) → scaled from 0..65535 to 0..255; float (F) images are
  taken as 0..1 when their maximum is ≤ 1, else 0..255; EXIF orientation is applied;
- short side < max_res → upscaled (bicubic) and counted; short side < min_size → skipped;
- unreadable, truncated or corrupt images, and files that are not images → skipped.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image, ImageOps, UnidentifiedImageError

from cascade.atomic import fsync_path, write_atomic
from cascade.data.sources import Source, SourceItem
from cascade.imageops import downsample, float_to_uint8, uint8_to_float

RESOLUTIONS = (32, 64, 128, 256)
FORMAT_VERSION = 1
SPLITS = ("train", "val")
INCOMPLETE_MARKER = ".incomplete"
_TAR_MTIME = 0  # fixed member mtime → byte-identical shards for a seed


class SkipImage(Exception):
    """An input the policy skips; `category` names the report list it goes to."""

    def __init__(self, category: str, message: str):
        super().__init__(message)
        self.category = category


@dataclass
class BadInputReport:
    """What the bad-input policy did, with file names (relative to the source)."""

    converted: dict[str, list[str]] = field(default_factory=dict)  # original mode → names
    upscaled: list[str] = field(default_factory=list)
    skipped_too_small: list[str] = field(default_factory=list)
    skipped_unreadable: list[str] = field(default_factory=list)  # truncated / corrupt image data
    skipped_not_image: list[str] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)  # source findings (files outside classes, …)

    def add(self, category: str, name: str) -> None:
        if category.startswith("converted:"):
            self.converted.setdefault(category.split(":", 1)[1], []).append(name)
        else:
            getattr(self, category).append(name)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_too_small) + len(self.skipped_unreadable) + len(self.skipped_not_image)

    def to_dict(self) -> dict:
        def entry(names):
            return {"count": len(names), "files": sorted(names)}

        return {
            "converted": {mode: entry(names) for mode, names in sorted(self.converted.items())},
            "upscaled": entry(self.upscaled),
            "skipped_too_small": entry(self.skipped_too_small),
            "skipped_unreadable": entry(self.skipped_unreadable),
            "skipped_not_image": entry(self.skipped_not_image),
            **{k: entry(v) for k, v in sorted(self.notes.items())},
        }

    @classmethod
    def from_dict(cls, d: dict) -> BadInputReport:
        """Inverse of `to_dict` (file names only)."""
        fixed = ("converted", "upscaled", "skipped_too_small", "skipped_unreadable", "skipped_not_image")
        return cls(converted={mode: list(e["files"]) for mode, e in d["converted"].items()},
                   **{k: list(d[k]["files"]) for k in fixed[1:]},
                   notes={k: list(v["files"]) for k, v in d.items() if k not in fixed})

    def summary_lines(self, max_names: int = 10) -> list[str]:
        """Human-readable lines, one per non-empty category (at most `max_names` names each)."""

        def line(label, names):
            shown = ", ".join(sorted(names)[:max_names]) + (" …" if len(names) > max_names else "")
            return f"{label}: {len(names)} ({shown})"

        lines = [line(f"converted from {mode} to RGB", names) for mode, names in sorted(self.converted.items())]
        for label, names in [("upscaled (smaller than max_res)", self.upscaled),
                             ("skipped: smaller than min_size", self.skipped_too_small),
                             ("skipped: unreadable or truncated", self.skipped_unreadable),
                             ("skipped: not an image", self.skipped_not_image),
                             *[(k.replace("_", " "), v) for k, v in sorted(self.notes.items())]]:
            if names:
                lines.append(line(label, names))
        return lines


# ----------------------------------------------------------------------------------------------- policy

def transparent_colour_mask(image: Image.Image) -> np.ndarray | None:
    """H×W bool mask of the pixels equal to the image's single transparent colour (PNG tRNS, Pillow's
    `info["transparency"]`) for modes without an alpha band or palette (RGB, L, 1, I;16, I); None when the
    image has no such colour. Compared on the stored values, before any bit-depth conversion."""
    value = image.info.get("transparency")
    if value is None or isinstance(value, bytes) or image.mode not in ("RGB", "L", "1", "I") and \
            not image.mode.startswith("I;16"):
        return None
    arr = np.asarray(image)
    if image.mode == "1":
        arr = arr.astype(np.uint8) * 255  # Pillow stores a 1-bit tRNS value scaled to 0 / 255
    if image.mode == "RGB":
        colour = np.asarray(value, dtype=np.int64).reshape(-1)[:3]
        if colour.max(initial=0) > 255:  # a 16-bit colour of a 48-bit PNG that Pillow reads as 8-bit RGB
            colour = colour >> 8
        return np.all(arr.astype(np.int64) == colour, axis=-1)
    return arr.astype(np.int64) == int(value)


def to_rgb8(image: Image.Image) -> tuple[Image.Image, str | None]:
    """Apply the colour part of the policy; returns (8-bit RGB image, original mode if converted).

    An image with a single transparent colour is reported as "<mode>+transparency" (e.g. "RGB+transparency").
    """
    mode = image.mode
    transparent = transparent_colour_mask(image)  # from the stored values, before any conversion
    if mode == "RGB" and transparent is None:
        return image, None
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N, I: 16/32-bit integers, 0..65535
        arr = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        scale = 255.0 if np.nanmax(arr) <= 1.0 else 1.0
        image = Image.fromarray(np.clip(np.nan_to_num(arr) * scale + 0.5, 0, 255).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba).convert("RGB")
    else:
        image = image.convert("RGB")
    if transparent is not None:
        pixels = np.array(image)
        pixels[transparent] = 255  # composited on white: the transparent colour is fully transparent
        image = Image.fromarray(pixels, "RGB")
        return image, f"{mode}+transparency"
    return image, mode


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image) or image
    except Exception:  # noqa: BLE001 - malformed EXIF: keep the pixels as stored
        return image


def square_resize(image: Image.Image, size: int) -> Image.Image:
    """Short side → size (box-halving while ≥ 2× too large, then bicubic), then centre crop size×size."""
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), Image.BOX)
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                         Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def prepare_image(image: Image.Image, max_res: int, min_size: int) -> tuple[np.ndarray, list[str]]:
    """Decode + policy + square resize: (max_res×max_res×3 uint8, report events) or SkipImage."""
    events = []
    try:
        if image.format == "JPEG":
            image.draft(None, (max_res, max_res))  # decode huge JPEGs at a reduced (still ≥ max_res) scale
        image.load()
        transparency = image.info.get("transparency")
        oriented = _apply_exif_orientation(image)
        if transparency is not None:
            oriented.info["transparency"] = transparency  # keep the tRNS colour through the transpose
        image, converted_from = to_rgb8(oriented)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise SkipImage("skipped_unreadable", f"{type(exc).__name__}: {exc}") from exc
    if converted_from is not None:
        events.append(f"converted:{converted_from}")
    short = min(image.size)
    if short < min_size:
        raise SkipImage("skipped_too_small", f"short side {short} < min_size {min_size}")
    if short < max_res:
        events.append("upscaled")
    return np.array(square_resize(image, max_res)), events


def pyramid_pngs(image: np.ndarray, resolutions: Iterable[int]) -> dict[str, bytes]:
    """The largest image and its `downsample`d smaller sizes as PNG bytes, keyed by `"{res}.png"`."""
    resolutions = sorted(resolutions)
    largest = image.shape[0]
    if image.shape != (largest, largest, 3) or image.dtype != np.uint8 or largest != resolutions[-1]:
        raise ValueError(f"expected a {resolutions[-1]}² RGB uint8 image, got {image.shape} {image.dtype}")
    x = uint8_to_float(image)[None]
    out = {}
    for res in resolutions:
        pixels = image if res == largest else float_to_uint8(downsample(x, res))[0].numpy()
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        out[f"{res}.png"] = buf.getvalue()
    return out


# ----------------------------------------------------------------------------------------------- writing

_WORKER_SOURCE: Source | None = None


def _init_worker(source: Source) -> None:
    global _WORKER_SOURCE
    _WORKER_SOURCE = source
    torch.set_num_threads(1)


def _init_pool_worker(source: Source) -> None:
    # Ctrl-C reaches every process of the terminal's group: only the parent handles it (and stops the
    # pool); a worker would otherwise die printing a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
    """Stratified seeded split; each split is then shuffled so that shards mix classes."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
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
    """Writes `{split}-%06d.tar` shards of `shard_size` samples, each atomically (temp file + rename)."""

    def __init__(self, out_dir: Path, split: str, shard_size: int):
        self.out_dir, self.split, self.shard_size = out_dir, split, shard_size
        self.names: list[str] = []
        self.count = 0
        self._writer = None
        self._tmp = None

    def write(self, cls_files: dict) -> None:
        if self._writer is None:
            name = f"{self.split}-{len(self.names):06d}.tar"
            self.names.append(name)
            self._tmp = self.out_dir / f".{name}.tmp"
            self._writer = wds.TarWriter(str(self._tmp), mtime=_TAR_MTIME, encoder=False)
        self._writer.write({"__key__": f"{self.split}{self.count:08d}", **cls_files})
        self.count += 1
        if self.count % self.shard_size == 0:
            self._finish()

    def _finish(self) -> None:
        if self._writer is not None:
            self._writer.close()
            fsync_path(self._tmp)
            os.replace(self._tmp, self.out_dir / self.names[-1])
            self._writer = None

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
    """Write the source as train/val shards + dataset.json into out_dir; returns the dataset.json dict."""
    if max_res not in RESOLUTIONS:
        raise ValueError(f"max_res must be one of {RESOLUTIONS}, got {max_res}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be ≥ 1, got {shard_size}")
    if min_size < 1:
        raise ValueError(f"min_size must be ≥ 1, got {min_size}")
    resolutions = tuple(r for r in RESOLUTIONS if r <= max_res)
    out = Path(out_dir)
    existing = _dataset_files(out)
    unfinished = (out / INCOMPLETE_MARKER).is_file()  # left by an interrupted write: replaced without asking
    if existing and not overwrite and not unfinished:
        raise FileExistsError(f"{out} already holds a dataset ({existing[0].name}, …); pass overwrite=True "
                              "(--overwrite) to replace it")
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
    finally:
        torch.set_num_threads(threads)
    for sink in sinks.values():
        sink.close()
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


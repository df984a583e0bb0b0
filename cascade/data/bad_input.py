"""The shard writer's bad-input policy: what an awkward source image becomes, which ones are skipped, and the
report of both (nothing crashes a run, nothing valid is lost; all reported at the end and in dataset.json).

- grayscale (1, L), palette (P), CMYK, YCbCr/LAB/HSV → converted to 8-bit RGB (counted per mode);
- transparency (RGBA, LA, PA, P with a transparent colour) → composited on white, then RGB; so is a
  single transparent colour (PNG tRNS, `info["transparency"]`) of RGB, L, 1 and 16-bit I;16 images, decided
  from the image's own values before any bit-depth conversion and reported as "<mode>+transparency";
- 16-bit and 32-bit integer images (I;16*, I) → scaled from 0..65535 to 0..255; float (F) images are
  taken as 0..1 when their maximum is ≤ 1, else 0..255; EXIF orientation is applied;
- short side < max_res → upscaled (bicubic) and counted; short side < min_size → skipped;
- more than `MAX_SOURCE_PIXELS` pixels (read from the header, before any decoding) → skipped as too large: a few
  KB of PNG can declare 12000×12000 pixels, 0.4 GB decoded and more in the conversions, in every worker;
- unreadable, truncated or corrupt images, and files that are not images → skipped.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Width × height of the largest source image decoded: 8192² (a 67-megapixel photo, ~200 MB as 8-bit RGB).
MAX_SOURCE_PIXELS = 8192 * 8192


class SkipImage(Exception):
    """An input the policy skips; `category` names the `BadInputReport` list it goes to."""

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
    skipped_too_large: list[str] = field(default_factory=list)  # more than MAX_SOURCE_PIXELS pixels
    notes: dict[str, list[str]] = field(default_factory=dict)  # source findings (files outside classes, …)

    def add(self, category: str, name: str) -> None:
        """Record one event: `"converted:<mode>"` or the name of a list field."""
        if category.startswith("converted:"):
            self.converted.setdefault(category.split(":", 1)[1], []).append(name)
        else:
            getattr(self, category).append(name)

    @property
    def num_skipped(self) -> int:
        return (len(self.skipped_too_small) + len(self.skipped_unreadable) + len(self.skipped_not_image)
                + len(self.skipped_too_large))

    def to_dict(self) -> dict:
        """dataset.json's "bad_input": `{category: {"count": n, "files": sorted names}}` (converted per mode)."""

        def entry(names):
            return {"count": len(names), "files": sorted(names)}

        return {
            "converted": {mode: entry(names) for mode, names in sorted(self.converted.items())},
            "upscaled": entry(self.upscaled),
            "skipped_too_small": entry(self.skipped_too_small),
            "skipped_unreadable": entry(self.skipped_unreadable),
            "skipped_not_image": entry(self.skipped_not_image),
            "skipped_too_large": entry(self.skipped_too_large),
            **{k: entry(v) for k, v in sorted(self.notes.items())},
        }

    @classmethod
    def from_dict(cls, d: dict) -> BadInputReport:
        """Inverse of `to_dict` (file names only; a report written before a category existed has it empty)."""
        fixed = ("converted", "upscaled", "skipped_too_small", "skipped_unreadable", "skipped_not_image",
                 "skipped_too_large")
        return cls(converted={mode: list(e["files"]) for mode, e in d["converted"].items()},
                   **{k: list(d[k]["files"]) for k in fixed[1:] if k in d},
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
                             (f"skipped: too large (over {MAX_SOURCE_PIXELS:,} pixels)", self.skipped_too_large),
                             *[(k.replace("_", " "), v) for k, v in sorted(self.notes.items())]]:
            if names:
                lines.append(line(label, names))
        return lines


def check_pixel_count(image: Image.Image) -> None:
    """SkipImage ("skipped_too_large") when ``image`` declares more than `MAX_SOURCE_PIXELS` pixels; reads only
    the size its header gives, so call it before decoding."""
    width, height = image.size
    if width * height > MAX_SOURCE_PIXELS:
        raise SkipImage("skipped_too_large", f"{width}×{height} pixels exceeds the {MAX_SOURCE_PIXELS:,}-pixel cap")


def open_image(path: str | Path) -> Image.Image:
    """Open an image file lazily (header only) under the size cap: SkipImage ("skipped_too_large") for more
    than `MAX_SOURCE_PIXELS` pixels, in place of Pillow's DecompressionBombWarning or DecompressionBombError
    (Pillow's own limit, checked at open); Pillow's errors for unreadable files pass through."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as exc:
            raise SkipImage("skipped_too_large", str(exc)) from None
    try:
        check_pixel_count(image)
    except SkipImage:
        image.close()
        raise
    return image


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


def apply_exif_orientation(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says, keeping its single transparent colour; as stored when the
    EXIF data is malformed."""
    transparency = image.info.get("transparency")
    try:
        oriented = ImageOps.exif_transpose(image) or image
    except Exception:  # noqa: BLE001 - malformed EXIF: keep the pixels as stored
        return image
    if transparency is not None:
        oriented.info["transparency"] = transparency  # keep the tRNS colour through the transpose
    return oriented


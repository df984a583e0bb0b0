"""One sample's images: a source image → the policy's 8-bit RGB (`cascade.data.bad_input`) → a square
max_res² crop → the resolution pyramid as PNG bytes.

The largest size is the source image centre-cropped and resized (short side → max_res: halve with a box filter
while at least twice too large, then bicubic, as guided-diffusion prepares ImageNet); every smaller size is made
from the largest with `cascade.imageops.downsample`. Every size is lossless 8-bit RGB PNG (the largest too: SR
stages then see exactly the pixels their low-resolution inputs were made from).
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np
from PIL import Image

from cascade.data.bad_input import SkipImage, apply_exif_orientation, check_pixel_count, to_rgb8
from cascade.imageops import downsample, float_to_uint8, uint8_to_float


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
    """Decode + policy + square resize: (max_res×max_res×3 uint8, report events such as "converted:L" and
    "upscaled"). Raises SkipImage ("skipped_unreadable": the pixels do not decode; "skipped_too_small": short
    side < min_size; "skipped_too_large": more than `cascade.data.bad_input.MAX_SOURCE_PIXELS`, before decoding)."""
    events = []
    check_pixel_count(image)
    try:
        if image.format == "JPEG":
            image.draft(None, (max_res, max_res))  # decode huge JPEGs at a reduced (still ≥ max_res) scale
        image.load()
        image, converted_from = to_rgb8(apply_exif_orientation(image))
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
    """The largest image (R×R×3 uint8, R = max(resolutions)) and its `downsample`d smaller sizes as PNG bytes,
    keyed by `"{res}.png"` (the image as `prepare_image` makes it)."""
    largest = image.shape[0]
    x = uint8_to_float(image)[None]
    out = {}
    for res in sorted(resolutions):
        pixels = image if res == largest else float_to_uint8(downsample(x, res))[0].numpy()
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        out[f"{res}.png"] = buf.getvalue()
    return out

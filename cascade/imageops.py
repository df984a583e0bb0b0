"""Image resizing and conversions shared by the data pipeline, the SR stages and evaluation.

One operator makes every low-resolution image in the project (shards, SR conditioning, consistency
metrics): antialiased bicubic resizing from kornia. Images are float tensors B×C×H×W in [-1, 1].
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from kornia.geometry.transform import resize as _kornia_resize
from PIL import Image

from cascade.atomic import write_atomic_with


def check_image_batch(x: torch.Tensor, name: str, *, channels: int | None = None, size: int | None = None,
                      batch: int | None = None, square: bool = False, floating: bool = False) -> None:
    """Raise a one-line ValueError unless ``x`` is a 4-D image batch B×C×H×W with, where given, B = ``batch``,
    C = ``channels``, H = W = ``size``, H = W (``square``) and a floating dtype (``floating``).

    The message names ``name``, the expected shape and what came, e.g. "x_low must have shape B×3×H×W and a
    float dtype, got (2, 3, 8) torch.float32"."""
    ok = isinstance(x, torch.Tensor) and x.ndim == 4
    if ok:
        b, c, h, w = x.shape
        ok = ((batch is None or b == batch) and (channels is None or c == channels)
              and (size is None or h == w == size) and (not square or h == w)
              and (not floating or x.is_floating_point()))
    if not ok:
        side = size if size is not None else "R" if square else None
        dims = "×".join(str(d) for d in (batch if batch is not None else "B", channels if channels is not None else "C",
                                         side if side is not None else "H", side if side is not None else "W"))
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must have shape {dims}{' and a float dtype' if floating else ''}, got {got}")


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bicubic resize of a square batch to size×size (kornia)."""
    check_image_batch(x, "x")
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    dtype = x.dtype
    out = _kornia_resize(x.float(), (size, size), interpolation="bicubic", antialias=True, align_corners=False)
    return out.to(dtype)


def downsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Make the low-resolution version of a batch: the one downsampling operator of the project."""
    check_image_batch(x, "x")
    if size > x.shape[-1]:
        raise ValueError(f"downsample to {size} from {x.shape[-1]}: target is larger than the input")
    return resize(x, size)


def upsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Upsample a low-resolution conditioning image to the SR stage's output size (bicubic)."""
    check_image_batch(x, "x")
    if size < x.shape[-1]:
        raise ValueError(f"upsample to {size} from {x.shape[-1]}: target is smaller than the input")
    return resize(x, size)


def uint8_to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """H×W×C or B×H×W×C uint8 (0..255) → float tensor in [-1, 1], channels first."""
    t = torch.as_tensor(np.asarray(images))
    if t.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {t.dtype}")
    t = t.float().div(127.5).sub(1.0)
    return t.permute(2, 0, 1).contiguous() if t.ndim == 3 else t.permute(0, 3, 1, 2).contiguous()


def float_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float tensor in [-1, 1] (C×H×W or B×C×H×W) → uint8 channels-last, rounded and clamped."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 0).contiguous() if x.ndim == 3 else x.permute(0, 2, 3, 1).contiguous()


def image_grid(images: torch.Tensor, ncol: int, pad: int = 2) -> Image.Image:
    """B×3×H×W in [-1, 1] → a PIL grid with ``ncol`` columns (row-major), white padding."""
    if ncol < 1:
        raise ValueError(f"ncol must be >= 1, got {ncol}")
    check_image_batch(images, "images")
    b, c, h, w = images.shape
    nrow = math.ceil(b / ncol)
    canvas = torch.ones(c, nrow * (h + pad) + pad, ncol * (w + pad) + pad)
    for i, img in enumerate(images.float().cpu()):
        r, col = divmod(i, ncol)
        canvas[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = img
    return Image.fromarray(float_to_uint8(canvas).numpy())


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write ``image`` as the PNG ``path`` atomically (`cascade.atomic.write_atomic_with`: a failed write, e.g.
    on a full disk, leaves no partial file and raises an OSError naming ``path``); returns the path."""
    path = Path(path)
    write_atomic_with(path, lambda f: image.save(f, format="PNG"))
    return path

"""Procedural class-conditional images: class c fixes a shape, a background texture, its frequency and a colour
palette; each image is a pure function of (seed, class, index), drawn with detail at every scale (one large
object, 3-8 small ones, 2-8 px textures, pixel noise)."""

from __future__ import annotations

import colorsys

import numpy as np

SHAPES = ("circle", "square", "triangle", "ring", "cross", "star")
TEXTURES = ("stripes", "checker", "dots", "waves")
FREQUENCIES = (6.0, 12.0, 24.0)  # background texture cycles per image (periods of ~43, 21, 11 px at 256²)

# Approximate signed distance (in units of the object radius) to each shape centred at the origin, from the
# rotated coordinates (u, v) and the radius r = hypot(u, v).
_SHAPE_DISTANCE = {
    "circle": lambda u, v, r: r - 1.0,
    "square": lambda u, v, r: np.maximum(np.abs(u), np.abs(v)) - 0.85,
    "triangle": lambda u, v, r: np.maximum(np.abs(u) * 0.866 + v * 0.5, -v) - 0.5,
    "ring": lambda u, v, r: np.abs(r - 0.75) - 0.25,
    "cross": lambda u, v, r: np.minimum(np.maximum(np.abs(u) - 1.0, np.abs(v) - 0.3),
                                        np.maximum(np.abs(u) - 0.3, np.abs(v) - 1.0)),
    "star": lambda u, v, r: r - (0.65 + 0.35 * np.cos(5.0 * np.arctan2(v, u))),
}

# Periodic patterns in [0, 1] from rotated coordinates (u, v), angular frequency w and phase.
_TEXTURE = {
    "stripes": lambda u, v, w, phase: 0.5 + 0.5 * np.sin(w * u + phase),
    "checker": lambda u, v, w, phase: 0.5 + 0.5 * np.tanh(4.0 * np.sin(w * u + phase) * np.sin(w * v)),
    "dots": lambda u, v, w, phase: np.clip(2.0 * np.cos(w * u + phase) * np.cos(w * v) - 0.6, 0.0, 1.0),
    "waves": lambda u, v, w, phase: 0.5 + 0.5 * np.sin(w * np.hypot(u - 0.5, v - 0.5) + phase),
}


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)), np.float32)


def _texture(kind: str, x: np.ndarray, y: np.ndarray, freq: float, angle: float, phase: float) -> np.ndarray:
    """A periodic pattern in [0, 1] with `freq` cycles per unit length, rotated by `angle` (radians)."""
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    return _TEXTURE[kind](u, v, 2.0 * np.pi * freq, phase)


def class_attributes(c: int) -> dict:
    """Class c's shape, texture, texture frequency (cycles per image) and hue (in [0, 1))."""
    n_shape, n_tex = len(SHAPES), len(TEXTURES)
    return {
        "shape": SHAPES[c % n_shape],
        "texture": TEXTURES[(c // n_shape) % n_tex],
        "frequency": FREQUENCIES[(c // (n_shape * n_tex)) % len(FREQUENCIES)],
        "hue": (c * 0.618034) % 1.0,  # golden-ratio spacing keeps neighbouring classes' hues apart
    }


def class_name(c: int) -> str:
    """`"<shape>-<texture>-<ccc>"`, e.g. "circle-stripes-000"."""
    attrs = class_attributes(c)
    return f"{attrs['shape']}-{attrs['texture']}-{c:03d}"


def render(seed: int, c: int, index: int, size: int) -> np.ndarray:
    """The image (size×size×3 uint8) for class c, image `index`: a pure function of (seed, c, index)."""
    attrs = class_attributes(c)
    rng = np.random.default_rng([seed, c, index])
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    y, x = np.meshgrid(coords, coords, indexing="ij")
    hue = attrs["hue"] + rng.uniform(-0.03, 0.03)
    # background: class texture between two class colours, plus a smooth gradient
    bg_a = _hsv(hue, rng.uniform(0.5, 0.8), rng.uniform(0.25, 0.45))
    bg_b = _hsv(hue + 0.08, rng.uniform(0.3, 0.6), rng.uniform(0.6, 0.85))
    freq = attrs["frequency"] * rng.uniform(0.85, 1.15)
    t = _texture(attrs["texture"], x, y, freq, rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi))
    grad = (x * np.cos(rng.uniform(0, 2 * np.pi)) + y * np.sin(rng.uniform(0, 2 * np.pi)))[..., None]
    img = bg_a + (bg_b - bg_a) * t[..., None] + 0.15 * (grad - 0.5)
    # objects: one large, then several small ones, each with a finer texture of its own
    fg_hue = hue + 0.5
    objects = [rng.uniform(0.22, 0.38)] + list(rng.uniform(0.03, 0.09, size=int(rng.integers(3, 9))))
    for k, radius in enumerate(objects):
        cx, cy = rng.uniform(radius, 1 - radius, size=2)
        angle = rng.uniform(0, 2 * np.pi)
        dx, dy = (x - cx) / radius, (y - cy) / radius
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        dist = _SHAPE_DISTANCE[attrs["shape"]](u, v, np.hypot(u, v))
        alpha = np.clip(0.5 - dist * radius * size, 0.0, 1.0)[..., None]  # ~1 px antialiased edge
        col_a = _hsv(fg_hue + rng.uniform(-0.06, 0.06), rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0))
        col_b = _hsv(fg_hue + 0.15, rng.uniform(0.4, 0.9), rng.uniform(0.3, 0.6))
        fine = _texture(TEXTURES[(TEXTURES.index(attrs["texture"]) + 1 + k) % len(TEXTURES)],
                        u * radius, v * radius, freq * rng.uniform(3.0, 5.0), 0.0, rng.uniform(0, 2 * np.pi))
        shade = 1.0 - 0.25 * np.clip(np.hypot(u, v), 0, 1)[..., None]  # radial shading
        obj = (col_a + (col_b - col_a) * fine[..., None]) * shade
        img = img * (1 - alpha) + obj * alpha
    img = img + rng.normal(0.0, 0.02, size=img.shape).astype(np.float32)  # pixel-scale detail
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

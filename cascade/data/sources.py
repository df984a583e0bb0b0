"""Image sources for the shard writer: `synthetic`, `photos`, `digits` and an ImageFolder-layout `folder`.

A source is a list of picklable `SourceItem`s (class index + a reference) and a `load(item)` that
returns a PIL image; the writer (`cascade.data.shards`) applies the bad-input policy, the square crop and
the resolution pyramid. Generated sources are deterministic functions of (seed, class, index).

- `synthetic`: procedural 256² images; each class has its own shape, background texture, texture
  frequency and colour palette, drawn with detail at every scale (large object, small objects,
  2-8 px textures, pixel noise).
- `photos`: colour photographs shipped inside scikit-image and scikit-learn (offline), one class per
  photograph, random multi-scale square crops resized to 256². Needs the `demo` extra.
- `digits`: scikit-learn's handwritten digits (`load_digits`: 1,797 real 8×8 grayscale scans of the
  digits 0-9, about 180 per class, offline), upscaled (bicubic) to 256², grayscale replicated to RGB.
  Needs the `demo` extra.
- `folder`: `root/<class name>/**/<image>` (ImageFolder / ImageNet train layout); class index by
  sorted folder name; every file under a class folder is offered to the writer, which skips
  non-images and reports them.
"""

from __future__ import annotations

import colorsys
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

GENERATED_RESOLUTION = 256

# Photographs tried in order; those that do not load offline in the installed versions are left out.
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                  "retina", "camera")
SKLEARN_PHOTOS = ("china", "flower")


@dataclass(frozen=True)
class SourceItem:
    """One image to write: its class index, a reference the source understands, and a report name."""

    class_index: int
    ref: object
    name: str


@dataclass
class Source:
    """Base class: class names, items per class, and `load(item) -> PIL.Image`."""

    kind: str = ""
    class_names: list[str] = field(default_factory=list)
    # Whether a horizontal mirror image still belongs to its class: training may then flip images at random
    # (dataset.json "hflip"). False for digits and text, where a mirrored 3 is no 3.
    hflip: bool = True

    def items_per_class(self) -> list[list[SourceItem]]:
        raise NotImplementedError

    def load(self, item: SourceItem) -> Image.Image:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind}

    def notes(self) -> dict:
        """Source-level findings for the bad-input report (e.g. files outside class folders)."""
        return {}


# ----------------------------------------------------------------------------------------------- synthetic

_SHAPES = ("circle", "square", "triangle", "ring", "cross", "star")
_TEXTURES = ("stripes", "checker", "dots", "waves")
_FREQUENCIES = (6.0, 12.0, 24.0)  # background texture cycles per image (periods of ~43, 21, 11 px at 256²)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)), np.float32)


def _shape_distance(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance (in units of the object radius) to the shape centred at the origin."""
    r = np.hypot(u, v)
    if shape == "circle":
        return r - 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.85
    if shape == "triangle":
        return np.maximum(np.abs(u) * 0.866 + v * 0.5, -v) - 0.5
    if shape == "ring":
        return np.abs(r - 0.75) - 0.25
    if shape == "cross":
        return np.minimum(np.maximum(np.abs(u) - 1.0, np.abs(v) - 0.3), np.maximum(np.abs(u) - 0.3, np.abs(v) - 1.0))
    if shape == "star":
        return r - (0.65 + 0.35 * np.cos(5.0 * np.arctan2(v, u)))
    raise ValueError(f"unknown shape {shape!r}")


def _texture(kind: str, x: np.ndarray, y: np.ndarray, freq: float, angle: float, phase: float) -> np.ndarray:
    """A periodic pattern in [0, 1] with `freq` cycles per unit length."""
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    w = 2.0 * np.pi * freq
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(w * u + phase)
    if kind == "checker":
        return 0.5 + 0.5 * np.tanh(4.0 * np.sin(w * u + phase) * np.sin(w * v))
    if kind == "dots":
        return np.clip(2.0 * np.cos(w * u + phase) * np.cos(w * v) - 0.6, 0.0, 1.0)
    if kind == "waves":
        return 0.5 + 0.5 * np.sin(w * np.hypot(u - 0.5, v - 0.5) + phase)
    raise ValueError(f"unknown texture {kind!r}")


@dataclass
class SyntheticSource(Source):
    """Procedural class-conditional images: class c fixes shape, texture, frequency and palette."""

    num_classes: int = 10
    images_per_class: int = 100
    seed: int = 0

    def __post_init__(self):
        if self.num_classes < 1 or self.images_per_class < 1:
            raise ValueError(f"synthetic source needs num_classes ≥ 1 and images_per_class ≥ 1, got "
                             f"{self.num_classes} and {self.images_per_class}")
        self.kind = "synthetic"
        self.class_names = [f"{self.class_attributes(c)['shape']}-{self.class_attributes(c)['texture']}-{c:03d}"
                            for c in range(self.num_classes)]

    def class_attributes(self, c: int) -> dict:
        n_shape, n_tex = len(_SHAPES), len(_TEXTURES)
        return {
            "shape": _SHAPES[c % n_shape],
            "texture": _TEXTURES[(c // n_shape) % n_tex],
            "frequency": _FREQUENCIES[(c // (n_shape * n_tex)) % len(_FREQUENCIES)],
            "hue": (c * 0.618034) % 1.0,  # golden-ratio spacing keeps neighbouring classes' hues apart
        }

    def items_per_class(self) -> list[list[SourceItem]]:
        return [[SourceItem(c, i, f"{self.class_names[c]}/{i:06d}") for i in range(self.images_per_class)]
                for c in range(self.num_classes)]

    def load(self, item: SourceItem) -> Image.Image:
        return Image.fromarray(self.render(item.class_index, int(item.ref)))

    def render(self, c: int, index: int, size: int = GENERATED_RESOLUTION) -> np.ndarray:
        """The image (size×size×3 uint8) for class c, image `index`: a pure function of (seed, c, index)."""
        attrs = self.class_attributes(c)
        rng = np.random.default_rng([self.seed, c, index])
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
            dist = _shape_distance(attrs["shape"], u, v)
            alpha = np.clip(0.5 - dist * radius * size, 0.0, 1.0)[..., None]  # ~1 px antialiased edge
            col_a = _hsv(fg_hue + rng.uniform(-0.06, 0.06), rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0))
            col_b = _hsv(fg_hue + 0.15, rng.uniform(0.4, 0.9), rng.uniform(0.3, 0.6))
            fine = _texture(_TEXTURES[(_TEXTURES.index(attrs["texture"]) + 1 + k) % len(_TEXTURES)],
                            u * radius, v * radius, freq * rng.uniform(3.0, 5.0), 0.0, rng.uniform(0, 2 * np.pi))
            shade = 1.0 - 0.25 * np.clip(np.hypot(u, v), 0, 1)[..., None]  # radial shading
            obj = (col_a + (col_b - col_a) * fine[..., None]) * shade
            img = img * (1 - alpha) + obj * alpha
        img = img + rng.normal(0.0, 0.02, size=img.shape).astype(np.float32)  # pixel-scale detail
        return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    def describe(self) -> dict:
        return {"kind": "synthetic", "num_classes": self.num_classes, "images_per_class": self.images_per_class,
                "resolution": GENERATED_RESOLUTION}


# ----------------------------------------------------------------------------------------------- photos

def _import_demo_packages():
    try:
        import skimage.data
        import sklearn.datasets
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"the 'photos' source needs scikit-image and scikit-learn: pip install 'cascade[demo]' ({exc})"
        ) from exc
    return skimage.data, sklearn.datasets


def load_demo_photos() -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The offline photographs, name → H×W×3 uint8 (sorted by name), and those unavailable → reason."""
    skdata, skdatasets = _import_demo_packages()
    photos, unavailable = {}, {}
    for name in SKIMAGE_PHOTOS:
        try:
            photos[name] = np.asarray(getattr(skdata, name)())
        except Exception as exc:  # noqa: BLE001 - a photo needing a download (pooch) is unavailable offline
            unavailable[name] = f"{type(exc).__name__}: {str(exc)[:80]}"
    try:
        sample = skdatasets.load_sample_images()
        photos.update((Path(f).stem, np.asarray(im)) for f, im in zip(sample.filenames, sample.images)
                      if Path(f).stem in SKLEARN_PHOTOS)
    except Exception as exc:  # noqa: BLE001
        unavailable.update({name: f"{type(exc).__name__}: {str(exc)[:80]}" for name in SKLEARN_PHOTOS})
    if not photos:
        raise ValueError(f"no demo photographs could be loaded offline from scikit-image / scikit-learn: "
                         f"{unavailable}")
    return dict(sorted(photos.items())), unavailable


@dataclass
class PhotoSource(Source):
    """One class per photograph; each item is a random square crop (side 35-100 % of the short side)."""

    images_per_class: int = 100
    seed: int = 0
    min_crop_fraction: float = 0.35

    def __post_init__(self):
        if self.images_per_class < 1:
            raise ValueError(f"images_per_class must be ≥ 1, got {self.images_per_class}")
        self.kind = "photos"
        self._photos = None
        photos, self.unavailable = load_demo_photos()
        self.class_names = list(photos)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_photos"] = None  # reloaded lazily in each writer process
        return state

    def _photo(self, c: int) -> np.ndarray:
        if self._photos is None:
            self._photos = load_demo_photos()[0]
        image = self._photos[self.class_names[c]]
        return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3]

    def items_per_class(self) -> list[list[SourceItem]]:
        return [[SourceItem(c, i, f"{name}/{i:06d}") for i in range(self.images_per_class)]
                for c, name in enumerate(self.class_names)]

    def load(self, item: SourceItem) -> Image.Image:
        image = self._photo(item.class_index)
        rng = np.random.default_rng([self.seed, item.class_index, int(item.ref)])
        h, w = image.shape[:2]
        side = round(min(h, w) * rng.uniform(self.min_crop_fraction, 1.0))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(np.ascontiguousarray(image[top:top + side, left:left + side]))
        return crop.resize((GENERATED_RESOLUTION, GENERATED_RESOLUTION), Image.BICUBIC)

    def describe(self) -> dict:
        return {"kind": "photos", "photos": self.class_names, "images_per_class": self.images_per_class,
                "crop_side_fraction": [self.min_crop_fraction, 1.0], "resolution": GENERATED_RESOLUTION,
                "unavailable_offline": sorted(self.unavailable)}


# ----------------------------------------------------------------------------------------------- digits

DIGITS_MAX_VALUE = 16  # load_digits pixels are ink counts 0..16 (Alpaydin & Kaynak's UCI "optdigits")


@dataclass
class DigitsSource(Source):
    """scikit-learn's handwritten digits: 10 classes "0".."9", 1,797 real 8×8 images in all.

    Each image is scaled from 0..16 to 0..255 (ink bright on a dark background, as stored), upscaled
    with bicubic interpolation to 256² and replicated to RGB; the writer makes the 32² level and the
    pyramid from it like for every other source. images_per_class: keep at most this many per class
    (the first in load_digits order); None keeps all.
    """

    images_per_class: int | None = None

    def __post_init__(self):
        if self.images_per_class is not None and self.images_per_class < 1:
            raise ValueError(f"images_per_class must be ≥ 1, got {self.images_per_class}")
        self.kind = "digits"
        self.hflip = False  # a mirrored 3, 7 or 9 is no digit: flipping teaches the model mirrored classes
        self._images = None
        _, targets = self._load()
        self.class_names = [str(c) for c in range(10)]
        self._indices = [[int(i) for i in np.flatnonzero(targets == c)[: self.images_per_class]] for c in range(10)]

    @staticmethod
    def _load() -> tuple[np.ndarray, np.ndarray]:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise ImportError("the 'digits' source needs scikit-learn: pip install -e .[demo]") from None
        digits = load_digits()
        return np.asarray(digits.images), np.asarray(digits.target)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_images"] = None  # reloaded lazily in each writer process
        return state

    def items_per_class(self) -> list[list[SourceItem]]:
        return [[SourceItem(c, i, f"{c}/{i:04d}") for i in indices] for c, indices in enumerate(self._indices)]

    def load(self, item: SourceItem) -> Image.Image:
        if self._images is None:
            self._images = self._load()[0]
        pixels = np.clip(self._images[int(item.ref)] * (255.0 / DIGITS_MAX_VALUE) + 0.5, 0, 255).astype(np.uint8)
        gray = Image.fromarray(pixels, "L").resize((GENERATED_RESOLUTION, GENERATED_RESOLUTION), Image.BICUBIC)
        return Image.fromarray(np.repeat(np.asarray(gray)[..., None], 3, axis=-1), "RGB")

    def describe(self) -> dict:
        return {"kind": "digits", "origin": "sklearn.datasets.load_digits (8x8)", "resolution": GENERATED_RESOLUTION,
                "images_per_class": [len(i) for i in self._indices]}


# ----------------------------------------------------------------------------------------------- folder

@dataclass
class FolderSource(Source):
    """ImageFolder layout: every sub-folder of `root` is a class (sorted names); files found recursively."""

    root: str = ""

    def __post_init__(self):
        self.kind = "folder"
        path = Path(self.root)
        if not path.is_dir():
            raise FileNotFoundError(f"source folder not found: {self.root}")
        self.class_names = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not self.class_names:
            raise ValueError(f"source folder {self.root} has no class sub-folders (expected root/<class>/<image>)")
        self._files = []
        for name in self.class_names:
            files = []
            for dirpath, dirnames, filenames in os.walk(path / name):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                files.extend(Path(dirpath, f) for f in filenames)
            self._files.append(sorted(files))
        if not any(self._files):
            raise ValueError(f"source folder {self.root} has class folders but no files in them")
        self._outside = sorted(p.name for p in path.iterdir() if p.is_file() and not p.name.startswith("."))

    def items_per_class(self) -> list[list[SourceItem]]:
        root = Path(self.root)
        return [[SourceItem(c, str(f), f.relative_to(root).as_posix()) for f in files]
                for c, files in enumerate(self._files)]

    def load(self, item: SourceItem) -> Image.Image:
        return Image.open(item.ref)

    def describe(self) -> dict:
        return {"kind": "folder", "root": str(self.root)}

    def notes(self) -> dict:
        empty = [n for n, files in zip(self.class_names, self._files) if not files]
        return {"ignored_outside_class_folders": self._outside, "empty_classes": empty}


def get_source(spec: str, *, seed: int = 0, images_per_class: int | None = None,
               num_classes: int | None = None) -> Source:
    """`synthetic`, `photos`, `digits`, or a folder path → the Source. Unused options for a source → ValueError.

    images_per_class: generated sources make that many (default 100); `digits` keeps at most that many
    of its real images per class (default all)."""
    if spec == "synthetic":
        return SyntheticSource(num_classes=10 if num_classes is None else num_classes,
                               images_per_class=100 if images_per_class is None else images_per_class, seed=seed)
    if num_classes is not None:
        raise ValueError("num_classes applies only to the synthetic source")
    if spec == "photos":
        return PhotoSource(images_per_class=100 if images_per_class is None else images_per_class, seed=seed)
    if spec == "digits":
        return DigitsSource(images_per_class=images_per_class)
    if images_per_class is not None:
        raise ValueError("images_per_class applies only to the built-in sources (synthetic, photos, digits)")
    return FolderSource(root=spec)

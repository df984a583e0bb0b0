"""Image sources for the shard writer: `synthetic`, `photos`, `patches`, `digits` and an ImageFolder-layout `folder`.

A source is a list of picklable `SourceItem`s (class index + a reference) and a `load(item)` that
returns a PIL image; the writer (`cascade.data.shards`) applies the bad-input policy, the square crop and
the resolution pyramid. Generated sources are deterministic functions of (seed, class, index). One module because
it is one job, turning a source name into items and images: every source implements the same small interface and
`get_source` chooses among them (the procedural drawing lives in `cascade.data.synthetic`).

- `synthetic`: procedural 256² images drawn by `cascade.data.synthetic`; each class has its own shape,
  background texture, texture frequency and colour palette.
- `photos`: colour photographs shipped inside scikit-image and scikit-learn (offline), one class per
  photograph, random multi-scale square crops resized to 256². Needs the `demo` extra.
- `patches`: the same photographs as classes, but each item a small patch (side 4-20 % of the short side,
  log-uniform), mildly rotated, flipped at random, colour-jittered and sometimes gray: many varied images
  per class and overlapping classes (sky, black backgrounds, gray patches), a harder benchmark than `photos`.
  Needs the `demo` extra.
- `digits`: scikit-learn's handwritten digits (`load_digits`: 1,797 real 8×8 grayscale scans of the
  digits 0-9, about 180 per class, offline), upscaled (bicubic) to 256², grayscale replicated to RGB.
  Needs the `demo` extra.
- `folder`: `root/<class name>/**/<image>` (ImageFolder / ImageNet train layout); class index by
  sorted folder name; every file under a class folder is offered to the writer, which skips
  non-images and reports them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from cascade.data import synthetic
from cascade.data.bad_input import open_image

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

@dataclass
class SyntheticSource(Source):
    """Procedural class-conditional images (`cascade.data.synthetic`): class c fixes shape, texture, frequency
    and palette. Raises ValueError for num_classes or images_per_class < 1."""

    num_classes: int = 10
    images_per_class: int = 100
    seed: int = 0

    def __post_init__(self):
        if self.num_classes < 1 or self.images_per_class < 1:
            raise ValueError(f"the synthetic source needs --num-classes and --images-per-class (num_classes, "
                             f"images_per_class) ≥ 1, got {self.num_classes} and {self.images_per_class}")
        self.kind = "synthetic"
        self.class_names = [synthetic.class_name(c) for c in range(self.num_classes)]

    def items_per_class(self) -> list[list[SourceItem]]:
        return [[SourceItem(c, i, f"{self.class_names[c]}/{i:06d}") for i in range(self.images_per_class)]
                for c in range(self.num_classes)]

    def load(self, item: SourceItem) -> Image.Image:
        return Image.fromarray(self.render(item.class_index, int(item.ref)))

    def render(self, c: int, index: int, size: int = GENERATED_RESOLUTION) -> np.ndarray:
        """The image (size×size×3 uint8) for class c, image `index`: a pure function of (seed, c, index)."""
        return synthetic.render(self.seed, c, index, size)

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
            f"the 'photos' and 'patches' sources need scikit-image and scikit-learn: pip install 'cascade[demo]' "
            f"({exc})"
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


ROTATION_MARGIN = 4  # pixels kept between a rotated crop and its drawn square: the bicubic kernel's reach


def random_square_crop(image: np.ndarray, rng: np.random.Generator, side_fraction: tuple[float, float], *,
                       log_uniform: bool = False, max_rotation: float = 0.0) -> np.ndarray:
    """A random square crop of `image` (H×W×C uint8), drawn from `rng` in this order:

    1. f, the side of the drawn square as a fraction of min(H, W): uniform in `side_fraction` = (low, high),
       0 < low ≤ high ≤ 1, or log-uniform (uniform in log f) with `log_uniform`; side L = round(f·min(H, W)).
    2. With `max_rotation` > 0 (degrees, < 45): the angle θ, uniform in [-max_rotation, max_rotation].
    3. The top and left corner of the L×L square, uniform over the positions inside the image.

    Returns the L×L square (θ = 0 or no rotation), else the square rotated by θ (bicubic) and cut to the
    largest centred S×S square whose rotated corners stay `ROTATION_MARGIN` pixels inside it,
    S = ⌊(L − margin) / (|cos θ| + |sin θ|)⌋, so no pixel comes from outside the photograph. ValueError when
    that leaves no pixel."""
    h, w = image.shape[:2]
    low, high = side_fraction
    f = math.exp(rng.uniform(math.log(low), math.log(high))) if log_uniform else rng.uniform(low, high)  # log f ~ U
    outer = max(1, round(min(h, w) * f))
    angle = float(rng.uniform(-max_rotation, max_rotation)) if max_rotation > 0 else 0.0
    top, left = int(rng.integers(0, h - outer + 1)), int(rng.integers(0, w - outer + 1))
    crop = np.ascontiguousarray(image[top:top + outer, left:left + outer])
    if angle == 0.0:
        return crop
    theta = math.radians(abs(angle))
    # a square of side S rotated by θ spans S·(|cos θ| + |sin θ|) along each axis
    side = int((outer - ROTATION_MARGIN) / (math.cos(theta) + math.sin(theta)))
    if side < 1:
        raise ValueError(f"a {outer}-pixel crop of a {h}×{w} image rotated by {angle:.1f}° leaves no pixel; "
                         f"raise the smallest crop fraction (got {low})")
    rotated = np.asarray(Image.fromarray(crop).rotate(angle, resample=Image.BICUBIC))
    offset = (outer - side) // 2
    return np.ascontiguousarray(rotated[offset:offset + side, offset:offset + side])


def _resized(crop: np.ndarray) -> Image.Image:
    return Image.fromarray(crop).resize((GENERATED_RESOLUTION, GENERATED_RESOLUTION), Image.BICUBIC)


@dataclass
class PhotoSource(Source):
    """One class per photograph; each item is a random square crop (side 35-100 % of the short side, uniform)
    resized (bicubic) to 256², a pure function of (seed, class, index). Raises ValueError for
    images_per_class < 1."""

    images_per_class: int = 100
    seed: int = 0
    min_crop_fraction: float = 0.35

    def __post_init__(self):
        if self.images_per_class < 1:
            raise ValueError(f"--images-per-class (images_per_class) must be ≥ 1, got {self.images_per_class}")
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
        return _resized(random_square_crop(image, rng, (self.min_crop_fraction, 1.0)))

    def describe(self) -> dict:
        return {"kind": "photos", "photos": self.class_names, "images_per_class": self.images_per_class,
                "crop_side_fraction": [self.min_crop_fraction, 1.0], "resolution": GENERATED_RESOLUTION,
                "unavailable_offline": sorted(self.unavailable)}


LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601 luma Y' = 0.299R' + 0.587G' + 0.114B'


def colour_jitter(crop: np.ndarray, brightness: float, contrast: float, saturation: float) -> np.ndarray:
    """H×W×3 uint8 → H×W×3 uint8 with each factor applied in turn (1 leaves the image as it is), clipped to
    0..255: brightness scales every value; contrast scales the distance to the image's mean luma; saturation
    scales each pixel's distance to its own luma (0: gray). Luma Y' from `LUMA_WEIGHTS` (ITU-R BT.601)."""
    x = crop.astype(np.float32) * brightness  # brightness: x · b
    mean_luma = float((x @ LUMA_WEIGHTS).mean())
    x = (x - mean_luma) * contrast + mean_luma  # contrast: mean(Y') + c · (x − mean(Y'))
    luma = (x @ LUMA_WEIGHTS)[..., None]
    x = luma + (x - luma) * saturation  # saturation: Y' + s · (x − Y') per pixel
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


@dataclass
class PatchSource(PhotoSource):
    """The photographs of `photos` as classes, each item a small, varied patch of its photograph: a harder
    benchmark than `photos` (many distinct images per class, regions such as sky or black background shared
    between classes).

    Item (seed, class, index), a pure function of the three (numpy generator seeded with them), drawn in order:
    a square of side f·min(H, W), f log-uniform in [min_crop_fraction, max_crop_fraction], at a uniform
    position; rotated by θ uniform in ±max_rotation degrees and cut to the largest square inside it
    (`random_square_crop`); mirrored left–right with probability 1/2; brightness, contrast and saturation
    factors each uniform in [1 − jitter, 1 + jitter], the saturation factor replaced by 0 (gray) with probability
    grayscale_probability, so a gray patch can be of any class (`colour_jitter`); resized (bicubic) to 256².
    ValueError (one line, naming the setting) for images_per_class < 1, fractions outside
    0 < min ≤ max ≤ 1, max_rotation outside [0, 45), jitter outside [0, 1) or grayscale_probability outside
    [0, 1]."""

    images_per_class: int = 400
    # 4-20 %: the tiny base32 at 10 minutes stays 4.4x above the real-image floor (6-50 %: 2.3x; 5-90 %: 1.7x;
    # measured: docs/results/2026-12-07.md)
    min_crop_fraction: float = 0.04
    max_crop_fraction: float = 0.20
    max_rotation: float = 10.0
    jitter: float = 0.25
    grayscale_probability: float = 0.2

    def __post_init__(self):
        if not 0 < self.min_crop_fraction <= self.max_crop_fraction <= 1:
            raise ValueError(f"the patches source needs 0 < min_crop_fraction <= max_crop_fraction <= 1, got "
                             f"{self.min_crop_fraction} and {self.max_crop_fraction}")
        if not 0 <= self.max_rotation < 45:
            raise ValueError(f"the patches source's max_rotation must be in [0, 45) degrees, got {self.max_rotation}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"the patches source's jitter must be in [0, 1), got {self.jitter}")
        if not 0 <= self.grayscale_probability <= 1:
            raise ValueError(f"the patches source's grayscale_probability must be in [0, 1], got "
                             f"{self.grayscale_probability}")
        super().__post_init__()
        self.kind = "patches"

    def load(self, item: SourceItem) -> Image.Image:
        image = self._photo(item.class_index)
        rng = np.random.default_rng([self.seed, item.class_index, int(item.ref)])
        crop = random_square_crop(image, rng, (self.min_crop_fraction, self.max_crop_fraction), log_uniform=True,
                                  max_rotation=self.max_rotation)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        brightness, contrast, saturation = rng.uniform(1 - self.jitter, 1 + self.jitter, size=3)
        if rng.random() < self.grayscale_probability:
            saturation = 0.0
        return _resized(colour_jitter(crop, brightness, contrast, saturation))

    def describe(self) -> dict:
        return {"kind": "patches", "photos": self.class_names, "images_per_class": self.images_per_class,
                "crop_side_fraction": [self.min_crop_fraction, self.max_crop_fraction],
                "crop_side_distribution": "log-uniform", "max_rotation_degrees": self.max_rotation,
                "rotation_margin_pixels": ROTATION_MARGIN, "mirror_probability": 0.5,
                "colour_jitter": {"brightness": self.jitter, "contrast": self.jitter, "saturation": self.jitter},
                "grayscale_probability": self.grayscale_probability,
                "resolution": GENERATED_RESOLUTION, "unavailable_offline": sorted(self.unavailable)}


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
            raise ValueError(f"--images-per-class (images_per_class) must be ≥ 1, got {self.images_per_class}")
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
        return open_image(item.ref)  # header only; SkipImage beyond the pixel cap

    def describe(self) -> dict:
        return {"kind": "folder", "root": str(self.root)}

    def notes(self) -> dict:
        empty = [n for n, files in zip(self.class_names, self._files) if not files]
        return {"ignored_outside_class_folders": self._outside, "empty_classes": empty}


def get_source(spec: str, *, seed: int = 0, images_per_class: int | None = None,
               num_classes: int | None = None) -> Source:
    """`synthetic`, `photos`, `patches`, `digits`, or a folder path → the Source. Unused options for a source →
    ValueError.

    images_per_class: generated sources make that many (default 100; `patches` 400); `digits` keeps at most
    that many of its real images per class (default all)."""
    if spec == "synthetic":
        return SyntheticSource(num_classes=10 if num_classes is None else num_classes,
                               images_per_class=100 if images_per_class is None else images_per_class, seed=seed)
    if num_classes is not None:
        raise ValueError("--num-classes (num_classes) applies only to the synthetic source")
    if spec == "photos":
        return PhotoSource(images_per_class=100 if images_per_class is None else images_per_class, seed=seed)
    if spec == "patches":
        return PatchSource(seed=seed) if images_per_class is None else PatchSource(images_per_class=images_per_class,
                                                                                 seed=seed)
    if spec == "digits":
        return DigitsSource(images_per_class=images_per_class)
    if images_per_class is not None:
        raise ValueError("--images-per-class (images_per_class) applies only to the built-in sources (synthetic, "
                         "photos, patches, digits)")
    return FolderSource(root=spec)

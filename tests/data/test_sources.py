"""The `patches` source and the crop and colour helpers it shares with `photos`."""

from __future__ import annotations

import dataclasses
import math
import pickle

import numpy as np
import pytest

from cascade.data.sources import (
    ROTATION_MARGIN,
    PatchSource,
    PhotoSource,
    colour_jitter,
    get_source,
    random_square_crop,
)


@pytest.fixture(scope="module")
def patches():
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    return get_source("patches", seed=1, images_per_class=3)


def _pixels(source, item):
    return np.asarray(source.load(item))


def test_patches_are_a_pure_function_of_seed_class_and_index(patches):
    items = patches.items_per_class()
    first = _pixels(patches, items[2][1])
    assert first.shape == (256, 256, 3) and first.dtype == np.uint8
    assert np.array_equal(first, _pixels(patches, items[2][1]))
    assert not np.array_equal(first, _pixels(patches, items[2][0]))
    again = pickle.loads(pickle.dumps(patches))  # what a writer process receives
    assert again._photos is None and np.array_equal(first, _pixels(again, items[2][1]))
    other_seed = PatchSource(images_per_class=3, seed=2)
    assert not np.array_equal(first, _pixels(other_seed, items[2][1]))


def test_patches_classes_counts_and_default_size(patches):
    assert patches.kind == "patches" and patches.hflip
    assert patches.class_names == PhotoSource(images_per_class=1).class_names
    items = patches.items_per_class()
    assert [len(per_class) for per_class in items] == [3] * len(patches.class_names)
    assert all(item.class_index == c for c, per_class in enumerate(items) for item in per_class)
    assert get_source("patches").images_per_class == 400


def test_patches_describe_records_every_setting(patches):
    described = patches.describe()
    assert described["kind"] == "patches" and described["photos"] == patches.class_names
    assert described["images_per_class"] == 3
    assert described["crop_side_fraction"] == [patches.min_crop_fraction, patches.max_crop_fraction]
    assert described["crop_side_distribution"] == "log-uniform"
    assert described["max_rotation_degrees"] == patches.max_rotation
    assert described["rotation_margin_pixels"] == ROTATION_MARGIN
    assert described["colour_jitter"] == {k: patches.jitter for k in ("brightness", "contrast", "saturation")}
    assert described["grayscale_probability"] == patches.grayscale_probability
    assert described["mirror_probability"] == 0.5 and described["resolution"] == 256
    settings = {f.name for f in dataclasses.fields(PatchSource)} - {"kind", "class_names", "hflip", "seed"}
    assert settings == {"images_per_class", "min_crop_fraction", "max_crop_fraction", "max_rotation", "jitter",
                        "grayscale_probability"}  # a setting added here must be added to describe() too


def _coordinates(h: int, w: int) -> np.ndarray:
    """An H×W×3 uint8 image whose pixel (y, x) spells its own coordinates: (y mod 256, x mod 256, the rest)."""
    y, x = np.mgrid[:h, :w]
    return np.stack([y % 256, x % 256, (y // 256) * 16 + x // 256], axis=-1).astype(np.uint8)


def test_unrotated_crops_are_squares_of_the_image_within_the_fraction_range():
    image = _coordinates(300, 451)
    rng = np.random.default_rng(0)
    for _ in range(50):
        crop = random_square_crop(image, rng, (0.06, 0.5), log_uniform=True)
        side = crop.shape[0]
        assert crop.shape == (side, side, 3) and round(300 * 0.06) <= side <= round(300 * 0.5)
        low_y, low_x, high = (int(v) for v in crop[0, 0])
        top, left = low_y + 256 * (high // 16), low_x + 256 * (high % 16)
        assert np.array_equal(crop, image[top:top + side, left:left + side])


def test_rotated_crops_take_no_pixel_from_outside_the_image():
    white = np.full((120, 200, 3), 255, np.uint8)
    rng = np.random.default_rng(0)
    sides = []
    for _ in range(50):
        crop = random_square_crop(white, rng, (0.2, 1.0), max_rotation=30.0)
        sides.append(crop.shape[0])
        assert crop.shape[:2] == (sides[-1], sides[-1]) and crop.min() == 255  # no fill from beyond the edge
    smallest = int((round(120 * 0.2) - ROTATION_MARGIN) / (math.cos(math.radians(30)) + math.sin(math.radians(30))))
    assert min(sides) >= smallest and max(sides) <= 120
    with pytest.raises(ValueError, match="leaves no pixel"):
        random_square_crop(white, np.random.default_rng(0), (0.01, 0.02), max_rotation=30.0)


def test_colour_jitter_factors():
    crop = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert np.array_equal(colour_jitter(crop, 1.0, 1.0, 1.0), crop)
    gray = colour_jitter(crop, 1.0, 1.0, 0.0)
    assert np.abs(gray.astype(int) - gray[..., :1]).max() <= 1  # R = G = B up to rounding
    assert colour_jitter(crop, 0.5, 1.0, 1.0).mean() < crop.mean()


@pytest.mark.parametrize("kwargs, message", [
    ({"min_crop_fraction": 0.6, "max_crop_fraction": 0.5}, "0 < min_crop_fraction <= max_crop_fraction <= 1"),
    ({"max_crop_fraction": 1.5}, "0 < min_crop_fraction <= max_crop_fraction <= 1"),
    ({"max_rotation": 45.0}, "max_rotation must be in [0, 45)"),
    ({"jitter": 1.0}, "jitter must be in [0, 1)"),
    ({"grayscale_probability": -0.1}, "grayscale_probability must be in [0, 1]"),
    ({"images_per_class": 0}, "--images-per-class (images_per_class) must be ≥ 1"),
])
def test_bad_patch_settings_are_one_line_errors(patches, kwargs, message):
    with pytest.raises(ValueError, match=None) as error:
        PatchSource(**kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_options_of_other_sources_are_refused_for_patches():
    with pytest.raises(ValueError, match=r"^--num-classes \(num_classes\) applies only to the synthetic source$"):
        get_source("patches", num_classes=3)

"""The metrics that need the training split: CAS and memorisation, wired to shard folders.

- CAS (`cascade.evaluation.cas`): a sample list of N generated images per class (`CASData.sample_list`;
  teacher-forced SR stages take the low-resolution versions of N real *training* images per class, never val
  images, which are the test set), the same N real training images per class for the ceiling, and every real
  val image as the test set, all at the stage's resolution (`CASReference`).
- Memorisation (`cascade.evaluation.memorisation`): every training image's features (in a feature network's
  space) and 32² pixels, and the same of the val images for the chance rate (`MemorisationReference`).

Both read the splits once per resolution (`cascade.data.splits.read_split`) and keep the result in memory (not
on disk); they suit datasets of up to some ten thousand training images (memorisation holds every training
image at the stage's resolution). Images are float B×3×R×R in [-1, 1] throughout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cascade.data.shard_folder import dataset_hflip, read_dataset_info
from cascade.data.splits import read_split
from cascade.evaluation.cas import CASSettings, cas_with_ceiling, classification_accuracy_score
from cascade.evaluation.features import FeatureNet, extract_features
from cascade.evaluation.memorisation import PIXEL_SIZE, RATIO, memorisation, pixel_vectors
from cascade.evaluation.sample_lists import EvalData, load_eval_data, process_slice
from cascade.evaluation.settings import MetricSettings
from cascade.pipeline.cascade_pipeline import CascadeConfigError, CascadePipeline

PAIRS_SHOWN = 8  # closest (sample, training image) pairs saved per stage


def _first_per_class(labels: torch.Tensor, per_class: int, num_classes: int, root: Path) -> torch.Tensor:
    """Indices of the first `per_class` images of every class (class-major); an error names the short class."""
    picked = []
    for c in range(num_classes):
        index = (labels == c).nonzero().flatten()
        if len(index) < per_class:
            raise CascadeConfigError(f"cas: class {c} has {len(index)} training images in {root}, fewer than the "
                                     f"{per_class} per class the real ceiling needs; pass --cas {len(index)} or less")
        picked.append(index[:per_class])
    return torch.cat(picked)


@dataclass
class CASReference:
    """The real sides of CAS at one resolution: the ceiling's training images (N per class, class-major) and
    the val test set, float N×3×R×R in [-1, 1]."""

    train: torch.Tensor
    train_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    ceiling: dict[str, float] | None = None


class CASData:
    """CAS for one evaluation: the generated-sample list and, per resolution, the real sets (read lazily).
    per_class and settings come checked (`cascade.evaluation.settings.MetricSettings`)."""

    def __init__(self, root: str | Path, num_classes: int, per_class: int, settings: CASSettings):
        self.root = Path(root)
        self.num_classes = num_classes
        self.per_class = per_class
        self.settings = settings
        self.hflip = dataset_hflip(read_dataset_info(self.root))  # flip only where mirror images keep their class
        self._refs: dict[int, CASReference] = {}

    def sample_list(self, batch_size: int, rank: int = 0, world_size: int = 1,
                    low_resolutions: tuple[int, ...] = (), read_at: int = 32) -> EvalData:
        """N samples per class (class-major); teacher-forced inputs (low_resolutions) from the ceiling's
        training images. Checks first that every class has N training images (reading labels at `read_at`)."""
        labels = torch.arange(self.num_classes).repeat_interleave(self.per_class)
        samples = process_slice(len(labels), batch_size, rank, world_size)
        train_labels, images = read_split(self.root, "train", list(low_resolutions) or [read_at],
                                          keep=low_resolutions)
        index = _first_per_class(train_labels, self.per_class, self.num_classes, self.root)
        low_res = {r: images[r][index[samples.start : samples.stop]] for r in low_resolutions}
        return EvalData(self.root, labels, 0, samples, low_res)

    def reference(self, resolution: int) -> CASReference:
        if resolution not in self._refs:
            train_labels, train = read_split(self.root, "train", [resolution], keep=[resolution])
            index = _first_per_class(train_labels, self.per_class, self.num_classes, self.root)
            test_labels, test = read_split(self.root, "val", [resolution], keep=[resolution])
            if not len(test_labels):
                raise CascadeConfigError(f"cas: {self.root} has no val images to test on")
            self._refs[resolution] = CASReference(train[resolution][index], train_labels[index],
                                                  test[resolution], test_labels)
        return self._refs[resolution]

    def score(self, images: torch.Tensor, labels: torch.Tensor, seed: int = 0,
              device: str | torch.device = "cpu") -> dict[str, Any]:
        """CAS of generated float N×3×R×R images in [-1, 1] (labels: their classes) with the real ceiling at R."""
        ref = self.reference(images.shape[-1])
        test = ref.test.to(device)
        if ref.ceiling is None:
            ref.ceiling = classification_accuracy_score(ref.train.to(device), ref.train_labels,
                                                        test, ref.test_labels, self.num_classes, self.settings,
                                                        seed=seed, hflip=self.hflip)
        return cas_with_ceiling(images.to(device), labels, None, ref.train_labels, test,
                                ref.test_labels, self.num_classes, self.settings, seed=seed, ceiling=ref.ceiling,
                                hflip=self.hflip)


@dataclass
class MemorisationReference:
    """Training and val images of one resolution in a feature network's space and in 32² pixels."""

    train_images: torch.Tensor  # float M×3×R×R in [-1, 1]
    train_labels: torch.Tensor
    train_features: torch.Tensor
    train_pixels: torch.Tensor
    val_features: torch.Tensor
    val_pixels: torch.Tensor


class MemorisationCheck:
    """Memorisation of generated images against the training split, in `feature_net`'s space and in pixels."""

    def __init__(self, root: str | Path, feature_net: FeatureNet, ratio: float = RATIO, batch_size: int = 64):
        self.root, self.net, self.ratio, self.batch_size = Path(root), feature_net, ratio, batch_size
        self._refs: dict[int, MemorisationReference] = {}

    def reference(self, resolution: int) -> MemorisationReference:
        if resolution not in self._refs:
            sets = {}
            for split in ("train", "val"):
                labels, images = read_split(self.root, split, [resolution], keep=[resolution])
                if not len(labels):
                    raise CascadeConfigError(f"memorisation: {self.root} has no readable {split} images")
                x = images[resolution]
                sets[split] = (labels, x, extract_features(self.net, x, batch_size=self.batch_size),
                               pixel_vectors(x, PIXEL_SIZE))
            (labels, images, features, pixels), (_, _, val_features, val_pixels) = sets["train"], sets["val"]
            self._refs[resolution] = MemorisationReference(images, labels, features, pixels, val_features,
                                                           val_pixels)
        return self._refs[resolution]

    def check(self, images: torch.Tensor) -> tuple[dict[str, Any], tuple[torch.Tensor, torch.Tensor]]:
        """(summary for the report, (samples, their nearest training images)) of generated float N×3×R×R
        images in [-1, 1]: the `PAIRS_SHOWN` samples closest to a training image in pixel space (relative to
        the threshold), float K×3×R×R each. Errors (no class with two training images) are one line."""
        ref = self.reference(images.shape[-1])
        x = images.cpu()
        try:
            feature = memorisation(extract_features(self.net, x, batch_size=self.batch_size), ref.train_features,
                                   ref.train_labels, held_out=ref.val_features, ratio=self.ratio)
            pixel = memorisation(pixel_vectors(x, PIXEL_SIZE), ref.train_pixels, ref.train_labels,
                                 held_out=ref.val_pixels, ratio=self.ratio)
        except ValueError as err:
            raise CascadeConfigError(str(err)) from None
        closest = (pixel["distance"] / pixel["threshold"]).argsort()[:PAIRS_SHOWN]
        neighbours = ref.train_images[pixel["index"][closest]]
        summary = {"feature_net": self.net.name, "ratio": self.ratio, "num_samples": len(x),
                   "num_train": len(ref.train_labels),
                   "fraction_feature": feature["fraction"], "fraction_pixel": pixel["fraction"],
                   "val_fraction_feature": feature["held_out_fraction"],
                   "val_fraction_pixel": pixel["held_out_fraction"],
                   "threshold_feature": feature["threshold"], "threshold_pixel": pixel["threshold"],
                   "median_distance_feature": float(feature["distance"].median()),
                   "median_distance_pixel": float(pixel["distance"].median())}
        return summary, (x[closest], neighbours)


@dataclass
class SampleLists:
    """What an evaluation samples: the val sample list, the CAS scorer and its own list (None without CAS),
    and every class either list holds (the classes its plans are validated for)."""

    data: EvalData
    cas: CASData | None
    cas_list: EvalData | None
    classes: list[int]


def load_sample_lists(pipeline: CascadePipeline, data_root: str | Path, metrics: MetricSettings, *,
                      low_resolutions: Sequence[int], num_samples: int | None, batch_size: int, rank: int,
                      world: int) -> SampleLists:
    """The sample lists of an evaluation or sweep of ``pipeline`` on the val split of ``data_root`` (inputs
    at ``low_resolutions`` for teacher forcing), checked against ``metrics`` (enough samples for its k)."""
    data = load_eval_data(data_root, pipeline, num_samples=num_samples, batch_size=batch_size, rank=rank,
                          world_size=world, low_resolutions=low_resolutions,
                          allow_damaged_val=metrics.allow_damaged_val)
    metrics.check_sample_count(data.num_samples)
    base = pipeline.stages[0].config
    cas = None if metrics.cas_per_class is None else CASData(data.root, base.num_classes, metrics.cas_per_class,
                                                             metrics.cas)
    cas_list = None if cas is None else cas.sample_list(batch_size, rank, world, tuple(low_resolutions),
                                                        read_at=base.resolution)
    classes = sorted(set(data.labels.tolist()) | (set() if cas_list is None else set(cas_list.labels.tolist())))
    return SampleLists(data, cas, cas_list, classes)

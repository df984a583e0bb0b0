"""The judge: a plain small CNN classifier trained on a dataset's real train split, scoring generated images.

A sample-quality judge in the spirit of the Classification Accuracy Score / FID-with-a-domain-classifier:
generated images are classified (class accuracy against the class they were generated for) and compared
with the real val images in the judge's penultimate features (Fréchet distance, Heusel et al. 2017 "GANs
trained by a two time-scale update rule" eq. 6; KID, Bińkowski et al. 2018 "Demystifying MMD GANs",
unbiased MMD² with the cubic polynomial kernel, mean ± std over subsets), through `cascade.evaluation.metrics`.
The judge never sees samples. Its own accuracy on real val images is the ceiling of class accuracy, and
the real train split scored against the val split is the floor of FD / KID (what a perfect generator of
new images from the data distribution would get with these sample counts).

The judge is deterministic for a seed (fixed initialisation, shuffles and augmentation from private
generators; the global RNG is left untouched) and cached next to the shards in `<data>/judge/`, keyed by
the shards' fingerprint (`cascade.evaluation.reference_stats.shard_fingerprint` of train and val) and every setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from torch import nn

from cascade.atomic import write_atomic
from cascade.checks import is_int_at_least
from cascade.data.shard_folder import dataset_hflip, read_dataset_info
from cascade.data.splits import read_split, split_batches
from cascade.evaluation.cas import CASSettings, cas_with_ceiling
from cascade.evaluation.features import ClassifierFeatures
from cascade.evaluation.metrics import class_accuracy, compute_fid_kid
from cascade.evaluation.reference_stats import cached_reference_stats, shard_fingerprint
from cascade.imageops import float_to_uint8, uint8_to_float

JUDGE_FORMAT_VERSION = 1
JUDGE_DIR = "judge"
REFERENCE_SPLIT = "val"


@dataclass(frozen=True)
class JudgeSettings:
    """How the judge is built and trained. width: channels of the first conv block (doubled twice);
    features: size of the penultimate layer (the feature space of FD / KID); shift: random translation of
    the training images by up to this many pixels (no flips: digits and text are not mirror-symmetric)."""

    width: int = 16
    features: int = 64
    epochs: int = 8
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    shift: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("width", "features", "epochs", "batch_size"):
            value = getattr(self, name)
            if not is_int_at_least(value, 1):
                raise ValueError(f"judge {name} must be an integer >= 1, got {value!r}")
        if not is_int_at_least(self.shift, 0):
            raise ValueError(f"judge shift must be an integer >= 0, got {self.shift!r}")
        if not self.lr > 0 or not self.weight_decay >= 0:
            raise ValueError(f"judge lr must be > 0 and weight_decay >= 0, got {self.lr} and {self.weight_decay}")


class JudgeNet(nn.Module):
    """3×3 conv–GroupNorm–ReLU blocks: one at R², 2× max-pool, two at (R/2)², 2× max-pool, one at (R/4)² with
    global average pooling → linear → tanh (the `features`-d penultimate layer, bounded so that FD / KID have a
    fixed scale) → `head` (linear logits). Input B×3×R×R in [-1, 1]. GroupNorm, not BatchNorm: no running
    statistics, so a briefly trained judge behaves the same in training and evaluation."""

    def __init__(self, num_classes: int, width: int = 16, features: int = 64):
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.GroupNorm(min(8, c_out), c_out), nn.ReLU()]

        w = width
        self.body = nn.Sequential(
            *block(3, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * w, features), nn.Tanh(),
        )
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass
class Judge:
    """A trained judge as a `FeatureNet` (`features`: penultimate features and logits at `resolution`),
    its accuracy on the real val split (the ceiling of class accuracy) and where it came from."""

    features: ClassifierFeatures
    settings: JudgeSettings
    resolution: int
    data_root: Path
    val_accuracy: float
    path: Path
    from_cache: bool
    train_seconds: float

    def source(self) -> str:
        """One line naming the judge for results: "judge (trained on <data> train split, 93.0% on val)"."""
        return f"judge (trained on {self.data_root} train split, {100 * self.val_accuracy:.1f}% on val)"

    def describe(self) -> dict[str, Any]:
        return {"name": self.features.name, "resolution": self.resolution, "settings": dataclasses.asdict(self.settings),
                "val_accuracy": self.val_accuracy, "path": str(self.path),
                "from_cache": self.from_cache, "train_seconds": self.train_seconds,
                "num_features": self.features.num_features}


def load_split(root: str | Path, split: str, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a split at `resolution` (N×3×R×R float in [-1, 1]) and its labels (N long)."""
    labels, images = read_split(Path(root), split, [resolution], keep=[resolution])
    if resolution not in images:
        raise ValueError(f"the {split} split of {root} has no readable images")
    return images[resolution], labels


def _shifted(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image translated by (dy, dx) ∈ [−shift, shift]² (edge pixels replicated)."""
    if shift == 0:
        return x
    size = x.shape[-1]
    padded = F.pad(x, (shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * shift + 1, (x.shape[0], 2), generator=generator).tolist()
    return torch.stack([p[:, dy : dy + size, dx : dx + size] for p, (dy, dx) in zip(padded, offsets)])


def train_judge(images: torch.Tensor, labels: torch.Tensor, num_classes: int, settings: JudgeSettings) -> JudgeNet:
    """Train a JudgeNet on real images (N×3×R×R in [-1, 1]) with AdamW and cross-entropy; a pure function of
    (images, labels, settings) on a given machine and thread count."""
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        net = JudgeNet(num_classes, settings.width, settings.features)
    optimizer = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps = settings.epochs * -(-len(images) // settings.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=steps)
    net.train()
    for _ in range(settings.epochs):
        order = torch.randperm(len(images), generator=generator)
        for batch in order.split(settings.batch_size):
            x = _shifted(images[batch], settings.shift, generator)
            loss = F.cross_entropy(net(x), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return net.eval().requires_grad_(False)


def _cache_key(root: Path, resolution: int, num_classes: int, settings: JudgeSettings) -> dict[str, Any]:
    return {"format_version": JUDGE_FORMAT_VERSION, "resolution": resolution, "num_classes": num_classes,
            "settings": dataclasses.asdict(settings), "train_data": shard_fingerprint(root, "train"),
            "val_data": shard_fingerprint(root, REFERENCE_SPLIT)}


def judge_path(root: str | Path, key: dict[str, Any]) -> Path:
    """`<root>/judge/judge<R>-<hash of the key>.safetensors` (JSON sidecar: same stem, .json)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(root) / JUDGE_DIR / f"judge{key['resolution']}-{digest}.safetensors"


def _real_uint8(images: torch.Tensor) -> torch.Tensor:
    return uint8_to_float(float_to_uint8(images))


def get_judge(data_root: str | Path, resolution: int, settings: JudgeSettings = JudgeSettings(), *,
              batch_size: int = 256, log=None) -> Judge:
    """The judge of these shards at `resolution`: loaded from `<data>/judge/` when a judge with the same key
    (shard fingerprints and settings) is there, else trained on the train split and stored with its val
    accuracy. FileNotFoundError / ValueError (one line) when the shards lack a split or the resolution."""
    root = Path(data_root)
    info = read_dataset_info(root)
    if resolution not in info["resolutions"]:
        raise ValueError(f"{root} has resolutions {sorted(info['resolutions'])}, the judge needs {resolution}; "
                         f"rewrite the shards with --max-res >= {resolution}")
    num_classes = len(info["class_names"])
    key = _cache_key(root, resolution, num_classes, settings)
    path = judge_path(root, key)
    sidecar = path.with_suffix(".json")
    stored = json.loads(sidecar.read_text()) if sidecar.is_file() and path.is_file() else None
    name = f"judge{resolution}-{path.stem.split('-')[-1]}"
    if stored is not None and stored.get("key") == key:
        net = JudgeNet(num_classes, settings.width, settings.features)
        net.load_state_dict(load_file(str(path)))
        net.eval().requires_grad_(False)
        features = ClassifierFeatures(net, name, resolution, head="head", noise_aware=False)
        return _named(Judge(features, settings, resolution, root, stored["val_accuracy"], path, True,
                            stored["train_seconds"]))
    if log is not None:
        log(f"training the judge ({settings.epochs} epochs) on the train split of {root} at {resolution}²")
    started = time.perf_counter()
    train_images, train_labels = load_split(root, "train", resolution)
    net = train_judge(train_images, train_labels, num_classes, settings)
    train_seconds = time.perf_counter() - started
    features = ClassifierFeatures(net, name, resolution, head="head", noise_aware=False)
    val_images, val_labels = load_split(root, REFERENCE_SPLIT, resolution)
    val_accuracy = class_accuracy(features.logits, val_images, val_labels, batch_size=batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = save_safetensors({k: v.contiguous() for k, v in net.state_dict().items()})
    write_atomic(path, weights, tmp_suffix=f".tmp{os.getpid()}")  # a full disk: no leftovers, the file named
    record = {"key": key, "val_accuracy": val_accuracy, "train_seconds": train_seconds,
              "num_train": len(train_images), "num_val": len(val_images),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_atomic(sidecar, json.dumps(record, indent=2) + "\n", tmp_suffix=f".tmp{os.getpid()}")
    return _named(Judge(features, settings, resolution, root, val_accuracy, path, False, train_seconds))


def _named(judge: Judge) -> Judge:
    judge.features.source = judge.source()
    return judge


def judge_reference(features: ClassifierFeatures, root: Path, resolution: int, batch_size: int = 256):
    """The judge's statistics of the real val split (cached in `<data>/fid_stats/` by `cascade.evaluation.metrics`)."""
    return cached_reference_stats(root, REFERENCE_SPLIT, resolution, features,
                                  lambda: split_batches(root, REFERENCE_SPLIT, resolution, batch_size),
                                  batch_size=batch_size)


PR_K = 3  # k of the k-NN manifolds of precision / recall (Kynkäänniemi et al. 2019)


def _fd_kid(reference, images: torch.Tensor, features: ClassifierFeatures, batch_size: int, seed: int) -> dict:
    pr_k = PR_K if len(images) > PR_K else None
    result = compute_fid_kid(reference, images, features, batch_size=batch_size, inception_score=False, seed=seed,
                             pr_k=pr_k)
    return {"fd": result["fid"], "kid_mean": result["kid_mean"], "kid_std": result["kid_std"],
            "precision": result.get("precision"), "recall": result.get("recall"),
            "num_real": result["num_real"], "num_fake": result["num_fake"]}


def score(judge: Judge, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 256, seed: int = 0,
          cas: CASSettings | None = None, reference=None) -> dict[str, float]:
    """Generated images (N×3×R×R in [-1, 1], quantised to uint8 first as saved PNGs would be) against the
    real val split: {"class_accuracy", "fd", "kid_mean", "kid_std", "precision", "recall" (k = 3, in the
    judge's features), "num_real", "num_fake"}; with ``cas`` also the Classification Accuracy Score
    (Ravuri & Vinyals 2019): "cas_top1" of a fresh small CNN trained on these images, tested on the real val
    split, next to "cas_real_top1", the same CNN trained on as many real train images (`cascade.evaluation.cas`).
    ``reference``: the val split's statistics (`judge_reference`), when the caller holds them; else read here."""
    images = _real_uint8(images)
    if reference is None:
        reference = judge_reference(judge.features, judge.data_root, judge.resolution, batch_size=batch_size)
    result = _fd_kid(reference, images, judge.features, batch_size, seed)
    result["class_accuracy"] = class_accuracy(judge.features.logits, images, labels, batch_size=batch_size)
    if cas is not None:
        info = read_dataset_info(judge.data_root)
        num_classes = len(info["class_names"])
        real, real_labels = _balanced_subset(*load_split(judge.data_root, "train", judge.resolution), labels, seed)
        test, test_labels = load_split(judge.data_root, REFERENCE_SPLIT, judge.resolution)
        found = cas_with_ceiling(images, labels, real, real_labels, test, test_labels, num_classes, cas, seed=seed,
                                 hflip=dataset_hflip(info))
        result.update(cas_top1=found["top1"], cas_real_top1=found["real_top1"])
    return result


def _balanced_subset(images: torch.Tensor, labels: torch.Tensor, like: torch.Tensor,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As many real images of each class as ``like`` holds labels of it (a seeded choice); ValueError when a
    class has too few."""
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for c, n in zip(*torch.unique(like, return_counts=True)):
        pool = torch.nonzero(labels == c).flatten()
        if len(pool) < n:
            raise ValueError(f"CAS: class {int(c)} has {len(pool)} real train images, fewer than the {int(n)} "
                             "generated ones; lower --per-class")
        keep.append(pool[torch.randperm(len(pool), generator=generator)[: int(n)]])
    keep = torch.cat(keep)
    return images[keep], labels[keep]


def real_floor(judge: Judge, num_images: int, *, batch_size: int = 256, seed: int = 0) -> dict[str, float]:
    """The floor of FD / KID: `num_images` real train images (a seeded random subset; all when fewer) scored
    against the val split like samples, so the sample count's bias is the same as the samples'. Also their
    class accuracy (the judge saw them in training: an upper bound, not a test accuracy)."""
    images, labels = load_split(judge.data_root, "train", judge.resolution)
    if num_images < len(images):
        keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:num_images]
        images, labels = images[keep], labels[keep]
    return score(judge, images, labels, batch_size=batch_size, seed=seed)

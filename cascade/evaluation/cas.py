"""Classification Accuracy Score (Ravuri & Vinyals 2019, "Classification Accuracy Score for Conditional
Generative Models"), as reported for cascades by Ho et al. 2021 "Cascaded Diffusion Models", table 2.

Train a fresh classifier on generated images only (labelled with the class they were sampled for), test it on
real held-out images: a generator scores well only when its samples carry each class's features *and* vary as
much as the real class does (a classifier trained on one copied image per class generalises badly). The same
classifier trained on as many real training images is the ceiling the generated data is measured against.

The classifier is a plain CNN (`SmallCNN`), trained from a fixed seed with a private generator (weights,
batches, flips), so the score is deterministic for a seed on CPU (on CUDA up to its non-deterministic
convolution kernels). Images are float B×3×R×R in [-1, 1]; labels are class indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy

from cascade.checks import is_int_at_least
from cascade.errors import plural
from cascade.imageops import check_image_batch


@dataclass(frozen=True)
class CASSettings:
    """How the CAS classifier is trained: optimiser steps, batch size, AdamW learning rate, CNN width."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    width: int = 32

    def __post_init__(self):
        for what in ("steps", "batch_size", "width"):
            value = getattr(self, what)
            if not is_int_at_least(value, 1):
                raise ValueError(f"CAS {what} must be an integer >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"CAS lr must be > 0, got {self.lr}")


DEFAULT_CAS = CASSettings()


class SmallCNN(nn.Module):
    """A plain CNN classifier for R×R images (R a power of two >= 8): 3×3 convolutions, each halving the size
    down to 8² (the first at stride 2 from 64² up), GroupNorm + SiLU, global average pooling, a linear head."""

    def __init__(self, resolution: int, num_classes: int, width: int = 32):
        super().__init__()
        if resolution < 8 or resolution & (resolution - 1):
            raise ValueError(f"CAS: resolution must be a power of two >= 8, got {resolution}")
        stride = 2 if resolution >= 64 else 1
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, stride=stride, padding=1), nn.GroupNorm(8, width),
                                   nn.SiLU()]
        size, ch = resolution // stride, width
        while size > 8:
            out = min(2 * ch, 4 * width)
            layers += [nn.Conv2d(ch, out, 3, stride=2, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            size, ch = size // 2, out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def _check_set(what: str, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    check_image_batch(images, f"CAS: {what} images", channels=3)
    labels = torch.as_tensor(labels).long().cpu()
    if labels.shape != (images.shape[0],):
        raise ValueError(f"CAS: {what} labels must be a vector of {images.shape[0]} classes, got {tuple(labels.shape)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"CAS: {what} labels must lie in [0, {num_classes - 1}]")
    return labels


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     settings: CASSettings = DEFAULT_CAS, *, seed: int = 0, hflip: bool = True) -> SmallCNN:
    """A fresh `SmallCNN` trained on (images, labels) with AdamW, on the images' device; with random horizontal
    flips when ``hflip`` (only where mirror images keep their class: dataset.json "hflip", not for digits).
    Raises ValueError when there are fewer images than classes or a class has no image."""
    labels = _check_set("training", images, labels, num_classes)
    if len(labels) < num_classes:
        raise ValueError(f"CAS: needs at least one training image per class: got {plural(len(labels), 'image')} "
                         f"for {plural(num_classes, 'class', 'classes')}; sample more per class")
    missing = sorted(set(range(num_classes)) - set(labels.tolist()))
    if missing:
        raise ValueError(f"CAS: class {missing[0]} has no training image; give every class at least one")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(images.shape[-1], num_classes, settings.width).to(images.device)
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01)
    model.train()
    n = len(labels)
    for _ in range(settings.steps):
        index = torch.randint(0, n, (min(settings.batch_size, n),), generator=generator)
        x = images[index.to(images.device)].float()
        flip = (torch.rand(len(index), generator=generator) < 0.5).to(x.device)
        if hflip:  # the draw is made either way: the batches do not depend on hflip
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.cross_entropy(model(x), labels[index].to(x.device))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return model.eval()


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
             batch_size: int = 256) -> dict[str, float]:
    """{"top1"} and, with more than 5 classes, {"top5"} of `model` on (images, labels), in [0, 1]."""
    labels = _check_set("test", images, labels, num_classes)
    if not len(labels):
        raise ValueError("CAS: the test set is empty")
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = torch.cat([model(b.to(device).float()).float().cpu() for b in images.split(batch_size)])
    out = {"top1": float(multiclass_accuracy(logits, labels, num_classes=num_classes, average="micro"))}
    if num_classes > 5:
        out["top5"] = float(multiclass_accuracy(logits, labels, num_classes=num_classes, average="micro", top_k=5))
    return out


def classification_accuracy_score(train_images: torch.Tensor, train_labels: torch.Tensor,
                                  test_images: torch.Tensor, test_labels: torch.Tensor, num_classes: int,
                                  settings: CASSettings = DEFAULT_CAS, *, seed: int = 0,
                                  hflip: bool = True) -> dict[str, float]:
    """Top-1 (and top-5 with > 5 classes) accuracy on the real test set of a classifier trained on
    (train_images, train_labels) only (random flips when ``hflip``, see `train_classifier`).
    Returns {"top1", ["top5"], "num_train", "num_test"}."""
    if test_images.shape[-1] != train_images.shape[-1]:
        raise ValueError(f"CAS: training images are {train_images.shape[-1]}² but test images "
                         f"{test_images.shape[-1]}²; test at the generated images' resolution")
    model = train_classifier(train_images, train_labels, num_classes, settings, seed=seed, hflip=hflip)
    return {**accuracy(model, test_images, test_labels, num_classes), "num_train": len(train_labels),
            "num_test": len(test_labels)}


def cas_with_ceiling(generated: torch.Tensor, generated_labels: torch.Tensor, real: torch.Tensor | None,
                     real_labels: torch.Tensor, test_images: torch.Tensor, test_labels: torch.Tensor,
                     num_classes: int, settings: CASSettings = DEFAULT_CAS, *, seed: int = 0,
                     ceiling: dict[str, float] | None = None, hflip: bool = True) -> dict[str, float]:
    """CAS of generated images next to the same classifier trained on as many real training images (both with
    random horizontal flips when ``hflip``: pass the dataset's `cascade.data.shard_folder.dataset_hflip`).

    Returns {"top1", ["top5"], "real_top1", ["real_top5"], "num_train", "num_test"}; pass `ceiling` (a
    previous `classification_accuracy_score` of the real set) to skip retraining it. Raises ValueError when
    the real set is not as large as the generated one.
    """
    if len(real_labels) != len(generated_labels):
        raise ValueError(f"CAS: the ceiling needs as many real training images as generated ones, got "
                         f"{len(real_labels)} real and {len(generated_labels)} generated")
    score = classification_accuracy_score(generated, generated_labels, test_images, test_labels, num_classes,
                                          settings, seed=seed, hflip=hflip)
    if ceiling is None:
        ceiling = classification_accuracy_score(real, real_labels, test_images, test_labels, num_classes,
                                                settings, seed=seed, hflip=hflip)
    return {**score, **{f"real_{k}": v for k, v in ceiling.items() if k.startswith("top")}}

"""Memorisation: is a generated image a near copy of a training image?

For each sample, the nearest real training image in a space (a feature network's features, or pixels at 32²
for speed); a sample is flagged when it is closer to that training image than `ratio` times the typical
distance between two real training images of the same class (the median, over training images, of the
distance to the nearest other training image of its class). The same test on held-out real images gives
the rate at which novel images are flagged by chance; a generator that copies scores well above it.
Distances are Euclidean; in pixel space they are RMS differences of images in [-1, 1] (so 0.1 = 5% of the
range). Pure functions of tensors.
"""

from __future__ import annotations

import torch

from cascade.imageops import check_image_batch, downsample

RATIO = 0.5  # flag a sample closer than half the typical same-class distance between training images
PIXEL_SIZE = 32  # pixel-space comparisons at 32² for speed


def pixel_vectors(images: torch.Tensor, size: int = PIXEL_SIZE) -> torch.Tensor:
    """Images B×3×R×R in [-1, 1] (R >= size) → B×(3·size²) vectors scaled so that their Euclidean distance is
    the RMS pixel difference at size² (antialiased downsampling)."""
    check_image_batch(images, "memorisation: images")
    if images.shape[-1] < size:
        raise ValueError(f"memorisation: images must be B×3×R×R with R >= {size}, got "
                         f"{getattr(images, 'shape', images)}")
    x = images.float() if images.shape[-1] == size else downsample(images.float(), size)
    return x.flatten(1) / x[0].numel() ** 0.5


def nearest_neighbours(queries: torch.Tensor, reference: torch.Tensor, chunk: int = 1024
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance N, index N) of each query row's nearest reference row (N×D against M×D)."""
    if queries.ndim != 2 or reference.ndim != 2 or queries.shape[1] != reference.shape[1] or not len(reference):
        raise ValueError(f"memorisation: need N×D queries and a non-empty M×D reference, got "
                         f"{tuple(queries.shape)} and {tuple(reference.shape)}")
    # direct differences, not the |a|² + |b|² − 2ab shortcut: an exact copy is at distance 0, not ~1e-4
    parts = [torch.cdist(q.float(), reference.float(), compute_mode="donot_use_mm_for_euclid_dist").min(dim=1)
             for q in queries.split(chunk)]
    return torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])


def typical_same_class_distance(train: torch.Tensor, labels: torch.Tensor) -> float:
    """Median over training rows of the distance to the nearest other training row of the same class.
    Raises ValueError when no class has two training rows."""
    labels = torch.as_tensor(labels).long()
    distances = []
    for c in labels.unique():
        rows = train[labels == c].float()
        if len(rows) < 2:
            continue
        d = torch.cdist(rows, rows)
        d.fill_diagonal_(float("inf"))
        distances.append(d.min(dim=1).values)
    if not distances:
        raise ValueError("memorisation: no class has two training images; the typical distance is undefined")
    return float(torch.cat(distances).median())


def memorisation(samples: torch.Tensor, train: torch.Tensor, train_labels: torch.Tensor, *,
                 held_out: torch.Tensor | None = None, ratio: float = RATIO) -> dict:
    """Nearest training row of each sample row (N×D against M×D) and the fraction flagged as near copies.

    Returns {"distance": N, "index": N (into train), "threshold", "typical", "ratio", "fraction",
    ["held_out_fraction"]}: a sample is flagged when distance < threshold = ratio × typical
    (`typical_same_class_distance`); held_out (real images not in train) gives the chance rate.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"memorisation: ratio must be in (0, 1], got {ratio}")
    typical = typical_same_class_distance(train, train_labels)
    threshold = ratio * typical
    distance, index = nearest_neighbours(samples, train)
    out = {"distance": distance, "index": index, "threshold": threshold, "typical": typical, "ratio": ratio,
           "fraction": float((distance < threshold).float().mean())}
    if held_out is not None:
        out["held_out_fraction"] = float((nearest_neighbours(held_out, train)[0] < threshold).float().mean())
    return out

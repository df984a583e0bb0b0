"""Evaluation metrics: FID / KID / IS (torchmetrics), reference-statistics cache, SR consistency,
class accuracy, reports and guidance / augmentation sweeps.

Images are float tensors B×3×H×W in [-1, 1]. Features are extracted once per image batch by a
`cascade.features.FeatureNet` and fed to torchmetrics' FrechetInceptionDistance, KernelInceptionDistance and
InceptionScore through a pass-through feature module, so one extraction serves all three metrics and cached
reference statistics load straight into the FID state. Every feature-based result carries the feature
network's name, and report columns name it: `FID cascaded [inception-v3]` is never confused with
`FID cascaded [classifier32]`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy
from torchmetrics.functional.image import peak_signal_noise_ratio
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from cascade.features import FeatureNet, device_of
from cascade.imageops import downsample, upsample

STATS_FORMAT_VERSION = 1
REPORT_FORMAT_VERSION = 1

ImageSource = torch.Tensor | Iterable | Callable[[], Iterable]

# Metric keys of compute_fid_kid results, in report column order, with their Markdown titles.
FEATURE_METRIC_TITLES = {"fid": "FID", "kid_mean": "KID", "is_mean": "IS"}
SCALAR_METRIC_TITLES = {"consistency_psnr": "consistency PSNR (dB)", "detail_ratio": "detail ratio",
                        "class_accuracy": "class acc"}


class _PassThrough(nn.Module):
    """Feature module for torchmetrics that receives already-extracted features B×D."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


# ------------------------------------------------------------------------------------------------------
# Feature extraction


def _image_batches(source: ImageSource, batch_size: int) -> Iterator[torch.Tensor]:
    """Yield image batches of at most batch_size from a tensor, an iterable of tensors / {"x": tensor}
    batches, or a zero-argument callable returning such an iterable (called only here, lazily)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if isinstance(source, torch.Tensor):
        source = [source]
    elif callable(source) and not isinstance(source, Iterable):
        source = source()
    for batch in source:
        if isinstance(batch, Mapping):
            if "x" not in batch:
                raise ValueError(f"batch mappings must hold images under 'x', got keys {sorted(batch)}")
            batch = batch["x"]
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4 or batch.shape[1] != 3:
            desc = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
            raise ValueError(f"image batches must be B×3×H×W tensors, got {desc}")
        yield from batch.split(batch_size)


def iter_features(
    feature_net: FeatureNet,
    images: ImageSource,
    *,
    batch_size: int = 64,
    max_samples: int | None = None,
    resolution: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield (features B×D float32 on CPU, logits B×K or None) per batch; stop after max_samples images.
    `resolution`, when given, is checked against every batch (catches feeding the wrong pyramid level)."""
    device = device_of(feature_net)
    seen = 0
    with torch.no_grad():
        for batch in _image_batches(images, batch_size):
            if resolution is not None and tuple(batch.shape[-2:]) != (resolution, resolution):
                raise ValueError(f"expected {resolution}×{resolution} images, got {tuple(batch.shape[-2:])}")
            if max_samples is not None:
                if seen >= max_samples:
                    return
                batch = batch[: max_samples - seen]
            features, logits = feature_net.features_and_logits(batch.to(device))
            seen += batch.shape[0]
            yield features.float().cpu(), None if logits is None else logits.float().cpu()


class _Reservoir:
    """Uniform random subsample of at most `capacity` rows of a stream (reservoir sampling, Algorithm R)."""

    def __init__(self, capacity: int | None, seed: int):
        self.capacity = capacity
        self.seen = 0
        self.rows: list[torch.Tensor] = []
        self.buffer: torch.Tensor | None = None
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, rows: torch.Tensor) -> None:
        if self.capacity is None:
            self.rows.append(rows)
            self.seen += rows.shape[0]
            return
        if self.buffer is None:
            self.buffer = rows.new_empty(self.capacity, rows.shape[1])
        fill = max(0, min(rows.shape[0], self.capacity - self.seen))
        self.buffer[self.seen : self.seen + fill] = rows[:fill]
        rest = rows[fill:]
        if rest.shape[0]:
            # row i of the stream replaces a uniform slot j ∈ [0, i] when j < capacity (Algorithm R)
            stream_index = self.seen + fill + torch.arange(rest.shape[0])
            slots = (torch.rand(rest.shape[0], generator=self.generator) * (stream_index + 1)).long()
            for slot, row in zip(slots.tolist(), rest):
                if slot < self.capacity:
                    self.buffer[slot] = row
        self.seen += rows.shape[0]

    def result(self) -> torch.Tensor:
        if self.capacity is None:
            return torch.cat(self.rows)
        return self.buffer[: min(self.seen, self.capacity)].clone()


# ------------------------------------------------------------------------------------------------------
# Reference statistics


@dataclass(frozen=True)
class ReferenceStats:
    """Real-image statistics of one (data, resolution, feature network): FID's Gaussian, KID's features."""

    mean: torch.Tensor  # D, float64
    cov: torch.Tensor  # D×D, float64, unbiased sample covariance
    num_samples: int
    kid_features: torch.Tensor  # K×D float32, a uniform random subsample of the real features
    feature_net: str
    feature_fingerprint: str
    data_fingerprint: str = ""


def _fid_metric(num_features: int) -> FrechetInceptionDistance:
    # sync_on_compute=False here and below: the caller gathers images / features across processes itself; a
    # torchmetrics sync in compute() would wait for processes that never call it (accelerate launch).
    return FrechetInceptionDistance(feature=_PassThrough(num_features), reset_real_features=False,
                                    sync_on_compute=False)


def compute_reference_stats(
    images: ImageSource,
    feature_net: FeatureNet,
    *,
    data_fingerprint: str = "",
    batch_size: int = 64,
    max_samples: int | None = None,
    kid_max_features: int | None = 5000,
    resolution: int | None = None,
    seed: int = 0,
) -> ReferenceStats:
    """Extract features of real images once: FID mean / covariance (torchmetrics' accumulation, float64) and
    up to kid_max_features features for KID (None keeps all)."""
    if kid_max_features is not None and kid_max_features < 2:
        raise ValueError(f"kid_max_features must be at least 2 or None, got {kid_max_features}")
    fid = _fid_metric(feature_net.num_features)
    reservoir = _Reservoir(kid_max_features, seed)
    for features, _ in iter_features(
        feature_net, images, batch_size=batch_size, max_samples=max_samples, resolution=resolution
    ):
        fid.update(features.double(), real=True)
        reservoir.add(features)
    n = int(fid.real_features_num_samples)
    if n < 2:
        raise ValueError(f"reference statistics need at least 2 real images, got {n}")
    mean = fid.real_features_sum / n
    # unbiased covariance from the sums, as in FrechetInceptionDistance.compute: (Σ ffᵀ − n μμᵀ)/(n−1)
    cov = (fid.real_features_cov_sum - n * torch.outer(mean, mean)) / (n - 1)
    return ReferenceStats(
        mean=mean,
        cov=cov,
        num_samples=n,
        kid_features=reservoir.result(),
        feature_net=feature_net.name,
        feature_fingerprint=feature_net.fingerprint(),
        data_fingerprint=data_fingerprint,
    )


def load_reference_into_fid(fid: FrechetInceptionDistance, stats: ReferenceStats) -> None:
    """Set FID's real-feature state from cached statistics (the inverse of compute_reference_stats)."""
    n = stats.num_samples
    mean = stats.mean.double()
    fid.real_features_sum = (n * mean).to(fid.real_features_sum.device)
    # Σ ffᵀ = (n−1)·cov + n μμᵀ (inverse of the unbiased covariance above)
    fid.real_features_cov_sum = ((n - 1) * stats.cov.double() + n * torch.outer(mean, mean)).to(
        fid.real_features_cov_sum.device
    )
    fid.real_features_num_samples = torch.tensor(n, dtype=torch.long, device=fid.real_features_sum.device)


def shard_fingerprint(root: str | Path, split: str, pattern: str | None = None) -> str:
    """Fingerprint of a split's data: dataset.json content plus every shard's name, size and mtime."""
    root = Path(root)
    shards = sorted(root.glob(pattern or f"{split}-*.tar"))
    if not shards:
        raise FileNotFoundError(f"no shards matching {pattern or f'{split}-*.tar'} in {root}")
    digest = hashlib.sha256()
    manifest = root / "dataset.json"
    if manifest.is_file():
        digest.update(manifest.read_bytes())
    for shard in shards:
        info = shard.stat()
        digest.update(f"{shard.name}|{info.st_size}|{info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def reference_stats_path(root: str | Path, split: str, resolution: int, feature_net_name: str) -> Path:
    """`<root>/fid_stats/<split>-<resolution>-<feature net>.safetensors` (JSON sidecar: same stem, .json)."""
    return Path(root) / "fid_stats" / f"{split}-{resolution}-{feature_net_name}.safetensors"


def cached_reference_stats(
    root: str | Path,
    split: str,
    resolution: int,
    feature_net: FeatureNet,
    images: ImageSource,
    *,
    data_fingerprint: str | None = None,
    batch_size: int = 64,
    max_samples: int | None = None,
    kid_max_features: int | None = 5000,
    seed: int = 0,
) -> ReferenceStats:
    """Reference statistics for (data, resolution, feature network), cached next to the shards.

    The cache key is the data fingerprint (default: `shard_fingerprint(root, split)`), the feature network's
    name and weight fingerprint, the resolution and the sampling settings; when the stored key matches,
    `images` is not touched (pass a callable to defer even creating the iterator), otherwise the statistics
    are recomputed and the file is replaced.
    """
    if data_fingerprint is None:
        data_fingerprint = shard_fingerprint(root, split)
    key = {
        "format_version": STATS_FORMAT_VERSION,
        "split": split,
        "resolution": resolution,
        "feature_net": feature_net.name,
        "feature_fingerprint": feature_net.fingerprint(),
        "data_fingerprint": data_fingerprint,
        "max_samples": max_samples,
        "kid_max_features": kid_max_features,
        "seed": seed,
    }
    path = reference_stats_path(root, split, resolution, feature_net.name)
    stats = _load_stats(path, key)
    if stats is not None:
        return stats
    stats = compute_reference_stats(
        images,
        feature_net,
        data_fingerprint=data_fingerprint,
        batch_size=batch_size,
        max_samples=max_samples,
        kid_max_features=kid_max_features,
        resolution=resolution,
        seed=seed,
    )
    _save_stats(path, key, stats)
    return stats


def _load_stats(path: Path, key: dict) -> ReferenceStats | None:
    sidecar = path.with_suffix(".json")
    if not (path.is_file() and sidecar.is_file()):
        return None
    try:
        info = json.loads(sidecar.read_text())
    except json.JSONDecodeError:
        return None
    if info.get("key") != key:
        return None
    with safe_open(str(path), framework="pt") as f:
        if json.loads((f.metadata() or {}).get("key", "null")) != key:
            return None  # tensors and sidecar from different runs: recompute
        tensors = {name: f.get_tensor(name) for name in ("mean", "cov", "kid_features")}
    return ReferenceStats(
        mean=tensors["mean"],
        cov=tensors["cov"],
        num_samples=int(info["num_samples"]),
        kid_features=tensors["kid_features"],
        feature_net=key["feature_net"],
        feature_fingerprint=key["feature_fingerprint"],
        data_fingerprint=key["data_fingerprint"],
    )


def _save_stats(path: Path, key: dict, stats: ReferenceStats) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "mean": stats.mean.double().contiguous(),
        "cov": stats.cov.double().contiguous(),
        "kid_features": stats.kid_features.float().contiguous(),
    }
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"key": json.dumps(key), "num_samples": str(stats.num_samples)})
    os.replace(tmp, path)
    info = {
        "key": key,
        "num_samples": stats.num_samples,
        "num_kid_features": int(stats.kid_features.shape[0]),
        "num_features": int(stats.mean.shape[0]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    sidecar = path.with_suffix(".json")
    tmp = sidecar.with_name(sidecar.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, sidecar)


# ------------------------------------------------------------------------------------------------------
# FID / KID / IS


def compute_fid_kid(
    reference: ReferenceStats | ImageSource,
    fake_images: ImageSource,
    feature_net: FeatureNet,
    *,
    batch_size: int = 64,
    kid_subsets: int = 100,
    kid_subset_size: int | None = None,
    inception_score: bool | None = None,
    is_splits: int = 10,
    seed: int = 0,
) -> dict:
    """FID, KID (mean, std over subsets) and, when the net has logits, Inception Score of fake images.

    reference: cached ReferenceStats (must come from this feature network) or real images (all their
    features are kept for KID). kid_subset_size defaults to min(1000, #real KID features, #fake).
    The KID / IS subset draws use a private RNG seeded with `seed` (the global RNG is left untouched).
    Returns {"feature_net", "fid", "kid_mean", "kid_std", ["is_mean", "is_std"], "num_real", "num_fake"}.
    """
    if inception_score is None:
        inception_score = feature_net.has_logits
    if inception_score and not feature_net.has_logits:
        raise ValueError(f"Inception Score needs class logits; feature network {feature_net.name!r} has none")
    if not isinstance(reference, ReferenceStats):
        reference = compute_reference_stats(
            reference, feature_net, batch_size=batch_size, kid_max_features=None
        )
    if (
        reference.feature_net != feature_net.name
        or reference.feature_fingerprint != feature_net.fingerprint()
    ):
        raise ValueError(
            f"reference statistics were computed with feature network {reference.feature_net!r} "
            f"(fingerprint {reference.feature_fingerprint[:12]}), not with {feature_net.name!r} "
            f"(fingerprint {feature_net.fingerprint()[:12]})"
        )
    fid = _fid_metric(feature_net.num_features)
    load_reference_into_fid(fid, reference)
    fake_features, fake_logits = [], []
    for features, logits in iter_features(feature_net, fake_images, batch_size=batch_size):
        fid.update(features.double(), real=False)  # float64 features: FID is computed in float64
        fake_features.append(features)
        if inception_score:
            fake_logits.append(logits)
    num_fake = int(fid.fake_features_num_samples)
    if num_fake < 2:
        raise ValueError(f"FID needs at least 2 generated images, got {num_fake}")
    num_real_kid = reference.kid_features.shape[0]
    if kid_subset_size is None:
        kid_subset_size = min(1000, num_real_kid, num_fake)
    if kid_subset_size > min(num_real_kid, num_fake):
        raise ValueError(
            f"kid_subset_size={kid_subset_size} exceeds the available features "
            f"(real {num_real_kid}, fake {num_fake})"
        )
    with warnings.catch_warnings():  # keeping all features is the point here; silence torchmetrics' note
        warnings.filterwarnings("ignore", message=r"Metric `.*` will save all extracted features")
        kid = KernelInceptionDistance(
            feature=_PassThrough(feature_net.num_features), subsets=kid_subsets, subset_size=kid_subset_size,
            sync_on_compute=False,
        )
    kid.update(reference.kid_features.float(), real=True)
    kid.update(torch.cat(fake_features), real=False)
    result = {"feature_net": feature_net.name, "fid": float(fid.compute())}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
        result.update(kid_mean=float(kid_mean), kid_std=float(kid_std))
        if inception_score:
            if is_splits < 1:
                raise ValueError(f"is_splits must be at least 1, got {is_splits}")
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Metric `.*` will save all extracted features")
                isc = InceptionScore(feature=_PassThrough(feature_net.num_classes), splits=is_splits,
                                     sync_on_compute=False)
            isc.update(torch.cat(fake_logits))
            is_mean, is_std = isc.compute()
            result.update(is_mean=float(is_mean), is_std=float(is_std))
    result.update(num_real=reference.num_samples, num_fake=num_fake)
    return result


# ------------------------------------------------------------------------------------------------------
# Super-resolution consistency and class accuracy


def consistency_psnr(sr_output: torch.Tensor, low_res_input: torch.Tensor) -> tuple[torch.Tensor, float]:
    """PSNR (dB) between the SR output downsampled to the input size and the low-resolution input.

    Both in [-1, 1], mapped to [0, 1] (data range 1). Returns (per-image PSNR B, mean over images);
    identical images give +inf.
    """
    for name, x in (("sr_output", sr_output), ("low_res_input", low_res_input)):
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(f"{name} must be a B×C×H×W tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if sr_output.shape[:2] != low_res_input.shape[:2]:
        raise ValueError(f"batch/channels differ: {tuple(sr_output.shape)} vs {tuple(low_res_input.shape)}")
    if low_res_input.shape[-1] != low_res_input.shape[-2]:
        raise ValueError(f"low_res_input must be square, got {tuple(low_res_input.shape[-2:])}")
    down = downsample(sr_output.float(), low_res_input.shape[-1])
    target = low_res_input.to(down)
    per_image = peak_signal_noise_ratio(
        (down + 1) / 2, (target + 1) / 2, data_range=1.0, reduction="none", dim=(1, 2, 3)
    )
    return per_image, float(per_image.mean())


def fine_detail_rms(images: torch.Tensor, low_resolution: int) -> torch.Tensor:
    """Per-image RMS of the detail above `low_resolution`: x − upsample(downsample(x)), images B×C×R×R."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be square B×C×R×R, got {getattr(images, 'shape', type(images).__name__)}")
    size = images.shape[-1]
    if not 0 < low_resolution < size:
        raise ValueError(f"low_resolution must be in (0, {size}), got {low_resolution}")
    x = images.float()
    detail = x - upsample(downsample(x, low_resolution), size)
    return detail.pow(2).mean(dim=(1, 2, 3)).sqrt()


def detail_energy(images: ImageSource, low_resolution: int, batch_size: int = 64) -> float:
    """Mean square of the detail above `low_resolution` (`fine_detail_rms`²) over all images, streamed in batches."""
    total, count = 0.0, 0
    for batch in _image_batches(images, batch_size):
        total += float(fine_detail_rms(batch, low_resolution).pow(2).sum())
        count += batch.shape[0]
    if count == 0:
        raise ValueError("detail_energy needs at least one image")
    return total / count


def detail_ratio(images: ImageSource, reference: ImageSource | float, low_resolution: int) -> float:
    """RMS fine detail of images relative to real ones at the same size: ≈ 1 as much detail above
    `low_resolution` as real images, ≈ 0 a smooth upsampling, > 1 noise. reference: the real images, or their
    `detail_energy` (computed once for many calls)."""
    real = float(reference) if isinstance(reference, (int, float)) else detail_energy(reference, low_resolution)
    if real <= 0:
        raise ValueError("the real images have no detail above low_resolution: the ratio is undefined")
    return math.sqrt(detail_energy(images, low_resolution) / real)


def class_accuracy(
    classifier_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 256,
) -> float:
    """Top-1 accuracy of `classifier_fn(images) -> logits B×K` against the conditioning labels (CAS-style
    check that class conditioning works; use a classifier trained on real data, e.g.
    ClassifierFeatures.logits)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(
            f"images must be a B×C×H×W tensor, got {getattr(images, 'shape', type(images).__name__)}"
        )
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"labels must be a vector of {images.shape[0]} class indices, got {tuple(labels.shape)}"
        )
    with torch.no_grad():
        logits = torch.cat([classifier_fn(chunk).float().cpu() for chunk in images.split(batch_size)])
    if logits.ndim != 2 or logits.shape[0] != images.shape[0]:
        raise ValueError(f"classifier_fn must return logits B×K, got {tuple(logits.shape)}")
    labels = labels.long().cpu()
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must lie in [0, {logits.shape[1] - 1}] (the classifier's classes)")
    return float(multiclass_accuracy(logits, labels, num_classes=logits.shape[1], average="micro"))


# ------------------------------------------------------------------------------------------------------
# Reports


def metric_label(metric: str, mode: str, feature_net: str | None = None) -> str:
    """Column label, e.g. 'FID cascaded [inception-v3]'; feature-based metrics always name their network."""
    titles = {**FEATURE_METRIC_TITLES, **SCALAR_METRIC_TITLES}
    label = f"{titles.get(metric, metric)} {mode}"
    return f"{label} [{feature_net}]" if feature_net is not None else label


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "inf" / "-inf" / "nan": valid JSON, still readable
    if isinstance(value, torch.Tensor):
        return _json_safe(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def report_table(results: Mapping) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Flatten {stage: {mode: {"features": {net: result}, scalar: value}}} into labelled cells."""
    feature_cells: dict[tuple[int, int, str], str] = {}
    scalar_cells: dict[tuple[str, str], str] = {}
    modes: list[str] = []
    table: dict[str, dict[str, str]] = {}
    for stage, by_mode in results.items():
        if not isinstance(by_mode, Mapping):
            raise TypeError(f"results[{stage!r}] must map mode -> metrics, got {type(by_mode).__name__}")
        row = table.setdefault(str(stage), {})
        for mode, metrics in by_mode.items():
            if mode not in modes:
                modes.append(mode)
            for key, value in metrics.items():
                if key == "features":
                    for net, result in value.items():
                        if result.get("feature_net", net) != net:
                            raise ValueError(
                                f"results[{stage!r}][{mode!r}]['features'][{net!r}] holds metrics of "
                                f"feature network {result['feature_net']!r}"
                            )
                        for order, metric in enumerate(FEATURE_METRIC_TITLES):
                            if metric in result:
                                label = metric_label(metric, mode, net)
                                feature_cells[(order, modes.index(mode), net)] = label
                                row[label] = _format_cell(metric, result)
                elif isinstance(value, (int, float)):
                    label = metric_label(key, mode)
                    scalar_cells[(key, mode)] = label
                    row[label] = _format_cell(key, metrics)
                else:
                    raise ValueError(
                        f"results[{stage!r}][{mode!r}][{key!r}]: expected a number or the 'features' mapping"
                    )
    known = list(SCALAR_METRIC_TITLES)

    def scalar_order(cell: tuple[str, str]) -> tuple:
        metric, mode = cell
        return (known.index(metric) if metric in known else len(known), metric, modes.index(mode))

    columns = [feature_cells[k] for k in sorted(feature_cells)]
    columns += [scalar_cells[k] for k in sorted(scalar_cells, key=scalar_order)]
    return columns, table


def _format_cell(metric: str, values: Mapping) -> str:
    value = float(values[metric])
    if metric == "kid_mean":
        return f"{value:.5f} ± {float(values.get('kid_std', float('nan'))):.5f}"
    if metric == "is_mean":
        return f"{value:.2f} ± {float(values.get('is_std', float('nan'))):.2f}"
    if metric == "class_accuracy":
        return f"{100 * value:.1f}%"
    return f"{value:.2f}"


def write_report(
    results: Mapping, json_path: str | Path, md_path: str | Path, *, meta: Mapping | None = None
) -> None:
    """Write results as JSON and as a Markdown table (rows = stages, columns = metric × mode [× feature net]).

    results: {stage: {mode: {"features": {feature_net_name: compute_fid_kid(...) result},
                             "consistency_psnr": float, "class_accuracy": float, ...}}}
    meta: run settings (samples, sampler, seed, ...) recorded in both files.
    """
    columns, table = report_table(results)
    json_path, md_path = Path(json_path), Path(md_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    document = {"format_version": REPORT_FORMAT_VERSION, "meta": dict(meta or {}), "results": results}
    json_path.write_text(json.dumps(_json_safe(document), indent=2, allow_nan=False) + "\n")
    lines = ["# Evaluation", ""]
    for key, value in (meta or {}).items():
        lines.append(f"- {key}: {value}")
    if meta:
        lines.append("")
    lines.append("| stage | " + " | ".join(columns) + " |")
    lines.append("|---|" + "---|" * len(columns))
    for stage, row in table.items():
        lines.append(f"| {stage} | " + " | ".join(row.get(c, "–") for c in columns) + " |")
    lines += [
        "",
        "FID / KID / IS columns name their feature network in brackets; values from different feature",
        "networks are not comparable. KID and IS are mean ± std over subsets / splits.",
        "",
    ]
    md_path.write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------------------
# Sweeps over guidance weight w and augmentation level s


def _check_records(records: Iterable[Mapping], metric: str) -> dict[str, list[Mapping]]:
    by_stage: dict[str, list[Mapping]] = {}
    for record in records:
        missing = {"stage", "w", metric, "feature_net"} - set(record)
        if missing:
            raise ValueError(f"sweep record {dict(record)} lacks {sorted(missing)}")
        by_stage.setdefault(record["stage"], []).append(record)
    if not by_stage:
        raise ValueError("no sweep records")
    for stage, stage_records in by_stage.items():
        nets = {r["feature_net"] for r in stage_records}
        if len(nets) > 1:
            raise ValueError(
                f"stage {stage!r} mixes feature networks {sorted(nets)}: their FIDs are not comparable"
            )
    return by_stage


def best_setting(records: Iterable[Mapping], metric: str = "fid") -> dict[str, Mapping]:
    """Per stage, the record with the lowest finite `metric`. Records: {"stage", "w",
    "aug_level" (None for the base stage), metric, "feature_net"}."""
    best = {}
    for stage, stage_records in _check_records(records, metric).items():
        finite = [r for r in stage_records if math.isfinite(float(r[metric]))]
        if not finite:
            raise ValueError(f"stage {stage!r} has no finite {metric}")
        best[stage] = min(finite, key=lambda r: float(r[metric]))
    return best


def plot_sweep(records: Iterable[Mapping], path: str | Path, metric: str = "fid") -> None:
    """PNG: per stage, `metric` against w (one line per s) and against s (one line per w); best marked ★."""
    records = list(records)
    by_stage = _check_records(records, metric)
    best = best_setting(records, metric)
    title = FEATURE_METRIC_TITLES.get(metric, metric)
    fig = Figure(figsize=(10, 3.6 * len(by_stage)))  # no pyplot: Agg canvas, no global backend state
    axes = fig.subplots(len(by_stage), 2, squeeze=False)
    for row, (stage, stage_records) in enumerate(by_stage.items()):
        net = stage_records[0]["feature_net"]
        winner = best[stage]
        for ax, x_key, group_key, x_name, group_name in (
            (axes[row, 0], "w", "aug_level", "guidance weight w", "s"),
            (axes[row, 1], "aug_level", "w", "augmentation level s", "w"),
        ):
            if x_key == "aug_level" and all(r.get("aug_level") is None for r in stage_records):
                ax.text(0.5, 0.5, "no augmentation level (base stage)", ha="center", va="center")
                ax.set_axis_off()
                continue
            groups: dict = {}
            for r in stage_records:
                groups.setdefault(r.get(group_key), []).append(r)
            for group, members in sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
                members = sorted(members, key=lambda r: float(r.get(x_key) or 0.0))
                xs = [float(r.get(x_key) or 0.0) for r in members]
                ax.plot(xs, [float(r[metric]) for r in members], marker="o", label=f"{group_name}={group}")
            ax.plot(
                float(winner.get(x_key) or 0.0),
                float(winner[metric]),
                marker="*",
                markersize=16,
                color="red",
                linestyle="none",
                label="best",
            )
            ax.set_xlabel(x_name)
            ax.set_ylabel(f"{title} [{net}]")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        s_text = "" if winner.get("aug_level") is None else f", s={winner['aug_level']}"
        axes[row, 0].set_title(
            f"{stage}: best w={winner['w']}{s_text}, "
            f"{title} [{net}]={float(winner[metric]):.2f}"
        )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)

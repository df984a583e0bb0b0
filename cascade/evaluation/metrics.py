"""Evaluation metrics as pure functions of images, features or statistics.

FID / KID / IS (torchmetrics), precision / recall on k-NN manifolds, a bootstrap interval for FID, SR
consistency and detail ratio, class accuracy, and the choice of the best sweep setting by any of them.
Images are float tensors B×3×H×W in [-1, 1]; features are extracted once per image batch by a
`cascade.evaluation.features.FeatureNet`, so one extraction serves every feature-based metric, and cached reference
statistics (`cascade.evaluation.reference_stats`) load straight into the FID state. Every feature-based result names
its feature network and carries its sample counts: `FID cascaded [inception-v3]` is never confused with
`FID cascaded [classifier32]`, and an FID from fewer than `MIN_FID_SAMPLES` samples says it is biased.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
from torchmetrics.functional.classification import multiclass_accuracy
from torchmetrics.functional.image import peak_signal_noise_ratio
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from cascade.checks import is_int_at_least
from cascade.evaluation.features import FeatureNet, ImageSource, PassThrough, image_batches, iter_features
from cascade.evaluation.reference_stats import (
    ReferenceStats,
    compute_reference_stats,
    fid_metric,
    load_reference_into_fid,
)
from cascade.imageops import check_image_batch, downsample, upsample

# FID's bias falls roughly as 1/N (Chong & Forsyth 2020 "Effectively Unbiased FID"); below this many samples
# (or below the feature dimension, where the sample covariance is singular) an FID is reported as biased.
MIN_FID_SAMPLES = 2048
PR_K = 3  # neighbourhood size of the k-NN manifolds (Kynkäänniemi et al. 2019, section 3)

# How each metric ranks settings: lower is better, higher is better, or closest to 1 (real images score 1).
METRIC_GOALS = {"fid": "min", "kid_mean": "min", "is_mean": "max", "precision": "max", "recall": "max",
                "class_accuracy": "max", "consistency_psnr": "max", "detail_ratio": "one",
                "cas_top1": "max", "cas_top5": "max"}
FEATURE_METRICS = ("fid", "kid_mean", "is_mean", "precision", "recall")  # measured in a feature network's space


# ------------------------------------------------------------------------------------------------------
# FID / KID / IS, precision / recall, bootstrap


def fid_is_biased(num_real: int, num_fake: int, num_features: int) -> bool:
    """True when either side has fewer than `MIN_FID_SAMPLES` samples or fewer than the feature dimension."""
    return min(num_real, num_fake) < max(MIN_FID_SAMPLES, num_features)


def frechet_distance(mean1: torch.Tensor, cov1: torch.Tensor, mean2: torch.Tensor, cov2: torch.Tensor) -> float:
    """Fréchet distance of two Gaussians, float64 (Heusel et al. 2017 "GANs trained by a two time-scale update
    rule", eq. 6): ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½), the trace of the root as the sum of the square roots
    of the eigenvalues of Σ₁Σ₂."""
    mean1, cov1, mean2, cov2 = (t.double() for t in (mean1, cov1, mean2, cov2))
    root_trace = torch.linalg.eigvals(cov1 @ cov2).sqrt().real.sum()
    return float((mean1 - mean2).square().sum() + cov1.trace() + cov2.trace() - 2 * root_trace)


def fid_bootstrap(reference: ReferenceStats, fake_features: torch.Tensor, num_resamples: int, *, seed: int = 0,
                  confidence: float = 0.95) -> tuple[float, float]:
    """Bias-corrected percentile bootstrap interval (Efron & Tibshirani 1993, ch. 13 and §10.6) of FID over
    `num_resamples` resamplings of the generated features N×D with replacement; the reference statistics stay
    fixed, so the interval covers the sampling variation of the generated set. The percentiles are shifted by
    the bootstrap bias (duplicates in a resample raise its FID) and clipped at 0. Deterministic for a seed."""
    if not is_int_at_least(num_resamples, 2):
        raise ValueError(f"bootstrap: needs at least 2 resamples, got {num_resamples!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"bootstrap: confidence must be in (0, 1), got {confidence}")
    n = fake_features.shape[0]
    if n < 2:
        raise ValueError(f"bootstrap: needs at least 2 generated samples, got {n}")
    generator = torch.Generator().manual_seed(seed)
    features = fake_features.double()
    values = []
    for _ in range(num_resamples):
        x = features[torch.randint(0, n, (n,), generator=generator)]
        values.append(frechet_distance(x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1]),
                                       reference.mean, reference.cov))
    values = torch.tensor(values, dtype=torch.float64)
    low, high = values.quantile(torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64))
    # Resampling with replacement duplicates images, which inflates FID: shift the percentile interval by the
    # bootstrap's bias estimate mean(FID*) − FID (Efron & Tibshirani 1993, §10.6), so it brackets the FID.
    bias = float(values.mean()) - frechet_distance(features.mean(0), torch.cov(features.T).reshape(
        features.shape[1], features.shape[1]), reference.mean, reference.cov)
    return max(0.0, float(low) - bias), max(0.0, float(high) - bias)


def _kth_neighbour_distance(x: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row (itself, at distance 0, excluded)."""
    return torch.cat([torch.cdist(part, x).topk(k + 1, dim=1, largest=False).values[:, k]
                      for part in x.split(chunk)])


def _inside_manifold(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor,
                     chunk: int = 1024) -> torch.Tensor:
    """Per query: lies within radius_j of some point j (the union of k-NN balls, Kynkäänniemi et al. eq. 1)."""
    return torch.cat([(torch.cdist(part, points) <= radii[None, :]).any(dim=1) for part in queries.split(chunk)])


def precision_recall(real_features: torch.Tensor, fake_features: torch.Tensor, k: int = PR_K
                     ) -> tuple[float, float]:
    """(precision, recall) in [0, 1] of generated features against real ones, both N×D (Kynkäänniemi et al.
    2019 "Improved Precision and Recall Metric for Assessing Generative Models", eqs. 1–2).

    Precision: the fraction of generated samples inside the real manifold (the union of balls around each
    real sample reaching its k-th nearest real neighbour): quality. Recall: the fraction of real samples
    inside the generated manifold: coverage (diversity). Identical sets score (1, 1); far apart sets (0, 0).
    Raises ValueError when k >= either set's size (every ball would hold the whole set) or k < 1.
    """
    if not is_int_at_least(k, 1):
        raise ValueError(f"precision/recall: k must be an integer >= 1, got {k!r}")
    for what, x in (("real", real_features), ("generated", fake_features)):
        if not isinstance(x, torch.Tensor) or x.ndim != 2:
            raise ValueError(f"precision/recall: {what} features must be N×D, got {getattr(x, 'shape', x)}")
        if x.shape[0] <= k:
            raise ValueError(f"precision/recall: k={k} needs more than {k} {what} samples, got {x.shape[0]}; "
                             f"add samples or lower k")
    real, fake = real_features.float(), fake_features.float()
    precision = _inside_manifold(fake, real, _kth_neighbour_distance(real, k)).float().mean()
    recall = _inside_manifold(real, fake, _kth_neighbour_distance(fake, k)).float().mean()
    return float(precision), float(recall)


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
    pr_k: int | None = None,
    bootstrap: int = 0,
) -> dict:
    """FID, KID (mean, std over subsets) and, when the net has logits, Inception Score of fake images.

    reference: cached ReferenceStats (must come from this feature network) or real images (all their
    features are kept for KID). kid_subset_size defaults to min(1000, #real KID features, #fake // 2) (at
    least 2): subsets of the generated set that differ, so the std shows its sampling noise.
    The KID / IS subset draws use a private RNG seeded with `seed` (the global RNG is left untouched).
    pr_k: adds "precision" / "recall" (`precision_recall` with k = pr_k) against the real KID features (all
    real features, or a uniform subsample of up to 5,000 from cached statistics). bootstrap B >= 2 adds
    "fid_ci" = [low, high], the 95% `fid_bootstrap` interval over B resamplings of the generated set.
    Returns {"feature_net", "fid", "kid_mean", "kid_std", ["is_mean", "is_std"], ["precision", "recall",
    "pr_k"], ["fid_ci", "fid_bootstrap"], "num_real", "num_fake", "fid_biased"}; "fid_biased" is True below
    `MIN_FID_SAMPLES` samples or below the feature dimension on either side (read KID then).
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
    fid = fid_metric(feature_net.num_features)
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
    if kid_subset_size is None:  # subsets of at most half the generated set, so their spread shows its noise
        kid_subset_size = max(2, min(1000, num_real_kid, num_fake // 2))
    if kid_subset_size > min(num_real_kid, num_fake):
        raise ValueError(
            f"kid_subset_size={kid_subset_size} exceeds the available features "
            f"(real {num_real_kid}, fake {num_fake})"
        )
    with warnings.catch_warnings():  # keeping all features is the point here; silence torchmetrics' note
        warnings.filterwarnings("ignore", message=r"Metric `.*` will save all extracted features")
        kid = KernelInceptionDistance(
            feature=PassThrough(feature_net.num_features), subsets=kid_subsets, subset_size=kid_subset_size,
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
                isc = InceptionScore(feature=PassThrough(feature_net.num_classes), splits=is_splits,
                                     sync_on_compute=False)
            isc.update(torch.cat(fake_logits))
            is_mean, is_std = isc.compute()
            result.update(is_mean=float(is_mean), is_std=float(is_std))
    fake = torch.cat(fake_features)
    if pr_k is not None:
        precision, recall = precision_recall(reference.kid_features, fake, pr_k)
        result.update(precision=precision, recall=recall, pr_k=pr_k)
    if bootstrap:
        result.update(fid_ci=list(fid_bootstrap(reference, fake, bootstrap, seed=seed)), fid_bootstrap=bootstrap)
    result.update(num_real=reference.num_samples, num_fake=num_fake,
                  fid_biased=fid_is_biased(reference.num_samples, num_fake, feature_net.num_features))
    return result


# ------------------------------------------------------------------------------------------------------
# Super-resolution consistency and detail, class accuracy


def consistency_psnr(sr_output: torch.Tensor, low_res_input: torch.Tensor) -> tuple[torch.Tensor, float]:
    """PSNR (dB) between the SR output downsampled to the input size and the low-resolution input.

    Both in [-1, 1], mapped to [0, 1] (data range 1). Returns (per-image PSNR B, mean over images);
    identical images give +inf.
    """
    for name, x in (("sr_output", sr_output), ("low_res_input", low_res_input)):
        check_image_batch(x, name)
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
    check_image_batch(images, "images", square=True)
    size = images.shape[-1]
    if not 0 < low_resolution < size:
        raise ValueError(f"low_resolution must be in (0, {size}), got {low_resolution}")
    x = images.float()
    detail = x - upsample(downsample(x, low_resolution), size)
    return detail.pow(2).mean(dim=(1, 2, 3)).sqrt()


def detail_energy(images: ImageSource, low_resolution: int, batch_size: int = 64) -> float:
    """Mean square of the detail above `low_resolution` (`fine_detail_rms`²) over all images, streamed in batches."""
    total, count = 0.0, 0
    for batch in image_batches(images, batch_size):
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
    check_image_batch(images, "images")
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
# The best sweep setting by any metric


def metric_goal(metric: str) -> str:
    """"min", "max" or "one" (closest to 1) for a metric of `METRIC_GOALS`; ValueError naming the choices."""
    if metric not in METRIC_GOALS:
        raise ValueError(f"rank metric {metric!r} is unknown; use one of {', '.join(METRIC_GOALS)}")
    return METRIC_GOALS[metric]


def rank_key(metric: str) -> Callable[[Mapping], float]:
    """A sort key of records by `metric`: the best record has the smallest key (`METRIC_GOALS`)."""
    goal = metric_goal(metric)
    if goal == "min":
        return lambda r: float(r[metric])
    if goal == "max":
        return lambda r: -float(r[metric])
    return lambda r: abs(math.log(float(r[metric]))) if float(r[metric]) > 0 else math.inf


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


def best_setting(records: Iterable[Mapping], metric: str = "fid", fallback: str | None = "fid"
                 ) -> dict[str, Mapping]:
    """Per stage, the record with the best finite `metric` (`METRIC_GOALS`: lowest FID / KID, highest
    precision, recall, accuracies and consistency, detail ratio closest to 1). Records: {"stage", "w",
    "aug_level" (None for the base stage), metric, "feature_net"}; ValueError on an unknown metric.
    A stage whose records all hold None for `metric` (the base stage has no consistency or detail ratio) is
    ranked by `fallback` instead."""
    metric_goal(metric)
    best = {}
    for stage, stage_records in _check_records(records, metric).items():
        used = metric if any(r[metric] is not None for r in stage_records) or fallback is None else fallback
        key = rank_key(used)
        finite = [r for r in stage_records if r.get(used) is not None and math.isfinite(float(r[used]))]
        if not finite:
            raise ValueError(f"stage {stage!r} has no finite {used}")
        best[stage] = min(finite, key=key)
    return best

"""Scoring one stage's generated images: the one function `evaluate` and `sweep` both call (`stage_metrics`),
and the bicubic baseline scored the same way (`upsampling_baseline`).

Every metric compares against the real val images at the stage's resolution: reference statistics cached
next to the shards (`cascade.evaluation.reference_stats`), the real detail energy computed once per process.
Images are float N×3×R×R in [-1, 1] on the uint8 grid (`cascade.evaluation.generation.quantise`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cascade.config import StageKind
from cascade.data.splits import read_split, split_batches
from cascade.evaluation.features import FeatureNet, PatchFeatures
from cascade.evaluation.generation import quantise
from cascade.evaluation.metrics import (
    class_accuracy,
    compute_fid_kid,
    consistency_psnr,
    detail_energy,
    detail_ratio,
)
from cascade.evaluation.reference_stats import cached_reference_stats, shard_fingerprint
from cascade.evaluation.sample_lists import SPLIT, TEACHER_FORCED, EvalData
from cascade.evaluation.settings import DEFAULT_METRICS, MetricSettings
from cascade.evaluation.tables import BASELINE_SUFFIX
from cascade.imageops import upsample
from cascade.pipeline.cascade_pipeline import CascadeConfigError, CascadePipeline


def check_nets(feature_nets: Sequence[FeatureNet], classifier: FeatureNet) -> None:
    """Feature networks with distinct names and a classifier with logits; one-line CascadeConfigErrors."""
    if not feature_nets or not all(isinstance(n, FeatureNet) for n in feature_nets):
        raise CascadeConfigError("feature_nets must be a non-empty list of FeatureNet")
    if len({n.name for n in feature_nets}) != len(feature_nets):
        raise CascadeConfigError(f"feature networks need distinct names, got {[n.name for n in feature_nets]}")
    if not isinstance(classifier, FeatureNet) or not classifier.has_logits:
        raise CascadeConfigError("classifier must be a FeatureNet with class logits (e.g. classifier32-features)")


def check_metric_settings(metrics: Any) -> MetricSettings:
    if not isinstance(metrics, MetricSettings):
        raise CascadeConfigError(f"metrics must be a MetricSettings, got {type(metrics).__name__}")
    return metrics


def memorisation_net(feature_nets: Sequence[FeatureNet]) -> FeatureNet:
    """The feature network of the memorisation check: the first that sees whole images (not patches)."""
    return next((n for n in feature_nets if not isinstance(n, PatchFeatures)), feature_nets[0])


_REAL_DETAIL_ENERGY: dict[tuple, float] = {}  # (root, resolution, low resolution, shard fingerprint) -> energy


def _real_detail_energy(data_root: Path, resolution: int, low_resolution: int) -> float:
    """`detail_energy` of the real val images, read once per process for the same shards."""
    key = (str(Path(data_root).resolve()), resolution, low_resolution, shard_fingerprint(data_root, SPLIT))
    if key not in _REAL_DETAIL_ENERGY:
        _REAL_DETAIL_ENERGY[key] = detail_energy(split_batches(data_root, SPLIT, resolution), low_resolution)
    return _REAL_DETAIL_ENERGY[key]


def stage_metrics(images: torch.Tensor, labels: torch.Tensor, *, data_root: Path, feature_nets:
                  Sequence[FeatureNet], classifier: FeatureNet, metrics: MetricSettings = DEFAULT_METRICS,
                  psnr: torch.Tensor | None = None, low_resolution: int | None = None, seed: int = 0,
                  batch_size: int = 64) -> dict[str, Any]:
    """Metrics of one stage's generated images (float N×3×R×R in [-1, 1]; labels: their classes) in the layout
    `cascade.evaluation.report.write_report` expects: per feature network `compute_fid_kid` (precision / recall
    and the bootstrap interval as `metrics` asks), class accuracy, psnr's mean as the consistency PSNR, and
    with low_resolution (SR stages) the detail ratio against the real val images."""
    n, resolution = images.shape[0], images.shape[-1]
    features = {}
    for net in feature_nets:
        reference = cached_reference_stats(data_root, SPLIT, resolution, net,
                                           lambda: split_batches(data_root, SPLIT, resolution), batch_size=batch_size,
                                           stats_dir=metrics.stats_dir)
        try:
            features[net.name] = compute_fid_kid(reference, images, net, batch_size=batch_size, seed=seed,
                                                 is_splits=min(10, n), pr_k=metrics.precision_recall_k,
                                                 bootstrap=metrics.bootstrap)
        except ValueError as err:
            if "precision/recall" not in str(err):
                raise
            raise CascadeConfigError(f"{err} (--pr-k)") from None
    result: dict[str, Any] = {"features": features}
    if psnr is not None:
        result["consistency_psnr"] = float(psnr.mean())
    if low_resolution is not None:
        result["detail_ratio"] = detail_ratio(images, _real_detail_energy(data_root, resolution, low_resolution),
                                              low_resolution)
    result["class_accuracy"] = class_accuracy(classifier.logits, images, labels, batch_size=batch_size)
    return result


def upsampling_baseline(data: EvalData, pipeline: CascadePipeline, *, feature_nets: Sequence[FeatureNet],
                        classifier: FeatureNet, metrics: MetricSettings = DEFAULT_METRICS, seed: int = 0,
                        batch_size: int = 64) -> dict[str, dict[str, Any]]:
    """{"<sr stage> (bicubic)": {teacher-forced: metrics}}: the real low-resolution inputs of the evaluation's
    samples upsampled (bicubic), scored like a stage's output. An SR stage adds detail where it beats this row."""
    sr = [s for s in pipeline.stages if s.config.kind is StageKind.sr]
    if not sr:
        return {}
    low_resolutions = sorted({s.config.low_resolution for s in sr})
    _, images = read_split(data.root, SPLIT, low_resolutions, keep=low_resolutions)
    order = torch.arange(data.num_samples) % data.num_val
    rows = {}
    for stage in sr:
        low = images[stage.config.low_resolution][order]
        up = upsample(low, stage.config.resolution).clamp(-1, 1)
        rows[stage.name + BASELINE_SUFFIX] = {TEACHER_FORCED: stage_metrics(
            quantise(up), data.labels, data_root=data.root, feature_nets=feature_nets, classifier=classifier,
            metrics=metrics, psnr=consistency_psnr(up, low)[0], low_resolution=stage.config.low_resolution,
            seed=seed, batch_size=batch_size)}
    return rows

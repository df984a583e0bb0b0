"""Per-stage evaluation of a cascade: generation (`cascade.evaluation.samples.generate`) and scoring.

For every stage: FID / KID (/ IS when the feature network has logits) and precision / recall of generated
images against the real val images at the stage's resolution (reference statistics cached next to the
shards, `cascade.evaluation.reference_stats`), class accuracy by a classifier trained on real data, for SR stages the
consistency PSNR (output downsampled vs the input it was given) and detail ratio; optionally CAS and
memorisation (`cascade.evaluation.train_split`). SR stages are judged in two modes: **teacher-forced** (input:
the real val low-resolution image, the stage alone) and **cascaded** (input: the sampled chain, what users
get). The base stage has no input: both modes hold the same samples. Sweeps: `cascade.evaluation.sweep`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cascade.checkpoint import load_stage
from cascade.config import SamplingSettings, StageKind
from cascade.data.loader import iterate_split
from cascade.evaluation.cas import DEFAULT_CAS, CASSettings
from cascade.evaluation.features import ClassifierFeatures, FeatureNet, InceptionFeatures, PatchFeatures
from cascade.evaluation.metrics import (
    PR_K,
    class_accuracy,
    compute_fid_kid,
    consistency_psnr,
    detail_energy,
    detail_ratio,
)
from cascade.evaluation.reference_stats import cached_reference_stats, shard_fingerprint
from cascade.evaluation.report import BASELINE_SUFFIX, write_pairs_image, write_report
from cascade.evaluation.samples import (
    CASCADED,
    MODES,
    SPLIT,
    TEACHER_FORCED,
    EvalData,
    chain_sampler,
    check_int,
    generate,
    is_main,
    load_eval_data,
    rank_world,
    read_split,
)
from cascade.evaluation.train_split import CASData, MemorisationCheck
from cascade.imageops import float_to_uint8, uint8_to_float, upsample
from cascade.pipeline.cascade_pipeline import CascadeConfigError, CascadePipeline
from cascade.pipeline.chain import check_classifier

__all__ = ["BASELINE_SUFFIX", "CASCADED", "MODES", "TEACHER_FORCED", "Evaluation", "classifier_feature_net",
           "evaluate", "inception_feature_net", "load_for_evaluation", "stage_metrics", "upsampling_baseline"]


# ------------------------------------------------------------------------------------------------------
# Feature networks


def classifier_feature_net(path: str | Path, device: str | torch.device = "cpu") -> ClassifierFeatures:
    """A classifier checkpoint (e.g. runs/classifier32) as the offline feature network `<stage>-features`:
    penultimate features and logits at t = 0 on images resized to its resolution."""
    try:
        cfg, model, _ = load_stage(path, device=device)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise CascadeConfigError(f"classifier: {err}; train classifier32 or pass --classifier PATH") from None
    check_classifier(path, cfg)
    return ClassifierFeatures(model, f"{cfg.name}-features", resolution=cfg.resolution)


def load_for_evaluation(runs_dir: str | Path, stages: Sequence[str], *,
                        checkpoints: Mapping[str, str | Path] | None = None, classifier: str | Path | None = None,
                        inception_weights: str | Path | None = None, device: str | torch.device = "cpu",
                        precision: str = "auto", patch_features: bool = False,
                        ) -> tuple[CascadePipeline, list[FeatureNet], ClassifierFeatures]:
    """(pipeline, feature networks, classifier) from checkpoints; classifier default `<runs_dir>/classifier32`.
    patch_features adds the classifier's `PatchFeatures` (patch FID). The Inception weights are checked first
    (cheap, and the likeliest mistake)."""
    inception = None if inception_weights is None else inception_feature_net(inception_weights, device)
    pipeline = CascadePipeline.from_runs(runs_dir, stages, checkpoints=checkpoints, device=device,
                                         precision=precision)
    clf = classifier_feature_net(Path(runs_dir) / "classifier32" if classifier is None else classifier, device)
    nets: list[FeatureNet] = ([inception] if inception is not None else []) + [clf]
    if patch_features:
        nets.append(PatchFeatures(clf, clf.resolution))
    return pipeline, nets, clf


def inception_feature_net(weights_path: str | Path, device: str | torch.device = "cpu") -> InceptionFeatures:
    """The standard FID Inception from a local weights file; a missing file or torch-fidelity is a
    CascadeConfigError (one line), never a download."""
    try:
        return InceptionFeatures(weights_path).to(device)
    except (FileNotFoundError, ModuleNotFoundError) as err:
        raise CascadeConfigError(str(err).replace("\n", " ")) from None


# ------------------------------------------------------------------------------------------------------
# Scoring (main process)


def _real_val_batches(data_root: Path, resolution: int):
    """The real val images at `resolution`, batch by batch (an ImageSource for the metrics)."""
    return (b["images"][resolution] for b in iterate_split(data_root, SPLIT, [resolution], batch_size=64))


_REAL_DETAIL_ENERGY: dict[tuple, float] = {}  # (root, resolution, low resolution, shard fingerprint) -> energy


def _real_detail_energy(data_root: Path, resolution: int, low_resolution: int) -> float:
    """`detail_energy` of the real val images, read once per process for the same shards."""
    key = (str(Path(data_root).resolve()), resolution, low_resolution, shard_fingerprint(data_root, SPLIT))
    if key not in _REAL_DETAIL_ENERGY:
        _REAL_DETAIL_ENERGY[key] = detail_energy(_real_val_batches(data_root, resolution), low_resolution)
    return _REAL_DETAIL_ENERGY[key]


def stage_metrics(images_uint8: torch.Tensor, labels: torch.Tensor, *, data_root: Path, feature_nets:
                  Sequence[FeatureNet], classifier: FeatureNet, psnr: torch.Tensor | None = None,
                  low_resolution: int | None = None, seed: int = 0, batch_size: int = 64, pr_k: int | None = PR_K,
                  bootstrap: int = 0) -> dict[str, Any]:
    """Metrics of one stage's generated images (N×R×R×3 uint8) in the layout `write_report` expects;
    low_resolution (SR stages): adds the detail ratio against the real val images. pr_k / bootstrap: see
    `compute_fid_kid` (pr_k None: no precision / recall)."""
    images = uint8_to_float(images_uint8)
    n, resolution = images.shape[0], images.shape[-1]
    features = {}
    for net in feature_nets:
        reference = cached_reference_stats(data_root, SPLIT, resolution, net,
                                           lambda: _real_val_batches(data_root, resolution), batch_size=batch_size)
        try:
            features[net.name] = compute_fid_kid(reference, images, net, batch_size=batch_size, seed=seed,
                                                 is_splits=min(10, n), pr_k=pr_k, bootstrap=bootstrap)
        except ValueError as err:
            if "precision/recall" not in str(err):
                raise
            raise CascadeConfigError(f"{err} (--pr-k)") from None
    metrics: dict[str, Any] = {"features": features}
    if psnr is not None:
        metrics["consistency_psnr"] = float(psnr.mean())
    if low_resolution is not None:
        metrics["detail_ratio"] = detail_ratio(images, _real_detail_energy(data_root, resolution, low_resolution),
                                               low_resolution)
    metrics["class_accuracy"] = class_accuracy(classifier.logits, images, labels, batch_size=batch_size)
    return metrics


def upsampling_baseline(data: EvalData, pipeline: CascadePipeline, *, feature_nets: Sequence[FeatureNet],
                        classifier: FeatureNet, seed: int = 0, batch_size: int = 64, pr_k: int | None = PR_K,
                        bootstrap: int = 0) -> dict[str, dict[str, Any]]:
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
        low = uint8_to_float(images[stage.config.low_resolution][order])
        up = upsample(low, stage.config.resolution).clamp(-1, 1)
        rows[stage.name + BASELINE_SUFFIX] = {TEACHER_FORCED: stage_metrics(
            float_to_uint8(up), data.labels, data_root=data.root, feature_nets=feature_nets, classifier=classifier,
            psnr=consistency_psnr(up, low)[0], low_resolution=stage.config.low_resolution, seed=seed,
            batch_size=batch_size, pr_k=pr_k, bootstrap=bootstrap)}
    return rows


# ------------------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class Evaluation:
    """results: {stage: {mode: metrics}} (the layout of `cascade.evaluation.report.write_report`); meta: the settings;
    pairs: {stage: (samples, nearest training images)} of the memorisation check."""

    results: dict[str, dict[str, dict[str, Any]]]
    meta: dict[str, Any]
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """`<out>/results.json`, `<out>/results.md`, the plot `<out>/results.png` (SR stages: detail ratio vs
        consistency) and, with memorisation, `<out>/memorisation-<stage>.png` (closest pairs)."""
        out = Path(out_dir)
        paths = out / "results.json", out / "results.md"
        for stage, (samples, neighbours) in self.pairs.items():
            write_pairs_image(samples, neighbours, out / f"memorisation-{stage}.png")
        write_report(self.results, *paths, meta=self.meta, plot_path=out / "results.png")
        return paths


def _check_modes(modes: Sequence[str]) -> list[str]:
    if isinstance(modes, str) or not modes or any(m not in MODES for m in modes) or len(set(modes)) != len(modes):
        raise CascadeConfigError(f"modes must be a non-empty list of distinct modes from {', '.join(MODES)}, "
                                 f"got {modes!r}")
    return [m for m in MODES if m in modes]


def check_nets(feature_nets: Sequence[FeatureNet], classifier: FeatureNet) -> None:
    if not feature_nets or not all(isinstance(n, FeatureNet) for n in feature_nets):
        raise CascadeConfigError("feature_nets must be a non-empty list of FeatureNet")
    if len({n.name for n in feature_nets}) != len(feature_nets):
        raise CascadeConfigError(f"feature networks need distinct names, got {[n.name for n in feature_nets]}")
    if not isinstance(classifier, FeatureNet) or not classifier.has_logits:
        raise CascadeConfigError("classifier must be a FeatureNet with class logits (e.g. classifier32-features)")


def check_extras(pr_k: int | None, bootstrap: int, num_samples: int) -> None:
    """Precision / recall and bootstrap settings against the sample count: one-line errors naming the flag."""
    if pr_k is not None:
        check_int("--pr-k", pr_k, 1)
        if pr_k >= num_samples:
            raise CascadeConfigError(f"--pr-k: precision/recall with k={pr_k} needs more than {pr_k} samples per "
                                     f"stage, got {num_samples}; raise --num-samples or lower --pr-k")
    if bootstrap:
        check_int("--bootstrap", bootstrap, 2)


def memorisation_net(feature_nets: Sequence[FeatureNet]) -> FeatureNet:
    """The feature network of the memorisation check: the first that sees whole images (not patches)."""
    return next((n for n in feature_nets if not isinstance(n, PatchFeatures)), feature_nets[0])


def evaluate(pipeline: CascadePipeline, data_root: str | Path, *, feature_nets: Sequence[FeatureNet],
             classifier: FeatureNet, settings: Mapping[str, SamplingSettings] | None = None,
             num_samples: int | None = None, modes: Sequence[str] = MODES, seed: int = 0, batch_size: int = 64,
             accelerator: Any = None, progress: bool = False, baselines: bool = False, pr_k: int | None = PR_K,
             bootstrap: int = 0, cas_per_class: int | None = None, cas_settings: CASSettings = DEFAULT_CAS,
             memorisation: bool = False) -> Evaluation | None:
    """Evaluate every stage of the pipeline in the given modes (see the module docstring).

    settings: {stage: SamplingSettings} (`CascadePipeline.settings`); stages left out sample with their own
    defaults. num_samples: images per stage and mode (default: one per val image). `classifier` (a FeatureNet
    with logits, usually also in feature_nets) gives class accuracy. baselines: add a row per SR stage for its
    real input upsampled (`upsampling_baseline`). pr_k: k of precision / recall (None: left out); bootstrap B:
    a 95% FID interval from B resamplings. cas_per_class N: CAS of every stage and mode from N generated
    images per class (`cascade.evaluation.train_split.CASData`). memorisation: nearest training images of every
    stage's samples (cascaded; the base stage in either mode), closest pairs saved by `Evaluation.write`.
    With truncation, a stage that hands over z_k has no clean cascaded output: its cascaded metrics and the
    next stage's cascaded consistency are left out. Returns the Evaluation on the main process, None on others.
    """
    modes = _check_modes(modes)
    check_nets(feature_nets, classifier)
    check_int("batch_size", batch_size, 1)
    rank, world = rank_world(accelerator)
    sr_stages = [s for s in pipeline.stages if s.config.kind is StageKind.sr]
    low_resolutions = [s.config.low_resolution for s in sr_stages] if TEACHER_FORCED in modes else []
    data = load_eval_data(data_root, pipeline, num_samples=num_samples, batch_size=batch_size, rank=rank,
                          world_size=world, low_resolutions=low_resolutions)
    check_extras(pr_k, bootstrap, data.num_samples)
    num_classes = pipeline.stages[0].config.num_classes
    cas = None if cas_per_class is None else CASData(data.root, num_classes, cas_per_class, cas_settings)
    classes = sorted(set(data.labels.tolist()))
    plan = pipeline.validate(classes, settings, batch_size=batch_size, seed=seed)
    settings = {sp.name: sp.settings for sp in plan.stages}
    handed_z = {sp.name for sp in plan.stages if sp.stop_at_index is not None}  # truncated: outputs are z_k

    names = [s.name for s in pipeline.stages]
    keys: dict[tuple[str, str], bool] = {}  # (mode, stage) -> with consistency
    if CASCADED in modes:
        keys.update({(CASCADED, n): i > 0 and names[i - 1] not in handed_z for i, n in enumerate(names)
                     if n not in handed_z})
    reuse_base = CASCADED in modes and names[0] not in handed_z  # same samples: teacher-forced base = cascaded
    if TEACHER_FORCED in modes:
        keys.update({(TEACHER_FORCED, n): i > 0 for i, n in enumerate(names) if not (i == 0 and reuse_base)})
    skip = [(TEACHER_FORCED, names[0])] if reuse_base else []
    run = {"seed": seed, "batch_size": batch_size}
    cas_list = None if cas is None else cas.sample_list(batch_size, rank, world, tuple(low_resolutions),
                                                        read_at=pipeline.stages[0].config.resolution)
    generated = generate(pipeline, data, chain_sampler(pipeline, data, settings, modes, skip=skip, **run), keys,
                         batch_size=batch_size, accelerator=accelerator, progress=progress)
    cas_generated = None
    if cas is not None:
        cas_keys = dict.fromkeys(keys, False)
        cas_generated = generate(pipeline, cas_list, chain_sampler(pipeline, cas_list, settings, modes, skip=skip,
                                                                   **run),
                                 cas_keys, batch_size=batch_size, accelerator=accelerator, progress=progress,
                                 desc="sampling for CAS")
    if not is_main(accelerator):
        return None

    results: dict[str, dict[str, dict[str, Any]]] = {}
    low_res = {s.name: s.config.low_resolution for s in pipeline.stages}  # None for the base stage
    extras = {"pr_k": pr_k, "bootstrap": bootstrap}
    checker = MemorisationCheck(data.root, memorisation_net(feature_nets), batch_size=batch_size) \
        if memorisation else None
    pairs = {}
    for key in sorted(keys, key=lambda k: (names.index(k[1]), MODES.index(k[0]))):
        mode, name = key
        metrics = stage_metrics(generated.images[key], data.labels, data_root=data.root, feature_nets=feature_nets,
                                classifier=classifier, psnr=generated.psnr.get(key), low_resolution=low_res[name],
                                seed=seed, batch_size=batch_size, **extras)
        if cas_generated is not None:
            metrics["cas"] = cas.score(cas_generated.images[key], cas_list.labels, seed=seed,
                                       device=pipeline.device)
        if checker is not None and (mode == CASCADED or name == names[0]):
            metrics["memorisation"], pairs[name] = checker.check(generated.images[key])
        results.setdefault(name, {})[mode] = metrics
    if reuse_base and TEACHER_FORCED in modes:
        results[names[0]] = {TEACHER_FORCED: results[names[0]][CASCADED], CASCADED: results[names[0]][CASCADED]}
    if baselines:
        baseline_rows = upsampling_baseline(data, pipeline, feature_nets=feature_nets, classifier=classifier,
                                            seed=seed, batch_size=batch_size, **extras)
        ordered: dict[str, dict[str, dict[str, Any]]] = {}
        for name, row in results.items():  # each baseline row right after its stage
            ordered[name] = row
            if name + BASELINE_SUFFIX in baseline_rows:
                ordered[name + BASELINE_SUFFIX] = baseline_rows[name + BASELINE_SUFFIX]
        results = ordered
    notes = [f"{n}: cascaded metrics left out (truncated: it hands over a noisy z_k)" for n in names if n in handed_z]
    meta = {
        "data": str(data.root),
        "split": SPLIT,
        "num_samples": data.num_samples,
        "num_val_images": data.num_val,
        "modes": modes,
        "seed": seed,
        "batch_size": batch_size,
        "num_processes": world,
        "feature_nets": {net.name: net.fingerprint()[:16] for net in feature_nets},
        "class_accuracy_by": classifier.name,
        "precision_recall_k": pr_k,
        "fid_bootstrap": bootstrap,
        **({"cas": {"per_class": cas.per_class, **dataclasses.asdict(cas_settings)}} if cas is not None else {}),
        **({"memorisation": {"feature_net": checker.net.name, "ratio": checker.ratio}} if checker else {}),
        "sampler": {k: v for k, v in plan.to_dict().items() if k not in ("classes", "num_per_class", "batch_size")},
        "checkpoints": pipeline.checkpoints(),
        **({"notes": notes} if notes else {}),
    }
    return Evaluation(results, meta, pairs)

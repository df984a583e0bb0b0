"""Per-stage evaluation of a cascade: one sampling plan, generation (`cascade.evaluation.generation.generate`)
and scoring (`cascade.evaluation.scoring.stage_metrics`).

For every stage: FID / KID (/ IS when the feature network has logits) and precision / recall of generated
images against the real val images at the stage's resolution (reference statistics cached next to the
shards, `cascade.evaluation.reference_stats`), class accuracy by a classifier trained on real data, for SR
stages the consistency PSNR (output downsampled vs the input it was given) and detail ratio; optionally CAS
and memorisation (`cascade.evaluation.training_data_metrics`), as `MetricSettings` asks. SR stages are judged
in two modes: **teacher-forced** (input: the real val low-resolution image, the stage alone) and
**cascaded** (input: the sampled chain, what users get). The base stage has no input: both modes hold the
same samples. Sweeps: `cascade.evaluation.sweep`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cascade.config import SamplingSettings, StageKind
from cascade.evaluation.features import FeatureNet, feature_sources
from cascade.evaluation.generation import chain_sampler, generate, is_main, rank_world
from cascade.evaluation.plots import write_pairs_image
from cascade.evaluation.report import write_report
from cascade.evaluation.sample_lists import CASCADED, MODES, SPLIT, TEACHER_FORCED, check_int
from cascade.evaluation.scoring import (
    check_metric_settings,
    check_nets,
    memorisation_net,
    stage_metrics,
    upsampling_baseline,
)
from cascade.evaluation.settings import DEFAULT_METRICS, MetricSettings
from cascade.evaluation.tables import BASELINE_SUFFIX
from cascade.evaluation.training_data_metrics import MemorisationCheck, load_sample_lists
from cascade.pipeline.cascade_pipeline import CascadeConfigError, CascadePipeline

__all__ = ["BASELINE_SUFFIX", "CASCADED", "MODES", "TEACHER_FORCED", "Evaluation", "StartHook", "evaluate"]

# Called once before any sampling with the validated {stage: SamplingSettings} and the sample count.
StartHook = Callable[[Mapping[str, SamplingSettings], int], None]


@dataclass
class Evaluation:
    """results: {stage: {mode: metrics}} (the layout of `cascade.evaluation.report.write_report`); meta: the
    settings; pairs: {stage: (samples, nearest training images)} of the memorisation check."""

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


def _keys(names: Sequence[str], modes: Sequence[str], handed_z: set[str]) -> tuple[dict[tuple[str, str], bool], bool]:
    """({(mode, stage): with consistency} to score, whether the teacher-forced base reuses the cascaded one)."""
    keys: dict[tuple[str, str], bool] = {}
    if CASCADED in modes:
        keys.update({(CASCADED, n): i > 0 and names[i - 1] not in handed_z for i, n in enumerate(names)
                     if n not in handed_z})
    reuse_base = CASCADED in modes and names[0] not in handed_z  # same samples: teacher-forced base = cascaded
    if TEACHER_FORCED in modes:
        keys.update({(TEACHER_FORCED, n): i > 0 for i, n in enumerate(names) if not (i == 0 and reuse_base)})
    return keys, reuse_base


def evaluate(pipeline: CascadePipeline, data_root: str | Path, *, feature_nets: Sequence[FeatureNet],
             classifier: FeatureNet, settings: Mapping[str, SamplingSettings] | None = None,
             metrics: MetricSettings = DEFAULT_METRICS, num_samples: int | None = None,
             modes: Sequence[str] = MODES, seed: int = 0, batch_size: int = 64, accelerator: Any = None,
             progress: bool = False, on_start: StartHook | None = None) -> Evaluation | None:
    """Evaluate every stage of the pipeline in the given modes (see the module docstring).

    settings: {stage: SamplingSettings} (`CascadePipeline.settings`); stages left out sample with their own
    defaults. They are validated once into one `SamplingPlan` that every chunk and sample list samples from
    (teacher forcing: one plan per stage alone, `CascadePipeline.plan_alone`, built once per sample list).
    metrics: the optional metrics (`MetricSettings`: precision / recall, FID's bootstrap interval, CAS,
    memorisation: nearest training images of every stage's samples (cascaded; the base stage in either mode),
    closest pairs saved by `Evaluation.write`; baselines: a row per SR stage for its real input upsampled).
    num_samples: images per stage and mode (default: one per val image). `classifier` (a FeatureNet with
    logits, usually also in feature_nets) gives class accuracy. With truncation, a stage that hands over z_k
    has no clean cascaded output: its cascaded metrics and the next stage's cascaded consistency are left
    out. ``on_start`` (main process) is called once after every check and before any sampling with the
    validated {stage: SamplingSettings} and the sample count (a start-up summary). Raises CascadeConfigError
    (one line) on bad input. Returns the Evaluation on the main process, None on others.
    """
    modes = _check_modes(modes)
    check_nets(feature_nets, classifier)
    check_metric_settings(metrics)
    check_int("batch_size", batch_size, 1)
    rank, world = rank_world(accelerator)
    sr_stages = [s for s in pipeline.stages if s.config.kind is StageKind.sr]
    low_resolutions = [s.config.low_resolution for s in sr_stages] if TEACHER_FORCED in modes else []
    lists = load_sample_lists(pipeline, data_root, metrics, low_resolutions=low_resolutions,
                              num_samples=num_samples, batch_size=batch_size, rank=rank, world=world)
    data, cas, cas_list, classes = lists.data, lists.cas, lists.cas_list, lists.classes
    plan = pipeline.validate(classes, settings, batch_size=batch_size, seed=seed)  # the one plan, checked once
    handed_z = {sp.name for sp in plan.stages if sp.stop_at_index is not None}  # truncated: outputs are z_k
    if on_start is not None and is_main(accelerator):
        on_start({sp.name: sp.settings for sp in plan.stages}, data.num_samples)

    names = [s.name for s in pipeline.stages]
    keys, reuse_base = _keys(names, modes, handed_z)
    skip = [(TEACHER_FORCED, names[0])] if reuse_base else []
    generated = generate(pipeline, data, chain_sampler(pipeline, data, plan, modes, skip=skip), keys,
                         batch_size=batch_size, accelerator=accelerator, progress=progress)
    cas_generated = None
    if cas_list is not None:
        cas_generated = generate(pipeline, cas_list, chain_sampler(pipeline, cas_list, plan, modes, skip=skip),
                                 dict.fromkeys(keys, False), batch_size=batch_size, accelerator=accelerator,
                                 progress=progress, desc="sampling for CAS")
    if not is_main(accelerator):
        return None

    results: dict[str, dict[str, dict[str, Any]]] = {}
    low_res = {s.name: s.config.low_resolution for s in pipeline.stages}  # None for the base stage
    scoring = {"data_root": data.root, "feature_nets": feature_nets, "classifier": classifier, "metrics": metrics,
               "seed": seed, "batch_size": batch_size}
    checker = MemorisationCheck(data.root, memorisation_net(feature_nets), batch_size=batch_size) \
        if metrics.memorisation else None
    pairs = {}
    for key in sorted(keys, key=lambda k: (names.index(k[1]), MODES.index(k[0]))):
        mode, name = key
        scores = stage_metrics(generated.images[key], data.labels, psnr=generated.psnr.get(key),
                               low_resolution=low_res[name], **scoring)
        if cas_generated is not None:
            scores["cas"] = cas.score(cas_generated.images[key], cas_list.labels, seed=seed, device=pipeline.device)
        if checker is not None and (mode == CASCADED or name == names[0]):
            scores["memorisation"], pairs[name] = checker.check(generated.images[key])
        results.setdefault(name, {})[mode] = scores
    if reuse_base and TEACHER_FORCED in modes:
        results[names[0]] = {TEACHER_FORCED: results[names[0]][CASCADED], CASCADED: results[names[0]][CASCADED]}
    if metrics.baselines:
        baseline_rows = upsampling_baseline(data, pipeline, **{k: v for k, v in scoring.items() if k != "data_root"})
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
        "val_images": data.val_images,
        "modes": modes,
        "seed": seed,
        "batch_size": batch_size,
        "num_processes": world,
        "feature_nets": {net.name: net.fingerprint()[:16] for net in feature_nets},
        "features": feature_sources([*feature_nets, classifier]),
        "class_accuracy_by": classifier.name,
        "precision_recall_k": metrics.precision_recall_k,
        "fid_bootstrap": metrics.bootstrap,
        **({"cas": {"per_class": cas.per_class, **dataclasses.asdict(metrics.cas)}} if cas is not None else {}),
        **({"memorisation": {"feature_net": checker.net.name, "ratio": checker.ratio}} if checker else {}),
        "sampler": {k: v for k, v in plan.to_dict().items() if k not in ("classes", "num_per_class", "batch_size")},
        "checkpoints": pipeline.checkpoints(),
        **({"notes": notes} if notes else {}),
    }
    return Evaluation(results, meta, pairs)

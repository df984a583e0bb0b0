"""Sweeps of the guidance weight w and the augmentation level s per stage, ranked by any metric.

Every setting of a stage is validated once into its own `SamplingPlan`, sampled through
`cascade.evaluation.generation.generate` and scored by `cascade.evaluation.scoring.stage_metrics` (and CAS
when `MetricSettings.cas_per_class` is set); the best per stage is picked by
`cascade.evaluation.metrics.best_setting` with the rank metric (lowest FID by default; `METRIC_GOALS` for the
others).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cascade.config import SamplingSettings, StageKind
from cascade.evaluation.evaluate import StartHook
from cascade.evaluation.features import FeatureNet, feature_sources
from cascade.evaluation.generation import broadcast, generate, is_main, plan_for, rank_world
from cascade.evaluation.metrics import METRIC_GOALS, best_setting, rank_key
from cascade.evaluation.report import best_flags, write_sweep
from cascade.evaluation.sample_lists import (
    CASCADED,
    MODES,
    TEACHER_FORCED,
    EvalData,
    check_int,
)
from cascade.evaluation.scoring import check_metric_settings, check_nets, stage_metrics
from cascade.evaluation.settings import DEFAULT_METRICS, MetricSettings
from cascade.evaluation.training_data_metrics import load_sample_lists
from cascade.pipeline.cascade_pipeline import CascadeConfigError, CascadePipeline
from cascade.pipeline.plan import SamplingPlan


def _grid(value: Any, names: Sequence[str], option: str) -> dict[str, list[float | None]]:
    """A list of values for every stage, or {stage: list} (stages not named keep their default: [None])."""
    if value is None:
        return {n: [None] for n in names}
    if not isinstance(value, Mapping):
        value = {n: value for n in names}
    for name, values in value.items():
        if name not in names:
            raise CascadeConfigError(f"{option}: stage {name!r} is not in the chain ({', '.join(names)})")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise CascadeConfigError(f"{option}: stage {name}: expected a non-empty list of values, got {values!r}")
    return {n: list(value.get(n, [None])) for n in names}


def sweep_settings(settings: Mapping[str, SamplingSettings], w: Any = (0.0,),
                   aug_level: Any = None) -> dict[str, list[SamplingSettings]]:
    """Per stage, the settings to try: its ``settings`` with every w (base stage) or every w × s (SR stages).

    w / aug_level: a list for every stage or {stage: list}; a stage not named keeps its own value. Raises
    CascadeConfigError naming the stage on a bad value (checked here, before any sampling).
    """
    names = list(settings)
    ws = _grid(w, names, "w")
    if isinstance(aug_level, Mapping) and names[0] in aug_level:
        raise CascadeConfigError(f"aug_level: stage {names[0]} is the base stage and takes no conditioning")
    ss = _grid(aug_level, names, "aug_level")
    grid = {}
    for name, base in settings.items():
        levels = ss[name] if base.aug_level is not None else [None]
        grid[name] = []
        for gw, s in itertools.product(ws[name], levels):
            changes = {k: v for k, v in (("w", gw), ("aug_level", s)) if v is not None}
            try:
                grid[name].append(dataclasses.replace(base, **changes))
            except ValueError as err:
                raise CascadeConfigError(f"stage {name}: {err}") from None
    return grid


@dataclass
class Sweep:
    """records: one per (stage, w, s) with "fid" etc. of the ranking feature network; best: per stage."""

    records: list[dict[str, Any]]
    best: dict[str, dict[str, Any]]
    meta: dict[str, Any]

    def flags(self) -> str:
        """The best settings as sample_cascade.py flags."""
        return best_flags(self.best)

    def write(self, out_dir: str | Path) -> tuple[Path, Path, Path]:
        """`<out>/sweep.json`, `<out>/sweep.md` (table, best ★) and `<out>/sweep.png` (plot_sweep)."""
        return write_sweep(out_dir, self.records, self.best, self.meta)


def _stage_sampler(pipeline: CascadePipeline, data: EvalData, plan: SamplingPlan, stage: str,
                   x_low: torch.Tensor | None, key: tuple[str, str]):
    """The sample_chunk of one stage alone from its validated `plan` (`CascadePipeline.plan_alone`) on `x_low`."""

    def sample_chunk(chunk: range, local: slice) -> Iterator:
        low = None if x_low is None else x_low[local]
        images = pipeline.run_stage(plan_for(plan, data.labels[chunk.start : chunk.stop]), stage, low,
                                    start_index=chunk.start)
        yield key, images, low

    return sample_chunk


def _record(stage: str, setting: SamplingSettings, mode: str, rank_by: str, metrics: Mapping) -> dict[str, Any]:
    ranked = metrics["features"][rank_by]
    cas = metrics.get("cas")
    return {"stage": stage, "w": setting.w, "aug_level": setting.aug_level, "guide": setting.guide,
            "guide_checkpoint": setting.guide_checkpoint, "mode": mode, "feature_net": rank_by,
            "fid": ranked["fid"], "kid_mean": ranked["kid_mean"], "kid_std": ranked["kid_std"],
            "is_mean": ranked.get("is_mean"), "precision": ranked.get("precision"), "recall": ranked.get("recall"),
            "num_samples": ranked["num_fake"], "fid_biased": ranked["fid_biased"],
            "class_accuracy": metrics["class_accuracy"], "consistency_psnr": metrics.get("consistency_psnr"),
            "detail_ratio": metrics.get("detail_ratio"), "cas": cas,
            "cas_top1": None if cas is None else cas["top1"], "cas_top5": None if cas is None else cas.get("top5"),
            "features": metrics["features"]}


def sweep(pipeline: CascadePipeline, data_root: str | Path, *, feature_nets: Sequence[FeatureNet],
          classifier: FeatureNet, settings: Mapping[str, SamplingSettings] | None = None, w: Any = (0.0, 1.0, 3.0),
          aug_level: Any = None, mode: str = TEACHER_FORCED, rank_by: str | None = None, rank_metric: str = "fid",
          metrics: MetricSettings = DEFAULT_METRICS, num_samples: int | None = None, seed: int = 0,
          batch_size: int = 64, accelerator: Any = None, progress: bool = False,
          on_start: StartHook | None = None) -> Sweep | None:
    """FID (and KID, precision / recall, consistency, detail ratio, class accuracy, CAS as `metrics` asks) of
    every stage at every (w, s) of `sweep_settings`, each setting validated once into its own plan before any
    sampling.

    settings: {stage: SamplingSettings} the grid varies (default: each stage's own; `CascadePipeline.settings`).
    metrics: `MetricSettings` without memorisation or baselines (rows of an evaluation, not of a sweep).

    teacher-forced: each SR stage takes the real low-resolution images (stages judged alone). cascaded: stages
    are swept in chain order and each SR stage takes the previous stage's samples at its best setting (the
    greedy post-training search). rank_by: the feature network of the feature metrics (default: the first
    of feature_nets); rank_metric: the metric that picks the best (`METRIC_GOALS`; a stage without it, such as
    the base stage for consistency, is ranked by FID). ``on_start``: as `evaluate`'s, with the settings the grid
    varies. Returns the Sweep on the main process, None on others.
    """
    if mode not in MODES:
        raise CascadeConfigError(f"mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    check_nets(feature_nets, classifier)
    check_metric_settings(metrics)
    if metrics.memorisation or metrics.baselines:
        raise CascadeConfigError("sweep: memorisation and baselines are rows of an evaluation (eval_fid.py), not "
                                 "of a sweep; leave them off")
    check_int("batch_size", batch_size, 1)
    rank_by = feature_nets[0].name if rank_by is None else rank_by
    if rank_by not in [n.name for n in feature_nets]:
        raise CascadeConfigError(f"rank_by: no feature network {rank_by!r}; use one of "
                                 f"{', '.join(n.name for n in feature_nets)}")
    if rank_metric not in METRIC_GOALS:
        raise CascadeConfigError(f"--rank-metric: unknown metric {rank_metric!r}; use one of "
                                 f"{', '.join(METRIC_GOALS)}")
    if rank_metric.startswith("cas") and metrics.cas_per_class is None:
        raise CascadeConfigError(f"--rank-metric {rank_metric} needs CAS: pass --cas N (samples per class)")
    if rank_metric in ("precision", "recall") and not metrics.pr_k:
        raise CascadeConfigError(f"--rank-metric {rank_metric} needs precision/recall: pass --pr-k K")
    base_settings = {sp.name: sp.settings for sp in pipeline.validate([0], settings).stages}
    grid = sweep_settings(base_settings, w, aug_level)
    rank, world = rank_world(accelerator)
    low_resolutions = ([s.config.low_resolution for s in pipeline.stages if s.config.kind is StageKind.sr]
                       if mode == TEACHER_FORCED else [])
    lists = load_sample_lists(pipeline, data_root, metrics, low_resolutions=low_resolutions,
                              num_samples=num_samples, batch_size=batch_size, rank=rank, world=world)
    data, cas, cas_list, classes = lists.data, lists.cas, lists.cas_list, lists.classes
    plans = {name: [pipeline.plan_alone(name, classes, setting, batch_size=batch_size, seed=seed)
                    for setting in tried]
             for name, tried in grid.items()}  # every setting is checked against the chain before any sampling
    if on_start is not None and is_main(accelerator):
        on_start(base_settings, data.num_samples)

    records: list[dict[str, Any]] = []
    previous: dict[str, torch.Tensor | None] = {"main": None, "cas": None}  # cascaded: the previous stage's best
    lists = {"main": data} | ({"cas": cas_list} if cas_list is not None else {})
    for i, stage in enumerate(pipeline.stages):
        key = (mode, stage.name)
        # the base stage has no input: no consistency or detail ratio, ranked by FID then (as best_setting does)
        metric = "fid" if i == 0 and rank_metric in ("consistency_psnr", "detail_ratio") else rank_metric
        best_score, best_images = math.inf, None
        for setting, plan in zip(grid[stage.name], plans[stage.name]):
            outputs = {}
            for which, sample_list in lists.items():
                if i == 0:
                    x_low = None
                elif mode == TEACHER_FORCED:
                    x_low = sample_list.low_res[stage.config.low_resolution]
                else:
                    x_low = previous[which]
                outputs[which] = generate(
                    pipeline, sample_list, _stage_sampler(pipeline, sample_list, plan, stage.name, x_low, key),
                    {key: i > 0}, batch_size=batch_size, accelerator=accelerator, progress=progress,
                    desc=f"{stage.name} w={setting.w:g}" + ("" if which == "main" else " (CAS)"),
                    keep=[key] if mode == CASCADED else [])
            record = None
            if is_main(accelerator):
                scores = stage_metrics(outputs["main"].images[key], data.labels, data_root=data.root,
                                       feature_nets=feature_nets, classifier=classifier, metrics=metrics,
                                       psnr=outputs["main"].psnr.get(key), low_resolution=stage.config.low_resolution,
                                       seed=seed, batch_size=batch_size)
                if cas is not None:
                    scores["cas"] = cas.score(outputs["cas"].images[key], cas_list.labels, seed=seed,
                                              device=pipeline.device)
                record = _record(stage.name, setting, mode, rank_by, scores)
                records.append(record)
            score = broadcast(accelerator, None if record is None else rank_key(metric)(record))
            if mode == CASCADED and (best_images is None or (math.isfinite(score) and not score >= best_score)):
                best_score = score
                best_images = {which: out.kept[key] for which, out in outputs.items()}
        if best_images is not None:
            previous = best_images
    if not is_main(accelerator):
        return None
    meta = {
        "data": str(data.root),
        "mode": mode,
        "ranked_by": rank_by,
        "features": feature_sources([*feature_nets, classifier]),
        "class_accuracy_by": classifier.name,
        "rank_metric": rank_metric,
        "num_samples": data.num_samples,
        "val_images": data.val_images,
        "settings": {name: setting.to_dict() for name, setting in base_settings.items()},
        "seed": seed,
        "batch_size": batch_size,
        "num_processes": world,
        "precision_recall_k": metrics.precision_recall_k,
        "fid_bootstrap": metrics.bootstrap,
        **({"cas": {"per_class": cas.per_class, **dataclasses.asdict(metrics.cas)}} if cas is not None else {}),
        "checkpoints": {k: v["path"] for k, v in pipeline.checkpoints().items()},
    }
    return Sweep(records, best_setting(records, rank_metric), meta)

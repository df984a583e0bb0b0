"""Per-stage evaluation of a cascade and sweeps of its sampling settings.

For every stage: FID / KID (/ IS when the feature network has logits) of generated images against the
real val images at the stage's resolution (reference statistics cached next to the shards), class
accuracy of the generated images by a classifier trained on real data, and for SR stages the
consistency PSNR (output downsampled vs the input it was given). SR stages are judged in two modes:
**teacher-forced** (input: the real val low-resolution image, the stage alone) and **cascaded** (input:
the sampled chain, what users get). The base stage has no input: both modes hold the same samples.

Samples: sample i has the class of val image i mod N (N val images), so generated classes follow the
held-out distribution, and teacher-forced SR stages take that image's low-resolution version as input.
Generated images are quantised to uint8 (as saved PNGs would be, like the real images) before FID, KID,
IS and class accuracy.

Processes (accelerate): the sample list is cut into batches and every process samples a contiguous run
of whole batches with the pipeline's per-sample seeds (`start_index`), so the union equals the
single-process result; images are gathered with `gather_for_metrics` and the main process computes the
metrics (the others return None).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cascade.checkpoint import load_stage
from cascade.config import SamplingSettings, StageKind
from cascade.data import iterate_split, read_dataset_info
from cascade.features import ClassifierFeatures, FeatureNet, InceptionFeatures, PatchFeatures
from cascade.imageops import float_to_uint8, uint8_to_float, upsample
from cascade.metrics import (
    best_setting,
    cached_reference_stats,
    class_accuracy,
    compute_fid_kid,
    consistency_psnr,
    detail_energy,
    detail_ratio,
    metric_label,
    plot_sweep,
    shard_fingerprint,
    write_report,
)
from cascade.pipeline import CascadeConfigError, CascadePipeline

TEACHER_FORCED, CASCADED = "teacher-forced", "cascaded"
MODES = (TEACHER_FORCED, CASCADED)
SPLIT = "val"
CHUNK_BATCHES = 8  # batches sampled per chunk: bounds the float images held at once


# ------------------------------------------------------------------------------------------------------
# Feature networks


def classifier_feature_net(path: str | Path, device: str | torch.device = "cpu") -> ClassifierFeatures:
    """A classifier checkpoint (e.g. runs/classifier32) as the offline feature network `<stage>-features`:
    penultimate features and logits at t = 0 on images resized to its resolution."""
    try:
        cfg, model, _ = load_stage(path, device=device)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise CascadeConfigError(f"classifier: {err}; train classifier32 or pass --classifier PATH") from None
    if cfg.kind != "classifier":
        raise CascadeConfigError(
            f"classifier: {path} holds a {cfg.kind} stage ({cfg.name}); pass a classifier checkpoint"
        )
    return ClassifierFeatures(model, f"{cfg.name}-features", resolution=cfg.resolution)


def load_for_evaluation(runs_dir: str | Path, stages: Sequence[str], *,
                        checkpoints: Mapping[str, str | Path] | None = None, classifier: str | Path | None = None,
                        inception_weights: str | Path | None = None, device: str | torch.device = "cpu",
                        precision: str = "fp32", patch_features: bool = False,
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
# Samples, their inputs, and their split over processes


def process_slice(num_samples: int, batch_size: int, rank: int, world_size: int) -> range:
    """This process's contiguous run of whole batches of the sample list (possibly empty)."""
    num_batches = -(-num_samples // batch_size)
    first, last = rank * num_batches // world_size, (rank + 1) * num_batches // world_size
    return range(min(first * batch_size, num_samples), min(last * batch_size, num_samples))


@dataclass
class EvalData:
    """The sample list of an evaluation: classes from the val split and, for this process's samples,
    the real val images at the resolutions SR stages take as input."""

    root: Path
    labels: torch.Tensor  # num_samples: class of sample i = class of val image i mod num_val
    num_val: int
    samples: range  # this process's samples
    low_res: dict[int, torch.Tensor] = field(default_factory=dict)  # res -> len(samples)×3×res×res

    @property
    def num_samples(self) -> int:
        return len(self.labels)


def _check_int(what: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise CascadeConfigError(f"{what} must be an integer >= {low}, got {value!r}")
    return value


def _read_val_split(root: Path, resolutions: Sequence[int], keep: Sequence[int] = ()
                    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(labels, {res: uint8 N×res×res×3}) of every val image, reading `resolutions` and keeping the images of
    those in `keep` (uint8 is exact: the shards hold uint8)."""
    labels, images = [], {r: [] for r in keep}
    for batch in iterate_split(root, SPLIT, resolutions, batch_size=64):
        labels.append(batch["y"])
        for r in keep:
            images[r].append(float_to_uint8(batch["images"][r]))
    empty = torch.empty(0, dtype=torch.long)
    return (torch.cat(labels) if labels else empty), {r: torch.cat(parts) for r, parts in images.items() if parts}


def load_eval_data(root: str | Path, pipeline: CascadePipeline, *, num_samples: int | None, batch_size: int,
                   rank: int = 0, world_size: int = 1, low_resolutions: Sequence[int] = ()) -> EvalData:
    """Read the val split once: every class and this process's low-resolution inputs (num_samples None: one
    sample per val image). Errors name the data folder and the fix."""
    root = Path(root)
    try:
        info = read_dataset_info(root)
    except (FileNotFoundError, ValueError) as err:
        raise CascadeConfigError(f"data: {err}; pass a shard folder with a val split (--data DIR)") from None
    base = pipeline.stages[0]
    if len(info["class_names"]) != base.config.num_classes:
        raise CascadeConfigError(
            f"data: {root} has {len(info['class_names'])} classes but {base.name} was trained with "
            f"{base.config.num_classes}; evaluate on the data the cascade was trained on"
        )
    needed = sorted({s.config.resolution for s in pipeline.stages} | set(low_resolutions))
    lacking = [r for r in needed if r not in info["resolutions"]]
    if lacking:
        raise CascadeConfigError(f"data: {root} has resolutions {sorted(info['resolutions'])} but the stages "
                                 f"need {needed}; rewrite the shards with --max-res {max(needed)}")
    try:
        val_labels, images = _read_val_split(root, sorted(low_resolutions) or [base.config.resolution],
                                             keep=low_resolutions)
    except (FileNotFoundError, ValueError) as err:
        raise CascadeConfigError(f"data: {err}; pass a shard folder with a val split (--data DIR)") from None
    if not len(val_labels):
        raise CascadeConfigError(f"data: {root} has no readable val images")
    num_val = len(val_labels)
    num_samples = num_val if num_samples is None else _check_int("num_samples", num_samples, 2)
    if num_samples < 2:
        raise CascadeConfigError(f"num_samples: FID needs at least 2 samples, but {root} has {num_val} val images")
    samples = process_slice(num_samples, batch_size, rank, world_size)
    order = torch.arange(num_samples) % num_val
    low_res = {r: uint8_to_float(images[r][order[samples.start : samples.stop]]) for r in low_resolutions}
    return EvalData(root, val_labels[order], num_val, samples, low_res)


# ------------------------------------------------------------------------------------------------------
# Sampling (every process) and gathering


def _rank_world(accelerator: Any) -> tuple[int, int]:
    return (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)


def _is_main(accelerator: Any) -> bool:
    return accelerator is None or accelerator.is_main_process


def _gather(accelerator: Any, part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate every process's tensors in process order (= sample order: slices are contiguous)."""
    if accelerator is None or accelerator.num_processes == 1:
        return part
    parts = accelerator.gather_for_metrics([part], use_gather_object=True)
    return {key: torch.cat([p[key] for p in parts]) for key in part}


def _broadcast(accelerator: Any, value: Any) -> Any:
    """The main process's value on every process."""
    if accelerator is None or accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def _chunks(samples: range, batch_size: int) -> list[range]:
    """Batch-aligned chunks of a process's samples (every sampled batch starts at a multiple of batch_size)."""
    size = batch_size * CHUNK_BATCHES
    return [range(s, min(s + size, samples.stop)) for s in range(samples.start, samples.stop, size)]


class _Collected:
    """Per (mode, stage): uint8 images B×H×W×3 and per-image consistency PSNR of this process's samples."""

    def __init__(self):
        self.parts: dict[str, list[torch.Tensor]] = {}

    def add(self, key: str, tensor: torch.Tensor) -> None:
        self.parts.setdefault(key, []).append(tensor)

    def add_stage(self, mode: str, stage: str, images: torch.Tensor, x_low: torch.Tensor | None) -> None:
        self.add(f"{mode}/{stage}/images", float_to_uint8(images))
        if x_low is not None:  # the output against the very input it was given
            self.add(f"{mode}/{stage}/psnr", consistency_psnr(images, x_low)[0].float())

    def tensors(self, keys: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, torch.Tensor]:
        """Every expected key, empty (with the right shape) where this process had no samples."""
        return {k: torch.cat(self.parts[k]) if k in self.parts else torch.empty(shape, dtype=dtype)
                for k, (shape, dtype) in keys.items()}


def _expected(pipeline: CascadePipeline, keys: Sequence[tuple[str, str, bool]]) -> dict:
    res = {s.name: s.config.resolution for s in pipeline.stages}
    out = {}
    for mode, stage, with_psnr in keys:
        out[f"{mode}/{stage}/images"] = ((0, res[stage], res[stage], 3), torch.uint8)
        if with_psnr:
            out[f"{mode}/{stage}/psnr"] = ((0,), torch.float32)
    return out


# ------------------------------------------------------------------------------------------------------
# Metrics (main process)


def _real_val_batches(data_root: Path, resolution: int):
    """The real val images at `resolution`, batch by batch (an ImageSource for the metrics)."""
    return (b["images"][resolution] for b in iterate_split(data_root, SPLIT, [resolution], batch_size=64))


def _reference(data_root: Path, resolution: int, net: FeatureNet, batch_size: int):
    return cached_reference_stats(data_root, SPLIT, resolution, net, lambda: _real_val_batches(data_root, resolution),
                                  batch_size=batch_size)


_REAL_DETAIL_ENERGY: dict[tuple, float] = {}  # (root, resolution, low resolution, shard fingerprint) -> energy


def _real_detail_energy(data_root: Path, resolution: int, low_resolution: int) -> float:
    """`detail_energy` of the real val images, read once per process for the same shards."""
    key = (str(Path(data_root).resolve()), resolution, low_resolution, shard_fingerprint(data_root, SPLIT))
    if key not in _REAL_DETAIL_ENERGY:
        _REAL_DETAIL_ENERGY[key] = detail_energy(_real_val_batches(data_root, resolution), low_resolution)
    return _REAL_DETAIL_ENERGY[key]


def stage_metrics(images_uint8: torch.Tensor, labels: torch.Tensor, *, data_root: Path, feature_nets:
                  Sequence[FeatureNet], classifier: FeatureNet, psnr: torch.Tensor | None = None,
                  low_resolution: int | None = None, seed: int = 0, batch_size: int = 64) -> dict[str, Any]:
    """Metrics of one stage's generated images (N×R×R×3 uint8) in the layout `write_report` expects;
    low_resolution (SR stages): adds the detail ratio against the real val images."""
    images = uint8_to_float(images_uint8)
    n, resolution = images.shape[0], images.shape[-1]
    features = {}
    for net in feature_nets:
        reference = _reference(data_root, resolution, net, batch_size)
        features[net.name] = compute_fid_kid(reference, images, net, batch_size=batch_size, seed=seed,
                                             is_splits=min(10, n))
    metrics: dict[str, Any] = {"features": features}
    if psnr is not None:
        metrics["consistency_psnr"] = float(psnr.mean())
    if low_resolution is not None:
        metrics["detail_ratio"] = detail_ratio(images, _real_detail_energy(data_root, resolution, low_resolution),
                                               low_resolution)
    metrics["class_accuracy"] = class_accuracy(classifier.logits, images, labels, batch_size=batch_size)
    return metrics


BASELINE_SUFFIX = " (bicubic)"


def upsampling_baseline(data: EvalData, pipeline: CascadePipeline, *, feature_nets: Sequence[FeatureNet],
                        classifier: FeatureNet, seed: int = 0, batch_size: int = 64) -> dict[str, dict[str, Any]]:
    """{"<sr stage> (bicubic)": {teacher-forced: metrics}}: the real low-resolution inputs of the evaluation's
    samples upsampled (bicubic), scored like a stage's output. An SR stage adds detail where it beats this row."""
    sr = [s for s in pipeline.stages if s.config.kind is StageKind.sr]
    if not sr:
        return {}
    low_resolutions = sorted({s.config.low_resolution for s in sr})
    _, images = _read_val_split(data.root, low_resolutions, keep=low_resolutions)
    order = torch.arange(data.num_samples) % data.num_val
    rows = {}
    for stage in sr:
        low = uint8_to_float(images[stage.config.low_resolution][order])
        up = upsample(low, stage.config.resolution).clamp(-1, 1)
        rows[stage.name + BASELINE_SUFFIX] = {TEACHER_FORCED: stage_metrics(
            float_to_uint8(up), data.labels, data_root=data.root, feature_nets=feature_nets, classifier=classifier,
            psnr=consistency_psnr(up, low)[0], low_resolution=stage.config.low_resolution, seed=seed,
            batch_size=batch_size)}
    return rows


# ------------------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class Evaluation:
    """results: {stage: {mode: metrics}} (the layout of `cascade.metrics.write_report`); meta: the settings."""

    results: dict[str, dict[str, dict[str, Any]]]
    meta: dict[str, Any]

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """`<out>/results.json` and `<out>/results.md`."""
        out = Path(out_dir)
        paths = out / "results.json", out / "results.md"
        write_report(self.results, *paths, meta=self.meta)
        return paths


def _check_modes(modes: Sequence[str]) -> list[str]:
    if isinstance(modes, str) or not modes or any(m not in MODES for m in modes) or len(set(modes)) != len(modes):
        raise CascadeConfigError(f"modes must be a non-empty list of distinct modes from {', '.join(MODES)}, "
                                 f"got {modes!r}")
    return [m for m in MODES if m in modes]


def _check_nets(feature_nets: Sequence[FeatureNet], classifier: FeatureNet) -> None:
    if not feature_nets or not all(isinstance(n, FeatureNet) for n in feature_nets):
        raise CascadeConfigError("feature_nets must be a non-empty list of FeatureNet")
    if len({n.name for n in feature_nets}) != len(feature_nets):
        raise CascadeConfigError(f"feature networks need distinct names, got {[n.name for n in feature_nets]}")
    if not isinstance(classifier, FeatureNet) or not classifier.has_logits:
        raise CascadeConfigError("classifier must be a FeatureNet with class logits (e.g. classifier32-features)")


def evaluate(pipeline: CascadePipeline, data_root: str | Path, *, feature_nets: Sequence[FeatureNet],
             classifier: FeatureNet, settings: Mapping[str, SamplingSettings] | None = None,
             num_samples: int | None = None, modes: Sequence[str] = MODES, seed: int = 0, batch_size: int = 64,
             accelerator: Any = None, progress: bool = False, baselines: bool = False) -> Evaluation | None:
    """Evaluate every stage of the pipeline in the given modes (see the module docstring).

    settings: {stage: SamplingSettings} (`CascadePipeline.settings`); stages left out sample with their own
    defaults. num_samples: images per stage and mode (default: one per
    val image). `classifier` (a FeatureNet with logits, usually also in feature_nets) gives class accuracy.
    baselines: add a row per SR stage for its real input upsampled (`upsampling_baseline`).
    With truncation, a stage that hands over z_k has no clean cascaded output: its cascaded metrics and the
    next stage's cascaded consistency are left out. Returns the Evaluation on the main process, None on others.
    """
    modes = _check_modes(modes)
    _check_nets(feature_nets, classifier)
    _check_int("batch_size", batch_size, 1)
    rank, world = _rank_world(accelerator)
    sr_stages = [s for s in pipeline.stages if s.config.kind is StageKind.sr]
    low_resolutions = [s.config.low_resolution for s in sr_stages] if TEACHER_FORCED in modes else []
    data = load_eval_data(data_root, pipeline, num_samples=num_samples, batch_size=batch_size, rank=rank,
                          world_size=world, low_resolutions=low_resolutions)
    classes = sorted(set(data.labels.tolist()))
    plan = pipeline.validate(classes, settings, batch_size=batch_size, seed=seed)
    settings = {sp.name: sp.settings for sp in plan.stages}
    handed_z = {sp.name for sp in plan.stages if sp.stop_at_index is not None}  # truncated: outputs are z_k

    names = [s.name for s in pipeline.stages]
    keys = []  # (mode, stage, with consistency)
    if CASCADED in modes:
        keys += [(CASCADED, n, i > 0 and names[i - 1] not in handed_z) for i, n in enumerate(names)
                 if n not in handed_z]
    reuse_base = CASCADED in modes and names[0] not in handed_z  # same samples: teacher-forced base = cascaded
    if TEACHER_FORCED in modes:
        keys += [(TEACHER_FORCED, n, i > 0) for i, n in enumerate(names) if not (i == 0 and reuse_base)]

    collected = _Collected()
    total = len(data.samples) * len(names) * len(modes)
    with tqdm(total=total, desc=f"sampling (process {rank})", disable=not progress, unit="img") as bar:
        for chunk in _chunks(data.samples, batch_size):
            labels = data.labels[chunk.start : chunk.stop]
            local = slice(chunk.start - data.samples.start, chunk.stop - data.samples.start)
            if CASCADED in modes:
                chunk_plan = pipeline.validate(labels.tolist(), settings, batch_size=batch_size, seed=seed)
                out = pipeline.run(chunk_plan, start_index=chunk.start, progress=False)
                for i, name in enumerate(names):
                    if name not in handed_z:
                        prev = out[names[i - 1]] if i > 0 and names[i - 1] not in handed_z else None
                        collected.add_stage(CASCADED, name, out[name], prev)
                    bar.update(len(chunk))
            if TEACHER_FORCED in modes:
                for i, stage in enumerate(pipeline.stages):
                    if i == 0 and reuse_base:
                        bar.update(len(chunk))
                        continue
                    x_low = data.low_res[stage.config.low_resolution][local] if i > 0 else None
                    images = pipeline.sample_stage(stage.name, labels, x_low, settings[stage.name], seed=seed,
                                                   batch_size=batch_size, start_index=chunk.start)
                    collected.add_stage(TEACHER_FORCED, stage.name, images, x_low)
                    bar.update(len(chunk))
    gathered = _gather(accelerator, collected.tensors(_expected(pipeline, keys)))
    if not _is_main(accelerator):
        return None

    results: dict[str, dict[str, dict[str, Any]]] = {}
    low_res = {s.name: s.config.low_resolution for s in pipeline.stages}  # None for the base stage
    for mode, name, _ in sorted(keys, key=lambda k: (names.index(k[1]), MODES.index(k[0]))):
        results.setdefault(name, {})[mode] = stage_metrics(
            gathered[f"{mode}/{name}/images"], data.labels, data_root=data.root, feature_nets=feature_nets,
            classifier=classifier, psnr=gathered.get(f"{mode}/{name}/psnr"), low_resolution=low_res[name],
            seed=seed, batch_size=batch_size)
    if reuse_base and TEACHER_FORCED in modes:
        results[names[0]] = {TEACHER_FORCED: results[names[0]][CASCADED], CASCADED: results[names[0]][CASCADED]}
    if baselines:
        baseline_rows = upsampling_baseline(data, pipeline, feature_nets=feature_nets, classifier=classifier,
                                            seed=seed, batch_size=batch_size)
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
        "sampler": {k: v for k, v in plan.to_dict().items() if k not in ("classes", "num_per_class", "batch_size")},
        "checkpoints": pipeline.checkpoints(),
        **({"notes": notes} if notes else {}),
    }
    return Evaluation(results, meta)


# ------------------------------------------------------------------------------------------------------
# Sweeps over the guidance weight w and the augmentation level s


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
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = out / "sweep.json", out / "sweep.md", out / "sweep.png"
        document = {"meta": self.meta, "records": self.records, "best": self.best, "flags": self.flags()}
        paths[0].write_text(json.dumps(_finite_json(document), indent=2, allow_nan=False) + "\n")
        paths[1].write_text(self._markdown())
        plot_sweep(self.records, paths[2])
        return paths

    def _markdown(self) -> str:
        net = self.meta["ranked_by"]
        columns = ["stage", "w", "s", metric_label("fid", self.meta["mode"], net),
                   metric_label("kid_mean", self.meta["mode"], net), "consistency PSNR (dB)", "detail ratio",
                   "class acc", "best"]
        lines = ["# Sweep", ""] + [f"- {k}: {v}" for k, v in self.meta.items()] + [""]
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for r in self.records:
            psnr, detail = r.get("consistency_psnr"), r.get("detail_ratio")
            lines.append("| " + " | ".join([
                r["stage"], f"{r['w']:g}", "–" if r["aug_level"] is None else f"{r['aug_level']:g}",
                f"{r['fid']:.2f}", f"{r['kid_mean']:.5f} ± {r['kid_std']:.5f}",
                "–" if psnr is None else f"{psnr:.2f}", "–" if detail is None else f"{detail:.2f}",
                f"{100 * r['class_accuracy']:.1f}%",
                "★" if r is self.best.get(r["stage"]) else "",
            ]) + " |")
        lines += ["", f"Best settings for tools/sample_cascade.py: `{self.flags()}`", ""]
        return "\n".join(lines)


def _finite_json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def best_flags(best: Mapping[str, Mapping[str, Any]]) -> str:
    """`--w base32=3,sr64=1 --aug-level sr64=0.1` from best_setting's records."""
    w = ",".join(f"{stage}={r['w']:g}" for stage, r in best.items())
    s = ",".join(f"{stage}={r['aug_level']:g}" for stage, r in best.items() if r.get("aug_level") is not None)
    return f"--w {w}" + (f" --aug-level {s}" if s else "")


def sweep(pipeline: CascadePipeline, data_root: str | Path, *, feature_nets: Sequence[FeatureNet],
          classifier: FeatureNet, settings: Mapping[str, SamplingSettings] | None = None, w: Any = (0.0, 1.0, 3.0),
          aug_level: Any = None, mode: str = TEACHER_FORCED, rank_by: str | None = None,
          num_samples: int | None = None, seed: int = 0, batch_size: int = 64, accelerator: Any = None,
          progress: bool = False) -> Sweep | None:
    """FID (and KID, consistency, class accuracy) of every stage at every (w, s) of `sweep_settings`.

    settings: {stage: SamplingSettings} the grid varies (default: each stage's own; `CascadePipeline.settings`).

    teacher-forced: each SR stage takes the real low-resolution images (stages judged alone). cascaded: stages
    are swept in chain order and each SR stage takes the previous stage's samples at its best setting (the
    greedy post-training search). rank_by: the feature network whose FID picks the best (default: the first
    of feature_nets). Returns the Sweep on the main process, None on others.
    """
    if mode not in MODES:
        raise CascadeConfigError(f"mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    _check_nets(feature_nets, classifier)
    _check_int("batch_size", batch_size, 1)
    rank_by = feature_nets[0].name if rank_by is None else rank_by
    if rank_by not in [n.name for n in feature_nets]:
        raise CascadeConfigError(f"rank_by: no feature network {rank_by!r}; use one of "
                                 f"{', '.join(n.name for n in feature_nets)}")
    base_settings = {sp.name: sp.settings for sp in pipeline.validate([0], settings).stages}
    grid = sweep_settings(base_settings, w, aug_level)
    rank, world = _rank_world(accelerator)
    low_resolutions = ([s.config.low_resolution for s in pipeline.stages if s.config.kind is StageKind.sr]
                       if mode == TEACHER_FORCED else [])
    data = load_eval_data(data_root, pipeline, num_samples=num_samples, batch_size=batch_size, rank=rank,
                          world_size=world, low_resolutions=low_resolutions)
    classes = sorted(set(data.labels.tolist()))
    for name, tried in grid.items():  # every setting is checked against the chain before any sampling
        for setting in tried:
            pipeline.validate(classes, {name: setting}, batch_size=batch_size, seed=seed)

    records: list[dict[str, Any]] = []
    previous: torch.Tensor | None = None  # cascaded: this process's samples of the previous stage's best setting
    total = len(data.samples) * sum(len(v) for v in grid.values())
    with tqdm(total=total, desc=f"sweep (process {rank})", disable=not progress, unit="img") as bar:
        for i, stage in enumerate(pipeline.stages):
            best_fid, best_images = math.inf, None
            for setting in grid[stage.name]:
                if i == 0:
                    x_low = None
                elif mode == TEACHER_FORCED:
                    x_low = data.low_res[stage.config.low_resolution]
                else:
                    x_low = previous
                collected = _Collected()
                outputs = []
                for chunk in _chunks(data.samples, batch_size):
                    local = slice(chunk.start - data.samples.start, chunk.stop - data.samples.start)
                    images = pipeline.sample_stage(
                        stage.name, data.labels[chunk.start : chunk.stop], None if x_low is None else x_low[local],
                        setting, seed=seed, batch_size=batch_size, start_index=chunk.start)
                    collected.add_stage(mode, stage.name, images, None if x_low is None else x_low[local])
                    if mode == CASCADED:
                        outputs.append(images)
                    bar.update(len(chunk))
                keys = _expected(pipeline, [(mode, stage.name, i > 0)])
                gathered = _gather(accelerator, collected.tensors(keys))
                record = None
                if _is_main(accelerator):
                    metrics = stage_metrics(gathered[f"{mode}/{stage.name}/images"], data.labels,
                                            data_root=data.root, feature_nets=feature_nets, classifier=classifier,
                                            psnr=gathered.get(f"{mode}/{stage.name}/psnr"),
                                            low_resolution=stage.config.low_resolution, seed=seed,
                                            batch_size=batch_size)
                    ranked = metrics["features"][rank_by]
                    record = {"stage": stage.name, "w": setting.w, "aug_level": setting.aug_level, "mode": mode,
                              "feature_net": rank_by, "fid": ranked["fid"], "kid_mean": ranked["kid_mean"],
                              "kid_std": ranked["kid_std"], "class_accuracy": metrics["class_accuracy"],
                              "consistency_psnr": metrics.get("consistency_psnr"),
                              "detail_ratio": metrics.get("detail_ratio"), "features": metrics["features"]}
                    records.append(record)
                fid = _broadcast(accelerator, None if record is None else record["fid"])
                if mode == CASCADED and (best_images is None or (math.isfinite(fid) and not fid >= best_fid)):
                    best_fid = fid
                    best_images = torch.cat(outputs) if outputs else torch.empty(0)
            previous = best_images
    if not _is_main(accelerator):
        return None
    meta = {
        "data": str(data.root),
        "mode": mode,
        "ranked_by": rank_by,
        "num_samples": data.num_samples,
        "settings": {name: setting.to_dict() for name, setting in base_settings.items()},
        "seed": seed,
        "batch_size": batch_size,
        "num_processes": world,
        "checkpoints": {k: v["path"] for k, v in pipeline.checkpoints().items()},
    }
    return Sweep(records, best_setting(records), meta)

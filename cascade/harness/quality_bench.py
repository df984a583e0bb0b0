"""Quality benchmark: train named recipes of one stage for the same budget, sample, and score the samples.

For one stage and one shard folder, every recipe (a named set of stage and trainer overrides, `RECIPES`) is
trained with the project's own trainer (`cascade.training.trainer.StageTrainer`) for the same wall-clock budget
(`trainer.max_seconds`) or the same number of steps, from the same seed. Each trained stage is then sampled
with every sampler setting (`SamplerSetting`: a sampler of `cascade.diffusion.samplers.SAMPLERS`, its step count,
the guidance weight w and for SR stages the augmentation level s) and scored:

- base stages: N samples per class, judged by `cascade.evaluation.judge` (a classifier trained on the real train
  split only): class accuracy (label = the class a sample was generated for), Fréchet distance and KID
  against the real val split in the judge's features; beside the judge's accuracy on real val images (the
  ceiling) and real train images scored like samples (the floor of FD / KID at the same count);
- SR stages, teacher-forced on real low-resolution val inputs: consistency PSNR (the sample downsampled
  against its input), PSNR to the real image and the detail ratio (`cascade.evaluation.metrics`), beside bicubic
  upsampling of the same inputs.

Every row also gives network evaluations per image (forward passes counted, a guided step = 2), sampling
seconds and the training steps and seconds; every report names the machine (CPU, native bf16 or not),
the torch version and the load average (other processes share the CPU).

With a distillation budget (`BenchConfig.distill_minutes` or `distill_steps`), each recipe's trained stage (the
teacher) is then distilled into a few-step student (`cascade.training.distill.student_stage` with
`BenchConfig.distill`, by its ``method``: "step", guided step distillation to DDIM in 4 steps for a base stage and 2
for an SR stage by default; "consistency", guided consistency distillation, the consistency sampler in 1 to
``levels`` steps; "guidance", w as an input only, the teacher's sampler and steps) by the same trainer, on the same
data and seed, with the common trainer settings `BENCH_TRAINER`, into ``runs/<recipe>-distilled``; the student is
sampled with every `BenchConfig.student_samplers` setting (none given: its own default settings and, for a
consistency student, also 1 and 2 steps; `default_student_samplers`), one network evaluation per step (w is the
student's input), and scored like the teacher. Rows say which weights they sampled (``weights``: teacher or
student); a student's rows also give the distillation's steps and seconds.

The recipes are `cascade.harness.quality_recipes`'s, the sampler settings and the sampling
`cascade.harness.quality_samplers`'s; `tools/quality_bench.py` is the command line and
`cascade.harness.quality_report` writes the report.

One module of about 540 lines, one job: a benchmark run (`prepare` checks every input first, `run_benchmark` trains,
distils, samples and scores each recipe in turn); the pieces other code reuses are in their own modules.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio

from cascade import checkpoint
from cascade.atomic import write_atomic
from cascade.config import StageConfig, StageKind
from cascade.data.shard_folder import read_dataset_info
from cascade.device import resolve_mixed_precision
from cascade.evaluation.cas import CASSettings
from cascade.evaluation.judge import Judge, JudgeSettings, get_judge, real_floor, score
from cascade.evaluation.metrics import consistency_psnr, detail_ratio
from cascade.evaluation.reference_stats import shard_fingerprint
from cascade.harness.quality_recipes import (
    BENCH_TRAINER,
    DEFAULT_RECIPES,
    BenchError,
    apply_recipe,
    resolve_recipe,
)
from cascade.harness.quality_samplers import (
    SamplerSetting,
    default_student_samplers,
    parse_samplers,
    sample_images,
    stage_settings,
)
from cascade.imageops import float_to_uint8, image_grid, save_png, uint8_to_float, upsample
from cascade.training.trainer_config import (
    DISTILL_TRAINER,
    DataConfig,
    DistillSettings,
    RunConfig,
    TrainerConfig,
)

__all__ = ["BenchConfig", "BenchResult", "Prepared", "default_student_samplers", "distill_settings", "machine_info",
           "main_settings", "prepare", "run_benchmark", "sr_metrics"]

RUNS_DIR = "runs"
TRAIN_RECORD = "bench_train.json"  # what a finished training (or distillation) run recorded, read back by --reuse
DISTILLED_SUFFIX = "-distilled"  # a recipe's student: runs/<recipe>-distilled


# ----------------------------------------------------------------------------------------------- settings


@dataclass
class BenchConfig:
    """Everything one benchmark run does. Exactly one of `minutes` (wall-clock training budget per recipe)
    and `steps` is set; at most one of `distill_minutes` and `distill_steps` (the distillation budget per recipe;
    neither: no distillation), and `student_samplers` only with one of them (empty: each student's own settings,
    `default_student_samplers`)."""

    stage: str
    data: Path
    out: Path
    recipes: list[str]
    samplers: list[SamplerSetting]
    minutes: float | None = None
    steps: int | None = None
    per_class: int | None = None  # samples (SR: val inputs) per class; None: as many as the val split's smallest class
    size: str = "tiny"
    seed: int = 0
    num_workers: int | str = "auto"  # data.num_workers of every training run
    sample_batch: int = 100
    judge: JudgeSettings = field(default_factory=JudgeSettings)
    cas: CASSettings | None = None  # also the Classification Accuracy Score per row (base stages)
    overwrite: bool = False
    reuse: bool = False  # sample runs already trained in `out` (same recipe and budget) instead of retraining
    progress: bool = False
    distill_minutes: float | None = None  # distil each recipe's trained stage for this wall-clock budget
    distill_steps: int | None = None  # ... or for this many steps
    distill: DistillSettings = field(default_factory=DistillSettings)  # how (method, w_max, steps, teacher_steps, levels)
    student_samplers: list[SamplerSetting] = field(default_factory=list)  # the students' settings (empty: their own)
    default_w: float | None = None  # w of the students' own settings (--w; None: each student's own sampling.w)

    @property
    def distilling(self) -> bool:
        """Whether each recipe's trained stage is also distilled (a distillation budget is set)."""
        return self.distill_minutes is not None or self.distill_steps is not None


@dataclass
class Prepared:
    """A checked BenchConfig: the dataset record, each recipe's (stage config, trainer config) and, when
    distilling, the distillation's trainer config and each recipe's student settings."""

    config: BenchConfig
    info: dict[str, Any]
    runs: dict[str, tuple[Any, TrainerConfig]]
    distill_trainer: TrainerConfig | None = None
    student_samplers: dict[str, list[SamplerSetting]] = field(default_factory=dict)  # recipe → its student's settings


def prepare(cfg: BenchConfig, presets: Mapping[str, Callable[[str, int], StageConfig]]) -> Prepared:
    """Check every setting and input before anything runs; BenchError (one line) otherwise: also every sampler
    setting against the stage it samples (`stage_settings`; a student's: against the student that
    `cascade.training.distill.student_stage` makes of the recipe's stage, whose own settings are the student
    settings when `BenchConfig.student_samplers` is empty).

    ``presets``: stage name → ``(size, num_classes) -> StageConfig``, the stage definitions to benchmark (the
    command line passes those of `stages`)."""
    if cfg.stage not in presets:
        raise BenchError(f"--stage: unknown stage {cfg.stage!r}; valid stages: {', '.join(presets)}")
    if (cfg.minutes is None) == (cfg.steps is None):
        raise BenchError("give exactly one training budget: --minutes M or --steps N")
    if cfg.minutes is not None and not cfg.minutes > 0:
        raise BenchError(f"--minutes must be > 0, got {cfg.minutes}")
    if cfg.steps is not None and cfg.steps < 1:
        raise BenchError(f"--steps must be >= 1, got {cfg.steps}")
    if cfg.distill_minutes is not None and cfg.distill_steps is not None:
        raise BenchError("give at most one distillation budget: --distill MINUTES or --distill-steps N")
    if cfg.distill_minutes is not None and not cfg.distill_minutes > 0:
        raise BenchError(f"--distill must be > 0 minutes, got {cfg.distill_minutes}")
    if cfg.distill_steps is not None and cfg.distill_steps < 1:
        raise BenchError(f"--distill-steps must be >= 1, got {cfg.distill_steps}")
    if cfg.student_samplers and not cfg.distilling:
        raise BenchError("--student-samplers samples the distilled students: add --distill MINUTES or --distill-steps N")
    for what, value, low in (("--per-class", 1 if cfg.per_class is None else cfg.per_class, 1),
                             ("--sample-batch", cfg.sample_batch, 1),
                             ("--workers", 0 if cfg.num_workers == "auto" else cfg.num_workers, 0),
                             ("--seed", cfg.seed, 0)):
        if value < low:
            raise BenchError(f"{what} must be >= {low}, got {value}")
    if not cfg.recipes:
        raise BenchError("--recipes: name at least one recipe")
    try:
        info = read_dataset_info(cfg.data)
        for split in ("train", "val"):
            shard_fingerprint(cfg.data, split)
    except (FileNotFoundError, ValueError) as err:
        raise BenchError(f"--data: {err}; pass a shard folder written by tools/make_shards.py") from None
    if cfg.per_class is None:  # as many samples as real val images: FD's estimator bias alike on both sides
        val_counts = info.get("counts", {}).get("val", {}).get("per_class")
        if not val_counts:
            raise BenchError(f"--data: {cfg.data / 'dataset.json'} does not count the val images per class; rewrite "
                             "the shards with tools/make_shards.py or pass --per-class N")
        fewest = min(range(len(val_counts)), key=val_counts.__getitem__)
        if val_counts[fewest] < 1:
            raise BenchError(f"--data: class {info['class_names'][fewest]!r} has no val images; rewrite the shards "
                             "with a larger --val-fraction or pass --per-class N")
        cfg = dataclasses.replace(cfg, per_class=val_counts[fewest])
    try:
        stage_cfg = presets[cfg.stage](cfg.size, len(info["class_names"]))
    except ValueError as err:
        raise BenchError(str(err)) from None
    needed = [r for r in (stage_cfg.resolution, stage_cfg.low_resolution) if r is not None]
    if stage_cfg.kind is StageKind.classifier:
        raise BenchError(f"--stage: {cfg.stage} is a classifier; the benchmark trains base or SR stages")
    lacking = [r for r in needed if r not in info["resolutions"]]
    if lacking:
        raise BenchError(f"--data: {cfg.data} has resolutions {sorted(info['resolutions'])} but {cfg.stage} needs "
                         f"{needed}; rewrite the shards with --max-res {max(needed)}")
    budget = {"max_steps": cfg.steps or 10**9, "max_seconds": 60.0 * (cfg.minutes or 0.0)}
    trainer = TrainerConfig(**{**BENCH_TRAINER, **budget, "progress": cfg.progress})
    runs = {name: apply_recipe(name, stage_cfg, trainer) for name in cfg.recipes}
    if len(set(cfg.recipes)) != len(cfg.recipes):
        raise BenchError("--recipes: a recipe is named twice; name each once")
    student_samplers: dict[str, list[SamplerSetting]] = {}
    for name, (recipe_stage, _) in runs.items():
        for setting in cfg.samplers:
            stage_settings(recipe_stage, setting, "--samplers")
        if cfg.distilling:
            student = _student(name, recipe_stage, cfg.out / RUNS_DIR / _file_label(name), cfg.distill)
            student_samplers[name] = cfg.student_samplers or default_student_samplers(student, cfg.default_w)
            for setting in student_samplers[name]:
                try:
                    stage_settings(student, setting, "--student-samplers")
                except BenchError as err:
                    hint = " or raise --distill-w-max" if "trained for w in" in str(err) else ""
                    raise BenchError(f"{err}{hint}") from None
    labels = [_file_label(n) for n in cfg.recipes] + [_distilled_label(n) for n in cfg.recipes if cfg.distilling]
    grids = [_grid_name(name, setting.label) for name in cfg.recipes for setting in cfg.samplers]
    grids += [_grid_name(name + DISTILLED_SUFFIX, setting.label) for name, settings in student_samplers.items()
              for setting in settings]
    if len({g.lower() for g in grids}) != len(grids) or len({label.lower() for label in labels}) < len(labels):
        raise BenchError("--recipes / --samplers / --student-samplers: two of them share a file name once made safe "
                         "for one; rename one")
    if cfg.reuse and cfg.overwrite:
        raise BenchError("--reuse and --overwrite exclude each other: reuse keeps trained runs, overwrite replaces them")
    if not cfg.reuse and not cfg.overwrite:
        for label in labels:
            run_dir = cfg.out / RUNS_DIR / label
            if checkpoint.latest_checkpoint(run_dir) is not None:
                raise BenchError(f"{run_dir} already holds a trained run; pass --overwrite, --reuse or choose another "
                                 "--out")
    distill_trainer = None
    if cfg.distilling:
        distill_budget = {"max_steps": cfg.distill_steps or 10**9, "max_seconds": 60.0 * (cfg.distill_minutes or 0.0)}
        distill_trainer = TrainerConfig(**{**BENCH_TRAINER, **DISTILL_TRAINER, **distill_budget,
                                           "progress": cfg.progress})
    return Prepared(cfg, info, runs, distill_trainer, student_samplers)


def _student(name: str, teacher_cfg: StageConfig, teacher_path: str | Path, settings: DistillSettings) -> StageConfig:
    """The student stage of recipe ``name``'s trained stage; BenchError (one line) when it cannot be distilled."""
    from cascade.training.distill import student_stage

    try:
        return student_stage(teacher_cfg, teacher_path, settings)
    except ValueError as err:
        raise BenchError(f"recipe {name}: {_distill_option_names(str(err))}") from None


_DISTILL_OPTIONS = {"distill.method": "--distill-method", "distill.levels": "--distill-levels",
                    "distill.w_max": "--distill-w-max", "distill.teacher_steps": "--distill-teacher-steps"}


def _distill_option_names(message: str) -> str:
    """A `DistillSettings` / `student_stage` message with its settings named as the command line's options."""
    for key, option in _DISTILL_OPTIONS.items():
        message = message.replace(key, option)
    return message


def distill_settings(levels: int | None = None, w_max: float | None = None, method: str | None = None,
                     teacher_steps: int | None = None) -> DistillSettings:
    """`DistillSettings` with `DistillSettings()`'s defaults where None (method: step); BenchError (one line naming
    the option: --distill-method, --distill-levels, --distill-w-max or --distill-teacher-steps) for a value out of
    its range or a setting of another method (levels: consistency only; teacher_steps: step only)."""
    method = DistillSettings.method if method is None else method
    if levels is not None and method != "consistency":
        raise BenchError(f"--distill-levels applies to --distill-method consistency only, not {method}")
    if teacher_steps is not None and method != "step":
        raise BenchError(f"--distill-teacher-steps applies to --distill-method step only, not {method}")
    if teacher_steps is not None and teacher_steps < 0:
        raise BenchError(f"--distill-teacher-steps must be a multiple of the student's steps larger than them (0: four times "
                         f"them), got {teacher_steps}")
    changes = {k: v for k, v in (("levels", levels), ("w_max", w_max), ("teacher_steps", teacher_steps))
               if v is not None}
    try:
        return DistillSettings(method=method, **changes)
    except ValueError as err:
        raise BenchError(_distill_option_names(str(err))) from None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch version and threads, whether the CPU computes bf16 natively (what the
    trainer's mixed_precision=auto picks), the GPU if any, and the load average now."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cpu_bf16_native": resolve_mixed_precision("auto", torch.device("cpu")) == "bf16",
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    if hasattr(os, "getloadavg"):
        info["load_average_1min_at_start"] = round(os.getloadavg()[0], 2)
    return info


# ----------------------------------------------------------------------------------------------- running


@dataclass
class BenchResult:
    """rows: one per (recipe, sampler) plus the reference rows; meta: settings, machine, judge."""

    rows: list[dict[str, Any]]
    meta: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.meta["stage_kind"]


def _train(name: str, stage_cfg: Any, trainer: TrainerConfig, cfg: BenchConfig, log) -> tuple[dict[str, Any], bool]:
    """(what the training recorded, whether it is a run reused from an earlier benchmark)."""

    run_dir = cfg.out / RUNS_DIR / _file_label(name)
    record = run_dir / TRAIN_RECORD
    budget = {"minutes": cfg.minutes, "steps": cfg.steps}
    if cfg.reuse and record.exists():
        trained = json.loads(record.read_text())
        if trained.get("budget") != budget:
            raise BenchError(f"--reuse: {run_dir} was trained with budget {trained.get('budget')}, this run asks "
                             f"{budget}; pass the same --minutes/--steps or --overwrite")
        log(f"reusing {cfg.stage} recipe {name}: {trained['train_steps']} steps in {trained['train_seconds']:.0f} s")
        return {k: v for k, v in trained.items() if k != "budget"}, True
    budget_words = f"{cfg.minutes:g} minutes" if cfg.minutes is not None else f"{cfg.steps} steps"
    final, steps, seconds, precision = _run_stage(stage_cfg, run_dir, trainer, cfg, name, "",
                                                  f"training {cfg.stage} recipe {name} for {budget_words}", log)
    trained = {"checkpoint": str(final), "train_steps": steps, "train_seconds": seconds,
               "mixed_precision": precision}
    write_atomic(record, json.dumps({**trained, "budget": budget}, indent=1))
    return trained, False


def _run_stage(stage_cfg: StageConfig, run_dir: Path, trainer: TrainerConfig, cfg: BenchConfig, name: str, what: str,
               message: str, log) -> tuple[Path, int, float, str]:
    """Train (or distil) ``stage_cfg`` into a fresh ``run_dir`` (emptied first with --overwrite): (final checkpoint,
    steps, seconds, mixed precision). BenchError (one line naming recipe ``name`` and ``what``) when the trainer
    cannot be built."""
    from cascade.training.trainer import StageTrainer

    if cfg.overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run = RunConfig(run_dir=str(run_dir), data=DataConfig(root=str(cfg.data), num_workers=cfg.num_workers),
                    trainer=trainer, resume="never", seed=cfg.seed)
    try:
        trainer_obj = StageTrainer(stage_cfg, run, extra_config={"size": cfg.size, "quality_bench_recipe": name})
    except (ValueError, FileNotFoundError) as err:
        raise BenchError(f"recipe {name}{what}: {err}") from None
    log(message)
    started = time.perf_counter()
    final = trainer_obj.run()
    return final, trainer_obj.step, time.perf_counter() - started, trainer_obj.mixed_precision


def _distill(name: str, teacher_cfg: StageConfig, trained: dict[str, Any], teacher_reused: bool, cfg: BenchConfig,
             trainer: TrainerConfig, log) -> dict[str, Any]:
    """Distil recipe ``name``'s trained stage (its final checkpoint ``trained["checkpoint"]``) into
    runs/<recipe>-distilled: {"distill_checkpoint", "distill_steps", "distill_seconds"}. With --reuse, a finished
    distillation of the same (reused) teacher with the same budget and settings is taken as it is."""

    run_dir = cfg.out / RUNS_DIR / _distilled_label(name)
    record = run_dir / TRAIN_RECORD
    wanted = {"budget": {"minutes": cfg.distill_minutes, "steps": cfg.distill_steps},
              "distill": dataclasses.asdict(cfg.distill), "teacher": trained["checkpoint"]}
    if cfg.reuse and record.exists():
        done = json.loads(record.read_text())
        if not teacher_reused:
            raise BenchError(f"--reuse: {run_dir} holds a distillation of an earlier {name} run, trained again now; "
                             "pass --overwrite or choose another --out")
        if any(done.get(k) != v for k, v in wanted.items()):
            raise BenchError(f"--reuse: {run_dir} was distilled with budget {done.get('budget')} and "
                             f"{done.get('distill')}, this run asks {wanted['budget']} and {wanted['distill']}; pass "
                             "the same --distill/--distill-steps and --distill-* settings or --overwrite")
        log(f"reusing the distillation of {cfg.stage} recipe {name}: {done['distill_steps']} steps in "
            f"{done['distill_seconds']:.0f} s")
        return {k: done[k] for k in ("distill_checkpoint", "distill_steps", "distill_seconds")}
    student = _student(name, teacher_cfg, trained["checkpoint"], cfg.distill)
    budget_words = f"{cfg.distill_minutes:g} minutes" if cfg.distill_minutes is not None else f"{cfg.distill_steps} steps"
    final, steps, seconds, _ = _run_stage(student, run_dir, trainer, cfg, name, ", distillation",
                                          f"distilling {cfg.stage} recipe {name} for {budget_words}", log)
    done = {"distill_checkpoint": str(final), "distill_steps": steps, "distill_seconds": seconds}
    write_atomic(record, json.dumps({**done, **wanted}, indent=1))
    return done


def _sr_inputs(root: Path, stage_cfg: Any, per_class: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to per_class val images per class: (labels, real images at the stage's size, their low-res inputs)."""
    from cascade.data.loader import iterate_split

    res, low = stage_cfg.resolution, stage_cfg.low_resolution
    taken: dict[int, int] = {}
    labels, high, lows = [], [], []
    for sample in iterate_split(root, "val", [low, res]):
        c = int(sample["y"])
        if taken.get(c, 0) < per_class:
            taken[c] = taken.get(c, 0) + 1
            labels.append(c)
            high.append(sample["images"][res])
            lows.append(sample["images"][low])
    if not labels:
        raise BenchError(f"--data: {root} has no readable val images")
    order = sorted(range(len(labels)), key=lambda i: labels[i])  # grouped by class, stable
    return (torch.tensor([labels[i] for i in order]), torch.stack([high[i] for i in order]),
            torch.stack([lows[i] for i in order]))


def sr_metrics(images: torch.Tensor, real: torch.Tensor, x_low: torch.Tensor) -> dict[str, float]:
    """Teacher-forced SR quality of images (quantised to uint8 first): consistency PSNR with the input (dB),
    PSNR to the real image (dB), detail ratio against the real images."""
    images = uint8_to_float(float_to_uint8(images))
    to_real = peak_signal_noise_ratio((images + 1) / 2, (real + 1) / 2, data_range=1.0, reduction="none",
                                      dim=(1, 2, 3))
    return {"consistency_psnr": consistency_psnr(images, x_low)[1], "psnr": float(to_real.mean()),
            "detail_ratio": detail_ratio(images, real, x_low.shape[-1])}


def _grid_base(images: torch.Tensor, labels: torch.Tensor, per_row: int):
    rows = [images[labels == c][:per_row] for c in labels.unique().tolist()]
    return image_grid(torch.cat(rows), ncol=per_row)


def _grid_sr(images: torch.Tensor, labels: torch.Tensor, real: torch.Tensor, x_low: torch.Tensor, per_row: int):
    """One row per class: (bicubic input, sample, real) for its first per_row images."""
    up = upsample(x_low, images.shape[-1]).clamp(-1, 1)
    tiles = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()[:per_row]
        row = [t for i in idx.tolist() for t in (up[i], images[i], real[i])]
        row += [torch.ones_like(images[0])] * (3 * per_row - len(row))
        tiles += row
    return image_grid(torch.stack(tiles), ncol=3 * per_row)


def _file_label(text: str) -> str:
    """``text`` for a file name: runs of other characters than letters, digits and `_.=-` become `_`."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text)


def _distilled_label(recipe: str) -> str:
    """The run folder name of recipe ``recipe``'s student."""
    return _file_label(recipe + DISTILLED_SUFFIX)


def _grid_name(recipe: str, sampler_label: str) -> str:
    """The grid's file name of (recipe, sampler setting); `prepare` checks that they are distinct."""
    return f"grid-{_file_label(recipe)}-{_file_label(sampler_label)}.png"


def run_benchmark(prepared: Prepared, log: Callable[[str], None] = print) -> BenchResult:
    """Train every recipe, sample every setting, score; when distilling, also distil each trained recipe and sample
    and score its student with every student setting. Writes the runs and sample grids under cfg.out."""
    cfg = prepared.config
    cfg.out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    first_stage = next(iter(prepared.runs.values()))[0]
    kind, num_classes = first_stage.kind, first_stage.num_classes
    rows: list[dict[str, Any]] = []
    judge: Judge | None = None
    if kind is StageKind.base:
        judge = get_judge(cfg.data, first_stage.resolution, cfg.judge, log=log)
        log(f"judge {judge.features.name}: {100 * judge.val_accuracy:.1f}% on real val images"
            + (" (cached)" if judge.from_cache else f" (trained in {judge.train_seconds:.0f} s)"))
        labels = torch.arange(num_classes).repeat_interleave(cfg.per_class)
        floor = real_floor(judge, len(labels), seed=cfg.seed)
        rows.append({"recipe": "real images", "sampler": "–", "class_accuracy": judge.val_accuracy,
                     **{k: floor[k] for k in ("fd", "kid_mean", "kid_std", "precision", "recall")}, "reference": True})
        real = x_low = None
    else:
        labels, real, x_low = _sr_inputs(cfg.data, first_stage, cfg.per_class)
        bicubic = upsample(x_low, first_stage.resolution).clamp(-1, 1)
        rows.append({"recipe": "bicubic", "sampler": "–", "nfe_per_image": 0.0, **sr_metrics(bicubic, real, x_low),
                     "reference": True})

    def sample_rows(name: str, weights: str, checkpoint_path: str, settings: list[SamplerSetting],
                    recorded: dict[str, Any]) -> None:
        """One row per setting: sample the weights at ``checkpoint_path``, score, save the grid."""
        stage_cfg, model, diffusion = checkpoint.load_stage(checkpoint_path, device=device)
        who = name if weights == "teacher" else f"{name} (student)"
        for setting in settings:
            log(f"sampling {who} with {setting.label} ({len(labels)} images)")
            started = time.perf_counter()
            images, nfe = sample_images(model, diffusion, stage_cfg, setting, labels, x_low, seed=cfg.seed,
                                        batch_size=cfg.sample_batch, device=device)
            seconds = time.perf_counter() - started
            grid_path = cfg.out / _grid_name(name if weights == "teacher" else name + DISTILLED_SUFFIX, setting.label)
            if kind is StageKind.base:
                metrics = score(judge, images, labels, seed=cfg.seed, cas=cfg.cas)
                save_png(_grid_base(images, labels, min(cfg.per_class, 10)), grid_path)
            else:
                metrics = sr_metrics(images, real, x_low)
                save_png(_grid_sr(images, labels, real, x_low, min(cfg.per_class, 3)), grid_path)
            rows.append({"recipe": name, "weights": weights, "sampler": setting.label, "sampler_name": setting.sampler,
                         "steps": setting.steps, "w": stage_cfg.sampling.w if setting.w is None else setting.w,
                         "eta": setting.eta, "guidance_interval": (stage_cfg.sampling.guidance_interval
                                                                   if setting.guidance_interval is None
                                                                   else list(setting.guidance_interval)),
                         "aug_level": (stage_cfg.sampling.aug_level if setting.aug_level is None
                                       else setting.aug_level) if kind is StageKind.sr else None,
                         **recorded, "nfe_per_image": nfe, "sample_seconds": seconds,
                         **{k: v for k, v in metrics.items() if k not in ("num_real", "num_fake")},
                         "grid": grid_path.name})

    for name, (stage_cfg, trainer) in prepared.runs.items():
        trained, reused = _train(name, stage_cfg, trainer, cfg, log)
        sample_rows(name, "teacher", trained["checkpoint"], cfg.samplers, trained)
        if cfg.distilling:
            distilled = _distill(name, stage_cfg, trained, reused, cfg, prepared.distill_trainer, log)
            sample_rows(name, "student", distilled["distill_checkpoint"], prepared.student_samplers[name],
                        {**trained, **distilled})
    machine["torch_threads_at_end"] = torch.get_num_threads()
    if hasattr(os, "getloadavg"):
        machine["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    meta = {"stage": cfg.stage, "stage_kind": kind, "size": cfg.size, "data": str(cfg.data),
            "dataset": {"class_names": prepared.info["class_names"], "counts": {
                s: prepared.info["counts"][s]["total"] for s in ("train", "val")}},
            "budget": {"minutes": cfg.minutes} if cfg.minutes is not None else {"steps": cfg.steps},
            "distill": None if not cfg.distilling else {
                "budget": ({"minutes": cfg.distill_minutes} if cfg.distill_minutes is not None
                           else {"steps": cfg.distill_steps}),
                **dataclasses.asdict(cfg.distill), "student_samplers": list(dict.fromkeys(
                    s.label for settings in prepared.student_samplers.values() for s in settings))},
            "samples": {"num_images": len(labels), "per_class": cfg.per_class, "seed": cfg.seed},
            "trainer_common": {k: v for k, v in BENCH_TRAINER.items() if k not in ("keep_last", "log_every")},
            "recipes": {n: {"description": r.description, "stage": dict(r.stage), "trainer": dict(r.trainer)}
                        for n, r in ((n, resolve_recipe(n)) for n in cfg.recipes)},
            "machine": machine, "device": str(device),
            "judge": None if judge is None else judge.describe(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    return BenchResult(rows, meta)


def main_settings(args_recipes: str | None, samplers: str, default_w: float) -> tuple[list[str], list[SamplerSetting]]:
    """(recipe names, sampler settings) from the command line's texts (None: every recipe in RECIPES)."""
    names = list(DEFAULT_RECIPES) if args_recipes is None else [n.strip() for n in args_recipes.split(",")]
    for n in names:
        resolve_recipe(n)
    return names, parse_samplers(samplers, default_w)


"""The end-to-end demo: shards from built-in photographs → train every stage (tiny) → sample → evaluate → report.

With a distillation budget (`DemoBudget.distill_seconds` / ``distill_steps``; `DEFAULT_DISTILLED`,
`QUICK_DISTILLED`) the demo also distils the stages it names into few-step students right after training them
(`distill_demo_stage`, `cascade.training.distill`), scores teacher and student of each on the same teacher-forced
samples (`compare_students`) and samples the cascade with whichever scored better on the stage's headline
metric (base: `HEADLINE_METRIC`, KID; SR: the detail ratio at `SR_MIN_CONSISTENCY_DB` or more).

One module of about 500 lines, one job: the demo's run from shards to report, each step (shards, training,
distillation, the teacher-or-student choice, sampling, evaluation) a function `run_demo` calls in order and the
resume rules of each beside it; the report's text lives in `cascade.harness.demo_report`.

Every step is resumable: shards are reused when their settings match, a finished stage (or student) is not
retrained (its run resumes at max_steps and returns at once), a killed stage resumes from its last
checkpoint. `tools/demo.py` is the command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cascade.atomic import write_atomic
from cascade.config import StageConfig, StageKind
from cascade.data.shard_folder import read_dataset_info
from cascade.evaluation.pages import write_report_pages
from cascade.evaluation.plots import plot_training_curves
from cascade.harness.demo_report import budget_words, distill_words, report_blocks
from cascade.imageops import image_grid, save_png
from cascade.pipeline.cascade_pipeline import DEFAULT_CHAIN, CascadePipeline
from cascade.pipeline.plan import SamplingPlan
from cascade.training.trainer_config import (
    DISTILL_TRAINER,
    DataConfig,
    DistillSettings,
    RunConfig,
    TrainerConfig,
)

TRAIN_ORDER = ("classifier32", "base32", "sr64", "sr128", "sr256")
CHAIN = DEFAULT_CHAIN  # the demo trains and samples every stage of the default chain
DONE_FILE = "demo_done.json"  # in a stage's run folder: the budget it finished training with
STUDENT_SUFFIX = "-distilled"  # a student's run folder: runs/<stage>-distilled (as tools/distill_stage.py's default)
DISTILL_MAX_STEPS = 100_000  # a student's step cap where its budget gives only seconds
DISTILL = DistillSettings()  # how the demo distils: the default method, w in [0, 2], 4 sampling steps (base) / 2 (SR)
# The headline metric that picks teacher or student of the base stage: teacher-forced KID (unbiased, so two runs at
# the same small n compare) in the whole-image features (content, colour, class); lower wins. An SR stage's: the
# detail ratio at a consistency of at least SR_MIN_CONSISTENCY_DB (patch KID could not tell a blurred student from
# its teacher: docs/results/2026-12-06.md); higher wins. A tie goes to the student (fewer network evaluations).
HEADLINE_METRIC = "kid_mean"
SR_MIN_CONSISTENCY_DB = 30.0  # an SR student or teacher below this consistency is not chosen (the SR target's floor)


@dataclass(frozen=True)
class DemoBudget:
    """How much of everything the demo does; `DEFAULT` fits under 20 minutes on 2 CPU cores, `QUICK` ~2."""

    images_per_class: int
    train_steps: dict[str, int]
    batch_size: dict[str, int]
    lr: float
    warmup_steps: int
    sample_steps: dict[str, int] | None  # respaced sampling steps per stage; None: each stage's own settings
    num_per_class: int  # samples per class through the whole cascade
    eval_samples: int  # generated images per stage for FID/KID
    ckpt_every: int
    ema_decay: float = 0.999
    val_fraction: float = 0.1
    cas_per_class: int = 1  # generated images per class for the Classification Accuracy Score
    cas_steps: int = 60  # training steps of each CAS classifier
    # wall-clock training seconds per stage (trainer.max_seconds), so the demo takes the same minutes on every CPU
    # and a faster one trains more steps; train_steps then only caps them. None: train_steps alone.
    train_seconds: dict[str, float] | None = None
    # Distillation of the chain stages named in either dict, right after each is trained (`distill_demo_stage`):
    # distill_seconds by the clock (`with_distillation` carves them out of the stage's train_seconds, so the demo
    # trains for the same minutes in all), distill_steps as step caps (alone: a step-bounded budget such as QUICK's;
    # with seconds only, `DISTILL_MAX_STEPS` caps). Both None: no distillation. distill_lr: the students' AdamW rate
    # (they start from their teachers' weights; the other trainer settings distillation changes: `DISTILL_TRAINER`).
    distill_seconds: dict[str, float] | None = None
    distill_steps: dict[str, int] | None = None
    distill_lr: float = DISTILL_TRAINER["lr"]

    def __post_init__(self) -> None:
        for key in ("distill_seconds", "distill_steps"):
            values = getattr(self, key) or {}
            for name, value in values.items():
                if name not in CHAIN:
                    raise ValueError(f"{key}: {name} is not a generator of the chain ({', '.join(CHAIN)}); "
                                     "only those can be distilled")
                if not value > 0:
                    raise ValueError(f"{key}[{name}] must be > 0, got {value!r}")

    @property
    def distilled(self) -> tuple[str, ...]:
        """The stages this budget distils, in chain order."""
        named = set(self.distill_seconds or {}) | set(self.distill_steps or {})
        return tuple(n for n in CHAIN if n in named)

    def distill_budget(self, name: str) -> tuple[int, float | None]:
        """(step cap, seconds or None) of stage ``name``'s distillation."""
        seconds = (self.distill_seconds or {}).get(name)
        return int((self.distill_steps or {}).get(name, DISTILL_MAX_STEPS)), seconds

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def with_distillation(budget: DemoBudget, *, seconds: dict[str, float] | None = None,
                      steps: dict[str, int] | None = None) -> DemoBudget:
    """``budget`` that also distils the stages named in ``seconds`` / ``steps`` (see `DemoBudget`). Each stage's
    distillation seconds are taken from its train_seconds, so the training minutes in all stay the same.
    ValueError when a stage would keep no training seconds."""
    train_seconds = dict(budget.train_seconds) if budget.train_seconds is not None else None
    if seconds and train_seconds is not None:
        for name, extra in seconds.items():
            left = train_seconds.get(name, 0) - extra
            if name in train_seconds and left <= 0:
                raise ValueError(f"distill_seconds[{name}] = {extra:g} leaves {name} no training seconds (it has "
                                 f"{train_seconds[name]:g})")
            if name in train_seconds:
                train_seconds[name] = left
    return dataclasses.replace(budget, train_seconds=train_seconds, distill_seconds=seconds, distill_steps=steps)


# Sampling: each stage's own `SamplingSettings` (the tiny presets: base32 DDIM 25 steps at w = 1, sr64
# / sr128 / sr256 ancestral 25 steps, SR inputs at s = 0.03); the quick budget only takes fewer steps.
# Training: 11.2 minutes in all, by the clock (the steps they bought: docs/results/2026-12-02.md).
DEFAULT = DemoBudget(
    images_per_class=60,
    train_seconds={"classifier32": 40, "base32": 330, "sr64": 165, "sr128": 80, "sr256": 55},
    train_steps={"classifier32": 1000, "base32": 5000, "sr64": 3000, "sr128": 2000, "sr256": 1000},
    batch_size={"classifier32": 32, "base32": 32, "sr64": 16, "sr128": 8, "sr256": 4},
    lr=2e-3,
    warmup_steps=30,
    sample_steps=None,
    num_per_class=2,
    eval_samples=20,
    ckpt_every=100,
    cas_per_class=2,
    cas_steps=60,
)

QUICK = DemoBudget(
    images_per_class=12,
    train_steps={"classifier32": 10, "base32": 20, "sr64": 8, "sr128": 5, "sr256": 4},
    batch_size={"classifier32": 16, "base32": 16, "sr64": 8, "sr128": 4, "sr256": 2},
    lr=2e-3,
    warmup_steps=5,
    sample_steps={"base32": 8, "sr64": 4, "sr128": 3, "sr256": 3},
    num_per_class=1,
    eval_samples=10,
    ckpt_every=10,
    cas_per_class=1,
    cas_steps=10,
)

# With distillation: base32 and sr64 each give 60 s of their training to a distilled student (`DISTILL`: 4 and 2
# sampling steps), base32 270 s + 60 s and sr64 105 s + 60 s, the other stages as in DEFAULT: 11.2 minutes in all.
DEFAULT_DISTILLED = with_distillation(DEFAULT, seconds={"base32": 60, "sr64": 60},
                                      steps={"base32": 5000, "sr64": 3000})
QUICK_DISTILLED = with_distillation(QUICK, steps={"base32": 4, "sr64": 2})


def demo_budget(*, quick: bool, distill: bool) -> DemoBudget:
    """The budget `tools/demo.py` runs: DEFAULT or QUICK, with distillation (`DEFAULT_DISTILLED`, `QUICK_DISTILLED`)
    or without (its ``DISTILL_BY_DEFAULT`` says which without --distill / --no-distill)."""
    if quick:
        return QUICK_DISTILLED if distill else QUICK
    return DEFAULT_DISTILLED if distill else DEFAULT


@dataclass
class DemoResult:
    out_dir: Path
    report_html: Path
    report_md: Path
    checkpoints: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    students: dict[str, Path] = field(default_factory=dict)  # distilled stages: the student's final checkpoint
    distillation: list[dict[str, Any]] = field(default_factory=list)  # `compare_students`' rows
    weights: dict[str, str] = field(default_factory=dict)  # per chain stage: "teacher" or "student", as sampled


def _log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def make_demo_shards(data_dir: Path, budget: DemoBudget, seed: int, progress: bool) -> dict[str, Any]:
    """Shards of the built-in photographs; reused when a previous run made them with the same settings."""
    from cascade.data.shards import write_shards
    from cascade.data.sources import get_source

    wanted = {"images_per_class": budget.images_per_class, "val_fraction": budget.val_fraction, "seed": seed}
    marker = data_dir / "demo_settings.json"
    if marker.is_file() and json.loads(marker.read_text()) == wanted and (data_dir / "dataset.json").is_file():
        _log(f"reusing shards in {data_dir}")
        return read_dataset_info(data_dir)
    source = get_source("photos", seed=seed, images_per_class=budget.images_per_class)
    _log(f"writing shards of {len(source.class_names)} photographs × {budget.images_per_class} crops to {data_dir}")
    info = write_shards(source, data_dir, shard_size=64, val_fraction=budget.val_fraction, seed=seed,
                        overwrite=True, progress=progress)
    marker.write_text(json.dumps(wanted))
    return info


def train_demo_stage(stage: StageConfig, data_dir: Path, runs_dir: Path, budget: DemoBudget, seed: int,
                     progress: bool) -> Path:
    """Train (or resume, or return the finished checkpoint of) one stage with the budget's steps, seconds and
    batch size for it. A stage finished with this budget (`DONE_FILE` in its run folder) is returned as it is; an
    interrupted one resumes from its last checkpoint (with the whole time budget again, when it has one)."""
    from cascade import checkpoint
    from cascade.training.trainer import train_stage

    name = stage.name
    run_dir = runs_dir / name
    seconds = (budget.train_seconds or {}).get(name)
    done = {"train_steps": budget.train_steps[name], "train_seconds": seconds, "batch_size": budget.batch_size[name]}
    marker = run_dir / DONE_FILE
    if _read_marker(marker) == done:
        final = checkpoint.latest_checkpoint(run_dir)
        if final is not None:
            return final
    marker.unlink(missing_ok=True)  # training again: no older marker may call an interrupted run finished
    trainer = TrainerConfig(
        max_steps=budget.train_steps[name], max_seconds=seconds or 0.0, batch_size=budget.batch_size[name], lr=budget.lr,
        warmup_steps=budget.warmup_steps, ckpt_every=budget.ckpt_every, keep_last=1, log_every=10,
        ema_decay=budget.ema_decay, sample_every=0, progress=progress,
        eval_every=0, ema_sigma_rels=(), run_report=False,  # the demo scores and reports its stages itself
    )
    run = RunConfig(run_dir=str(run_dir), data=DataConfig(root=str(data_dir)), trainer=trainer,
                    resume="auto", seed=seed)
    final = train_stage(stage, run, extra_config={"size": "tiny", "stage_overrides": {}, "demo": budget.to_dict()})
    write_atomic(marker, json.dumps(done))
    return final


def distill_demo_stage(name: str, teacher: Path, data_dir: Path, runs_dir: Path, budget: DemoBudget, seed: int,
                       progress: bool) -> Path:
    """Distil (or resume, or return the finished student of) stage ``name`` from its trained checkpoint ``teacher``
    into ``runs_dir/<name>-distilled`` with the budget's steps, seconds and batch size for it and `DISTILL`'s
    method. Resumes as `train_demo_stage` does (`DONE_FILE`: the budget and the teacher it finished with); a
    student of another teacher (its stage was trained again, or the demo folder moved) is removed and
    distilled afresh from this one."""
    from cascade import checkpoint
    from cascade.training.distill import student_stage
    from cascade.training.trainer import train_stage

    run_dir = runs_dir / f"{name}{STUDENT_SUFFIX}"
    student = student_stage(checkpoint.load_stage_config(teacher), teacher, DISTILL)
    steps, seconds = budget.distill_budget(name)
    done = {"distill_steps": steps, "distill_seconds": seconds, "batch_size": budget.batch_size[name],
            "lr": budget.distill_lr, "teacher": str(teacher), "distill": dataclasses.asdict(DISTILL)}
    marker = run_dir / DONE_FILE
    if _read_marker(marker) == done:
        final = checkpoint.latest_checkpoint(run_dir)
        if final is not None:
            return final
    marker.unlink(missing_ok=True)
    if _holds_another_student(run_dir, student):
        shutil.rmtree(run_dir)
    trainer = TrainerConfig(
        max_steps=steps, max_seconds=seconds or 0.0, batch_size=budget.batch_size[name], lr=budget.distill_lr,
        warmup_steps=DISTILL_TRAINER["warmup_steps"], ckpt_every=budget.ckpt_every, keep_last=1, log_every=10,
        ema_decay=budget.ema_decay, sample_every=0, progress=progress,
        eval_every=0, ema_sigma_rels=(), run_report=False,
    )
    run = RunConfig(run_dir=str(run_dir), data=DataConfig(root=str(data_dir)), trainer=trainer,
                    resume="auto", seed=seed)
    final = train_stage(student, run, extra_config={"size": "tiny", "stage_overrides": {}, "demo": budget.to_dict(),
                                                    "distill": dataclasses.asdict(DISTILL)})
    write_atomic(marker, json.dumps(done))
    return final


def _holds_another_student(run_dir: Path, student: StageConfig) -> bool:
    """Whether ``run_dir``'s newest readable checkpoint is of another stage configuration (another teacher)."""
    from cascade import checkpoint

    found = checkpoint.latest_checkpoint(run_dir)
    if found is None:
        return False
    try:
        return checkpoint.load_stage_config(found) != student
    except (OSError, ValueError):  # damaged: resume=auto skips it for an older one
        return False


class _TimedPipeline(CascadePipeline):
    """A pipeline that adds up the seconds each stage spends sampling alone (`run_stage`: teacher forcing)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.seconds: dict[str, float] = {}

    def run_stage(self, plan: SamplingPlan, name: str, x_low: torch.Tensor | None = None, *, start_index: int = 0,
                  progress: bool = False) -> torch.Tensor:
        started = time.perf_counter()
        try:
            return super().run_stage(plan, name, x_low, start_index=start_index, progress=progress)
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


def _sample_steps(budget: DemoBudget, chain: Sequence[str], students: Collection[str]) -> dict[str, int] | None:
    """The budget's sampling steps for the stages of ``chain`` sampled by their teachers; a student keeps its own
    steps."""
    if budget.sample_steps is None:
        return None
    return {n: s for n, s in budget.sample_steps.items() if n in chain and n not in students}


def headline_net(stage: StageConfig, nets: list) -> str:
    """The feature network of a stage's headline metric: whole-image features (``nets[0]``) for the base stage, 32²
    patch features (``nets[1]``) for an SR stage."""

    return (nets[0] if stage.kind is StageKind.base else nets[1]).name


def compare_students(runs_dir: Path, students: dict[str, Path], data_dir: Path, budget: DemoBudget, *, nets: list,
                     classifier: Any, seed: int, progress: bool) -> list[dict[str, Any]]:
    """Score the teacher and the student of every distilled stage on the same teacher-forced samples (the stage
    alone on the real low-resolution val inputs: `evaluate` with mode teacher-forced, `budget.eval_samples` images,
    one seed) and pick, per stage, the better by the stage's headline: the base stage's lower `HEADLINE_METRIC` (KID)
    in `headline_net`'s features; an SR stage's higher detail ratio among the sides whose consistency is at least
    `SR_MIN_CONSISTENCY_DB` (the measure of the SR distillation target; patch KID hardly tells a blurred SR output
    from a sharp one). A tie: the student. Both are evaluated on the chain up to the last distilled stage, teacher-sampled stages in both
    alike. Returns one row per distilled stage: {"stage", "method", "metric", "used", "teacher", "student"} with
    each side's checkpoint, sampler, NFE/image, metric ± std, FID and seconds spent sampling."""
    from cascade.evaluation.evaluate import TEACHER_FORCED, evaluate
    from cascade.evaluation.settings import MetricSettings
    from cascade.pipeline.plan import network_evaluations

    prefix = CHAIN[: max(CHAIN.index(n) for n in students) + 1]
    sides = {"teacher": {}, "student": students}
    scored: dict[str, dict[str, dict[str, Any]]] = {}
    net_of: dict[str, str] = {}
    for side, overrides in sides.items():
        pipeline = _TimedPipeline.from_runs(runs_dir, prefix, checkpoints=overrides)
        settings = pipeline.settings(steps=_sample_steps(budget, prefix, set(overrides)))
        evaluation = evaluate(pipeline, data_dir, feature_nets=nets, classifier=classifier,
                              num_samples=budget.eval_samples, seed=seed, batch_size=max(budget.batch_size.values()),
                              progress=progress, settings=settings, modes=(TEACHER_FORCED,), metrics=MetricSettings())
        for i, stage in enumerate(pipeline.stages):
            if stage.name not in students:
                continue
            sp = pipeline.plan_alone(stage.name, [0], settings[stage.name]).stages[i]
            net_of[stage.name] = headline_net(stage.config, nets)
            results = evaluation.results[stage.name][TEACHER_FORCED]
            features = results["features"][net_of[stage.name]]
            s = sp.settings
            if stage.config.kind is StageKind.sr:  # higher detail at a consistency above the floor
                metric, std = float(results["detail_ratio"]), None
                score = metric if float(results["consistency_psnr"]) >= SR_MIN_CONSISTENCY_DB else -math.inf
            else:  # lower KID
                metric, std = float(features[HEADLINE_METRIC]), float(features.get("kid_std", float("nan")))
                score = -metric
            scored.setdefault(stage.name, {})[side] = {
                "checkpoint": str(stage.checkpoint), "step": stage.step,
                "sampler": f"{s.sampler} {len(sp.timesteps)} steps, w = {s.w:g}",
                "nfe_per_image": network_evaluations(s, sp.timesteps, sp.stop_at_index,
                                                     guidance_input=sp.guidance_input),
                "metric": metric, "metric_std": std, "score": score,
                "consistency_db": results.get("consistency_psnr"),  # SR stages only
                "fid": float(features["fid"]), "num_samples": int(evaluation.meta["num_samples"]),
                "sample_seconds": round(pipeline.seconds.get(stage.name, 0.0), 2),
            }
    rows = []
    for name in students:
        teacher, student = scored[name]["teacher"], scored[name]["student"]
        used = "student" if student["score"] >= teacher["score"] else "teacher"  # NaN: the teacher
        label = ("detail ratio teacher-forced (consistency ≥ 30 dB)" if net_of[name].endswith("patch32")
                 else f"KID teacher-forced [{net_of[name]}]")
        rows.append({"stage": name, "method": DISTILL.method, "metric": label,
                     "used": used, "teacher": teacher, "student": student})
    return rows


def _read_marker(path: Path) -> dict | None:
    """The budget a stage finished with (`DONE_FILE`), or None when absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stage_grids(outputs: dict[str, torch.Tensor], out_dir: Path, num_per_class: int) -> dict[str, Path]:
    paths = {}
    for name in CHAIN:
        if name in outputs:
            paths[name] = out_dir / f"grid-{name}.png"
            save_png(image_grid(outputs[name], ncol=num_per_class), paths[name])
    return paths


def _real_grid(data_dir: Path, out_dir: Path, num_classes: int, per_class: int) -> Path:
    """Real val images at 256², one row per class, for comparison with the samples."""
    from cascade.data.loader import iterate_split

    rows: dict[int, list[torch.Tensor]] = {c: [] for c in range(num_classes)}
    for sample in iterate_split(data_dir, "val", (256,)):
        c = int(sample["y"])
        if len(rows[c]) < per_class:
            rows[c].append(sample["images"][256])
    tiles = [img for c in range(num_classes) for img in rows[c]]
    path = out_dir / "grid-real.png"
    save_png(image_grid(torch.stack(tiles), ncol=per_class), path)
    return path


def run_demo(out_dir: str | Path, budget: DemoBudget, stage_configs: dict[str, StageConfig], *, seed: int = 0,
             progress: bool = True) -> DemoResult:
    """Run (or resume) the whole demo; returns where the report is and the headline numbers.

    ``stage_configs`` holds the stage definitions to train, one per name in `TRAIN_ORDER` (the tiny presets of
    `stages`: ``{n: stages.get_stage(n, "tiny") for n in TRAIN_ORDER}``); their class count is replaced by the
    data's. Raises ValueError when a stage is missing.

    A stage the budget distils (`DemoBudget.distilled`) is distilled right after its training; before sampling,
    `compare_students` scores teacher and student and the cascade (samples and evaluation) uses the better of the
    two per stage (`DemoResult.weights`; the scores also in ``<out>/distillation.json``).
    """
    missing = [n for n in TRAIN_ORDER if n not in stage_configs]
    if missing:
        raise ValueError(f"run_demo: no stage configuration for {', '.join(missing)}; pass one per stage in "
                         f"{', '.join(TRAIN_ORDER)}")
    from cascade.evaluation.cas import CASSettings
    from cascade.evaluation.evaluate import evaluate
    from cascade.evaluation.features import PatchFeatures
    from cascade.evaluation.inputs import classifier_feature_net
    from cascade.evaluation.settings import MetricSettings
    from cascade.pipeline.outputs import write_outputs

    out = Path(out_dir).resolve()
    data_dir, runs_dir, samples_dir = out / "data", out / "runs", out / "samples"
    result = DemoResult(out_dir=out, report_html=out / "report.html", report_md=out / "report.md")
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        result.seconds[name] = round(now - clock, 1)
        clock = now

    info = make_demo_shards(data_dir, budget, seed, progress)
    class_names = info["class_names"]
    num_classes = len(class_names)
    lap("shards")
    for i, name in enumerate(TRAIN_ORDER, 1):
        _log(f"[{i}/{len(TRAIN_ORDER)}] training {name} for {budget_words(budget, name)} "
             f"(batch {budget.batch_size[name]}); finished stages are not retrained")
        stage = dataclasses.replace(stage_configs[name], num_classes=num_classes)
        result.checkpoints[name] = train_demo_stage(stage, data_dir, runs_dir, budget, seed, progress)
        lap(f"train {name}")
        if name in budget.distilled:
            _log(f"distilling {name} into {name}{STUDENT_SUFFIX} for {distill_words(budget, name)} "
                 f"(batch {budget.batch_size[name]}); finished students are not distilled again")
            result.students[name] = distill_demo_stage(name, result.checkpoints[name], data_dir, runs_dir, budget,
                                                       seed, progress)
            lap(f"distill {name}")

    clf = classifier_feature_net(runs_dir / "classifier32")
    nets = [clf, PatchFeatures(clf, clf.resolution)]
    if result.students:
        _log(f"scoring teacher and student of {' and '.join(result.students)} on {budget.eval_samples} "
             "teacher-forced samples each")
        result.distillation = compare_students(runs_dir, result.students, data_dir, budget, nets=nets,
                                               classifier=clf, seed=seed, progress=progress)
        write_atomic(out / "distillation.json", json.dumps(result.distillation, indent=2))
        for row in result.distillation:
            _log(f"{row['stage']}: {row['metric']} teacher {row['teacher']['metric']:.5f}, student "
                 f"{row['student']['metric']:.5f}: sampling with the {row['used']}")
        lap("teacher or student")
    else:
        (out / "distillation.json").unlink(missing_ok=True)  # an earlier run's scores name no weights of this one
    used = {row["stage"]: result.students[row["stage"]] for row in result.distillation if row["used"] == "student"}
    result.weights = {n: "student" if n in used else "teacher" for n in CHAIN}

    _log(f"sampling {budget.num_per_class} image(s) per class through {' → '.join(CHAIN)}")
    pipeline = CascadePipeline.from_runs(runs_dir, CHAIN, checkpoints=used)
    settings = pipeline.settings(steps=_sample_steps(budget, CHAIN, set(used)))  # each stage's own settings
    sampling_plan = pipeline.validate(list(range(num_classes)), settings, num_per_class=budget.num_per_class,
                                      seed=seed)
    outputs = pipeline.run(sampling_plan, progress=progress)
    write_outputs(outputs, sampling_plan, samples_dir, class_names=class_names,
                  record=pipeline.run_record(sampling_plan))
    grids = _stage_grids(outputs, out, budget.num_per_class)
    real_grid = _real_grid(data_dir, out, num_classes, budget.num_per_class)
    lap("sampling")

    _log(f"evaluating every stage on {budget.eval_samples} samples (teacher-forced and cascaded), CAS on "
         f"{budget.cas_per_class} per class, memorisation")
    evaluation = evaluate(pipeline, data_dir, feature_nets=nets, classifier=clf, num_samples=budget.eval_samples,
                          seed=seed, batch_size=max(budget.batch_size.values()), progress=progress,
                          settings=settings, metrics=MetricSettings(
                              cas_per_class=budget.cas_per_class, cas=CASSettings(steps=budget.cas_steps, batch_size=16),
                              memorisation=True, baselines=True))
    evaluation.write(out)
    result.metrics = evaluation.results
    lap("evaluation")

    curve_runs = {name: runs_dir / name for name in TRAIN_ORDER}
    curve_runs.update({f"{name}{STUDENT_SUFFIX}": runs_dir / f"{name}{STUDENT_SUFFIX}" for name in result.students})
    curves = plot_training_curves(curve_runs, out / "training-curves.png")
    blocks = report_blocks(budget, settings, class_names, grids, real_grid, curves, evaluation, result, out)
    write_report_pages(out, "cascade demo report", blocks)
    lap("report")
    _log(f"report: {result.report_html} (Markdown copy: {result.report_md})")
    return result

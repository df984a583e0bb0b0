"""The end-to-end demo: shards from built-in photographs → train every stage (tiny) → sample → evaluate → report.

Every step is resumable: shards are reused when their settings match, a finished stage is not
retrained (its run resumes at max_steps and returns at once), a killed stage resumes from its last
checkpoint. `tools/demo.py` is the command line.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cascade.atomic import write_atomic
from cascade.config import StageConfig
from cascade.data.shard_folder import read_dataset_info
from cascade.evaluation.pages import write_report_pages
from cascade.evaluation.plots import plot_training_curves
from cascade.harness.demo_report import budget_words, report_blocks
from cascade.imageops import image_grid, save_png
from cascade.pipeline.cascade_pipeline import DEFAULT_CHAIN
from cascade.training.trainer_config import DataConfig, RunConfig, TrainerConfig

TRAIN_ORDER = ("classifier32", "base32", "sr64", "sr128", "sr256")
CHAIN = DEFAULT_CHAIN  # the demo trains and samples every stage of the default chain
DONE_FILE = "demo_done.json"  # in a stage's run folder: the budget it finished training with


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Sampling: each stage's own `SamplingSettings` (the tiny presets: base32 ancestral 40 steps at w = 1, sr64
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


@dataclass
class DemoResult:
    out_dir: Path
    report_html: Path
    report_md: Path
    checkpoints: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


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
    from cascade.pipeline.cascade_pipeline import CascadePipeline
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

    _log(f"sampling {budget.num_per_class} image(s) per class through {' → '.join(CHAIN)}")
    pipeline = CascadePipeline.from_runs(runs_dir, CHAIN)
    settings = pipeline.settings(steps=budget.sample_steps)  # each stage's own settings
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
    clf = classifier_feature_net(runs_dir / "classifier32")
    nets = [clf, PatchFeatures(clf, clf.resolution)]
    evaluation = evaluate(pipeline, data_dir, feature_nets=nets, classifier=clf, num_samples=budget.eval_samples,
                          seed=seed, batch_size=max(budget.batch_size.values()), progress=progress,
                          settings=settings, metrics=MetricSettings(
                              cas_per_class=budget.cas_per_class, cas=CASSettings(steps=budget.cas_steps, batch_size=16),
                              memorisation=True, baselines=True))
    evaluation.write(out)
    result.metrics = evaluation.results
    lap("evaluation")

    curves = plot_training_curves({name: runs_dir / name for name in TRAIN_ORDER}, out / "training-curves.png")
    blocks = report_blocks(budget, settings, class_names, grids, real_grid, curves, evaluation, result, out)
    write_report_pages(out, "cascade demo report", blocks)
    lap("report")
    _log(f"report: {result.report_html} (Markdown copy: {result.report_md})")
    return result

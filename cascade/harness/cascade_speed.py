"""The whole cascade's sampling speed: seconds per final image of the chain with teacher, student and mixed stages.

`run_cascade_speed(settings, preset)` builds the tiny diffusion stages of the chain (``preset(name, "tiny",
num_classes)``, e.g. base32 → sr64 → sr128 → sr256) with freshly initialised weights (the speed of a sampler does
not depend on the weights), and the distilled student of each (`cascade.training.distill.student_stage` with
`CascadeSpeedSettings.distill`: the same network taking the guidance weight w as an input; by default a step
student, sampled by DDIM in 4 steps for a base stage and 2 for an SR stage). It then samples ``images`` images through the whole chain with `CascadePipeline`, each stage
at its own default settings, in three configurations (`CONFIGURATIONS`):

- ``teachers``: every stage as trained from data (the tiny presets: base32 ddim 25 steps at w = 1, sr64 ddpm 25 at
  w = 1, sr128 and sr256 ddpm 25 unguided);
- ``students``: every stage replaced by its student (`DistillSettings` defaults: step distillation, DDIM in 4 steps
  for a base stage, 2 for an SR stage; one network evaluation per step);
- ``mixed``: the stages of `CascadeSpeedSettings.mixed` (default base32 and sr64) distilled, the others teachers.

Per configuration it reports the network evaluations per image of each stage (from the plan,
`cascade.pipeline.plan.network_evaluations`, and as counted on the networks), each stage's seconds per image, the
chain's seconds per final image, images per second and the speed-up over ``teachers``. Before the timed run, every
configuration samples the same images once at one step per stage (a step student at its own few steps; a warm-up:
the first calls of a shape pay for the kernels' set-up). `format_cascade_speed` prints the report as a Markdown table that names the CPU, threads and
precision; `tools/bench.py --cascade` is the command line.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from cascade.config import StageConfig
from cascade.pipeline.cascade_pipeline import DEFAULT_CHAIN, PRECISIONS, CascadePipeline, LoadedStage
from cascade.pipeline.plan import network_evaluations
from cascade.training.trainer_config import DistillSettings

__all__ = ["CONFIGURATIONS", "CascadeSpeedSettings", "format_cascade_speed", "run_cascade_speed"]

CONFIGURATIONS = ("teachers", "students", "mixed")
Preset = Callable[[str, str, int], StageConfig]  # (stage name, size, class count) → StageConfig
Progress = Callable[[str], None]


@dataclass(frozen=True)
class CascadeSpeedSettings:
    """What `run_cascade_speed` times (the ``--cascade`` flags of `tools/bench.py`).

    ``stages``: the chain, a base stage then SR stages each taking the previous one's output size (checked by
    `CascadePipeline`); ``images``: images sampled through the chain per timed run, in one batch (≥ 1);
    ``repeats``: timed runs per configuration, the median reported (≥ 1); ``mixed``: the stages distilled in the
    ``mixed`` configuration (a non-empty subset of ``stages``); ``precision``: one of
    `cascade.pipeline.cascade_pipeline.PRECISIONS` (auto: bf16 where the device computes it natively);
    ``distill``: how each student is made (its method and default steps). ValueError (one line) otherwise."""

    stages: tuple[str, ...] = DEFAULT_CHAIN
    images: int = 4
    repeats: int = 1
    mixed: tuple[str, ...] = ("base32", "sr64")
    precision: str = "auto"
    device: str = "cpu"
    num_classes: int = 10
    seed: int = 0
    distill: DistillSettings = field(default_factory=DistillSettings)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("--stages: name the chain, e.g. base32,sr64,sr128,sr256")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"--stages: a stage is named twice in {','.join(self.stages)}")
        for what, value in (("--images", self.images), ("--repeats", self.repeats)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
        if not self.mixed:
            raise ValueError("--mixed: name at least one stage to distil in the mixed configuration")
        outside = [name for name in self.mixed if name not in self.stages]
        if outside:
            raise ValueError(f"--mixed: {outside[0]} is not in the chain ({','.join(self.stages)}); name stages of "
                             "--stages")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")


def _fresh(cfg: StageConfig, device: str) -> LoadedStage:
    """A stage with freshly initialised weights, in eval mode without gradients, as the pipeline takes it."""
    from cascade.nets.build import build_diffusion, build_model

    model = build_model(cfg).to(device).eval().requires_grad_(False)
    return LoadedStage(cfg.name, cfg, model, build_diffusion(cfg), Path(f"(fresh {cfg.name})"), 0)


def build_configurations(settings: CascadeSpeedSettings, preset: Preset) -> dict[str, list[LoadedStage]]:
    """{configuration: the chain's stages} for `CONFIGURATIONS`: each stage's teacher (the tiny preset) and its
    student by ``settings.distill`` (`student_stage`, its teacher named ``(fresh <stage>)``), fresh weights; a stage's teacher
    and student are the same objects in every configuration that uses them."""
    from cascade.training.distill import student_stage

    teachers, students = {}, {}
    for name in settings.stages:
        cfg = preset(name, "tiny", settings.num_classes)
        teachers[name] = _fresh(cfg, settings.device)
        students[name] = _fresh(student_stage(cfg, f"(fresh {name})", settings.distill), settings.device)
    return {"teachers": [teachers[n] for n in settings.stages],
            "students": [students[n] for n in settings.stages],
            "mixed": [(students if n in settings.mixed else teachers)[n] for n in settings.stages]}


@contextlib.contextmanager
def _count_rows(models: dict[str, torch.nn.Module]) -> Iterator[dict[str, int]]:
    """Yields {stage: images its network processed} while inside (a guided step: 2 per image)."""
    rows = dict.fromkeys(models, 0)
    handles = []
    for name, model in models.items():
        def hook(_module, args, kwargs, name=name):
            first = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            rows[name] += int(first.shape[0])

        handles.append(model.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield rows
    finally:
        for handle in handles:
            handle.remove()


def _time_chain(pipeline: CascadePipeline, plan: Any) -> dict[str, float]:
    """{stage: seconds} of one run of ``plan`` through the chain (each stage on the previous one's output)."""
    seconds, prev = {}, None
    for sp in plan.stages:
        started = time.perf_counter()
        prev = pipeline.run_stage(plan, sp.name, prev)
        seconds[sp.name] = time.perf_counter() - started
    return seconds


def measure_configuration(name: str, chain: Sequence[LoadedStage], settings: CascadeSpeedSettings) -> dict[str, Any]:
    """Sample ``settings.images`` images through ``chain`` (each stage at its own defaults): the configuration's
    row of the report (per stage: weights, sampler, steps, w, NFE per image planned and counted, seconds per image;
    the chain's NFE per image, seconds per final image and images per second, medians over the repeats)."""
    pipeline = CascadePipeline(chain, device=settings.device, precision=settings.precision)
    classes = [i % settings.num_classes for i in range(settings.images)]
    plan = pipeline.validate(classes, seed=settings.seed)
    one_step = {s.name: 1 for s in chain if s.config.distill.method != "step"}  # a step student: its own steps
    warm = pipeline.validate(classes, pipeline.settings(**({"steps": one_step} if one_step else {})),
                             seed=settings.seed)
    _time_chain(pipeline, warm)
    runs, counted = [], {}
    for _ in range(settings.repeats):
        with _count_rows({s.name: s.model for s in chain}) as rows:
            runs.append(_time_chain(pipeline, plan))
        counted = {k: v / settings.images for k, v in rows.items()}
    stages = {}
    for stage, sp in zip(chain, plan.stages):
        s = sp.settings
        stages[sp.name] = {
            "weights": "student" if stage.config.distill.takes_w else "teacher", "sampler": s.sampler,
            "steps": len(sp.timesteps), "w": s.w,
            "nfe_per_image": network_evaluations(s, sp.timesteps, sp.stop_at_index, guidance_input=sp.guidance_input),
            "nfe_counted_per_image": counted[sp.name],
            "seconds_per_image": statistics.median(r[sp.name] for r in runs) / settings.images}
    total = statistics.median(sum(r.values()) for r in runs)
    return {"configuration": name, "stages": stages, "nfe_per_image": sum(v["nfe_per_image"] for v in stages.values()),
            "seconds_per_image": total / settings.images, "images_per_s": settings.images / total,
            "final_resolution": chain[-1].config.resolution, "precision": pipeline.precision}


def run_cascade_speed(settings: CascadeSpeedSettings, preset: Preset,
                      progress: Progress = lambda line: print(line, flush=True)) -> dict[str, Any]:
    """Time every configuration of `CONFIGURATIONS` (see the module docstring); the JSON-able report: the machine
    (CPU, torch, threads, precision), the settings and one entry per configuration with its speed-up over
    ``teachers``. ValueError / `CascadeConfigError` (one line) for a chain the pipeline cannot run."""
    from cascade.harness.bench import cpu_name

    chains = build_configurations(settings, preset)
    rows = []
    for name, chain in chains.items():
        rows.append(measure_configuration(name, chain, settings))
        progress(f"  measured cascade {name}: {rows[-1]['seconds_per_image']:.2f} s per "
                 f"{rows[-1]['final_resolution']}² image, {rows[-1]['nfe_per_image']} NFE per image")
    for row in rows:
        row["speedup"] = rows[0]["seconds_per_image"] / row["seconds_per_image"]
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_name(),
            "logical_cpus": os.cpu_count(), "torch": torch.__version__, "device": settings.device,
            "threads": torch.get_num_threads(), "precision": rows[0]["precision"], "stages": list(settings.stages),
            "mixed": list(settings.mixed), "distill_method": settings.distill.method, "images": settings.images,
            "repeats": settings.repeats,
            "weights": "fresh (speed does not depend on them)", "configurations": rows}


def _describe(name: str, report: dict[str, Any]) -> str:
    if name == "teachers":
        return "teachers: every stage at its own defaults"
    if name == "students":
        return f"students: every stage its {report.get('distill_method', 'distilled')} student"
    return f"mixed: {', '.join(report['mixed'])} distilled, the others teachers"


def format_cascade_speed(report: dict[str, Any]) -> str:
    """The report as Markdown: a line naming the machine and settings, one row per configuration (per stage:
    sampler, steps, w, NFE per image and seconds per image; the chain's NFE, seconds per final image, images per
    second and speed-up over the teachers), then what the cells mean."""
    stages = report["stages"]
    res = report["configurations"][0]["final_resolution"]
    head = (["configuration"] + stages + ["NFE/img", f"s per {res}² image", "img/s", "speed-up"])
    lines = [(f"Cascade sampling speed, {' → '.join(stages)} (tiny, fresh weights): {report['cpu']} "
             f"({report['logical_cpus']} logical CPUs), torch threads: {report['threads']}, precision: "
             f"{report['precision']}, torch {report['torch']}, device: {report['device']}; images per run (one batch): "
             f"{report['images']}, median of runs: {report['repeats']}, {report['date']}"), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["configurations"]:
        cells = [_describe(row["configuration"], report)]
        for name in stages:
            s = row["stages"][name]
            cells.append(f"{s['weights']} {s['sampler']} {s['steps']} w={s['w']:g}: {s['nfe_per_image']} NFE, "
                         f"{s['seconds_per_image']:.2f} s")
        cells += [str(row["nfe_per_image"]), f"{row['seconds_per_image']:.2f}", f"{row['images_per_s']:.2f}",
                  f"{row['speedup']:.1f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", ("Per stage: weights, sampler, steps and w of its own defaults; network evaluations per image (a "
              "guided teacher step counts 2, a student step 1: w is its input); seconds per image of that stage. "
              "Speed-up: the teachers' seconds per image over the configuration's.")]
    return "\n".join(lines)

"""How long a training run takes on this machine: the stage's training step timed, and what it implies.

`estimate_training` builds the stage's network, loss, AdamW, LR schedule and EMA as the trainer does and times the
trainer's own optimizer step (`cascade.training.step.TrainStep`: autocast, loss forward and backward, clipping,
AdamW, EMA update) on a synthetic batch of the stage's shapes (`cascade.training.losses.example_batch`) held on the
device: no data is read, so the figures are the model's cost without the loader. Precision and memory layout are
those a run would choose: ``trainer.mixed_precision`` through `cascade.device.resolve_mixed_precision`;
``trainer.channels_last=auto`` is channels-last on CUDA and, on a CPU, the layout the trainer's probe measures
faster (`cascade.training.memory_format.choose_channels_last`, the same rule: runs of fewer than 200 steps without
a time budget keep the contiguous layout). A large model can be timed at a smaller batch (``max_batch``) and the
step time scaled linearly to the configured batch (`TrainingEstimate.scaled`): an approximation, pessimistic
where a larger batch uses the device better.

`gpu_check_figures` reads the training throughput that `tools/gpu_check.sh` records (its ``gpu_check.json``:
every tiny stage trained 100 steps on a GPU, bf16 + channels-last, at its own batch size).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cascade.config import StageConfig
from cascade.device import resolve_mixed_precision
from cascade.nets.build import build_diffusion, build_model, count_parameters, forward_flops
from cascade.summary import format_count
from cascade.training.losses import example_batch, make_stage_loss
from cascade.training.memory_format import choose_channels_last
from cascade.training.runtime import make_accelerator
from cascade.training.step import new_window, standalone_train_step
from cascade.training.timestep_sampler import stage_timestep_sampler
from cascade.training.trainer_config import TrainerConfig

__all__ = ["GpuFigure", "TrainingEstimate", "estimate_rows", "estimate_training", "gpu_check_figures"]

SECONDS_PER_DAY = 86_400.0


@dataclass(frozen=True)
class TrainingEstimate:
    """The measured training step of one stage and what it implies for a run of its trainer settings.

    ``flops_per_image``: forward FLOPs of one image (`cascade.nets.build.forward_flops`); ``precision``: the
    resolved mixed precision ("no", "bf16" or "fp16"); ``layout``: how the memory layout was chosen;
    ``batch_size``: images per optimizer step (batch_size × grad_accum); ``timed_batch``: images per timed step
    (smaller when the step was timed at a smaller batch and scaled); ``step_s``: median seconds per optimizer step
    at ``batch_size``; ``max_steps`` / ``max_seconds``: the run's step limit and time budget (0: none).
    """

    stage: str
    size: str
    params: int
    flops_per_image: int
    device: str
    precision: str
    channels_last: bool
    layout: str
    batch_size: int
    timed_batch: int
    timed_steps: int
    step_s: float
    max_steps: int
    max_seconds: float

    @property
    def scaled(self) -> bool:
        """Whether ``step_s`` was scaled from a smaller timed batch."""
        return self.timed_batch < self.batch_size

    @property
    def images_per_s(self) -> float:
        return self.batch_size / self.step_s

    @property
    def s_per_1000_steps(self) -> float:
        return 1000.0 * self.step_s

    @property
    def run_s(self) -> float:
        """Seconds of ``max_steps`` steps, or the time budget ``max_seconds`` where that ends the run first."""
        steps_s = self.max_steps * self.step_s
        return min(steps_s, self.max_seconds) if self.max_seconds > 0 else steps_s

    @property
    def days_per_million_images(self) -> float:
        return 1e6 / self.images_per_s / SECONDS_PER_DAY


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def estimate_training(stage: StageConfig, cfg: TrainerConfig, *, size: str, device: str | torch.device = "cpu",
                      steps: int = 3, warmup: int = 1, max_batch: int | None = None,
                      layout_probe: bool = True) -> TrainingEstimate:
    """Time ``steps`` training steps of ``stage`` under trainer settings ``cfg`` after ``warmup`` untimed ones.

    Each step is the trainer's `TrainStep` on ``cfg.grad_accum`` micro-batches of ``cfg.batch_size`` images; with
    ``max_batch`` below the step's images it is one micro-batch of ``max_batch`` images, and the median step time
    is scaled by batch_size × grad_accum / max_batch. ``layout_probe``: on a CPU under ``channels_last=auto``, measure
    the layouts as the trainer does (about 8 forward + backward passes); False times the contiguous layout (and
    says so). ``size``: the preset size, for the record. Raises ValueError for ``steps`` < 1, ``warmup`` < 0 or
    ``max_batch`` < 1; a compile failure or a device error passes through.
    """
    if steps < 1 or warmup < 0 or (max_batch is not None and max_batch < 1):
        raise ValueError(f"steps must be >= 1, warmup >= 0 and max_batch >= 1 or None; got steps={steps}, "
                         f"warmup={warmup}, max_batch={max_batch}")
    device = torch.device(device)
    images = cfg.batch_size * cfg.grad_accum
    timed_batch = images if max_batch is None else min(images, max_batch)
    micro, accum = (cfg.batch_size, cfg.grad_accum) if timed_batch == images else (timed_batch, 1)
    timed_cfg = dataclasses.replace(cfg, batch_size=micro, grad_accum=accum)
    precision = resolve_mixed_precision(cfg.mixed_precision, device)
    torch.manual_seed(0)
    model = build_model(stage).to(device)
    flops = forward_flops(stage, model)
    diffusion = build_diffusion(stage)
    timestep_sampler = stage_timestep_sampler(stage.diffusion, diffusion)
    loss_fn = make_stage_loss(stage, diffusion, timestep_sampler, cfg.p_uncond)
    acc = make_accelerator(precision, cpu=device.type == "cpu", gradient_accumulation_steps=accum,
                           step_scheduler_with_optimizer=False)
    if cfg.channels_last != "auto":
        channels_last, layout = bool(cfg.channels_last), f"trainer.channels_last={str(cfg.channels_last).lower()}"
    elif device.type != "cpu":
        channels_last, layout = device.type == "cuda", f"channels_last=auto on {device.type}"
    elif not layout_probe:
        channels_last, layout = False, ("channels_last=auto, not measured here: a run of >= 200 steps measures both "
                                        "layouts and may choose channels-last")
    else:
        channels_last, probe = choose_channels_last(model, stage, diffusion, timed_cfg, None, world_size=1,
                                                    device=device, autocast=acc.autocast, say=False)
        layout = (f"channels_last=auto, measured: {probe.contiguous_s * 1e3:.0f} ms contiguous, "
                  f"{probe.channels_last_s * 1e3:.0f} ms channels-last" if probe is not None else
                  "channels_last=auto keeps contiguous for runs under 200 steps")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    step, prepared = standalone_train_step(acc, model, loss_fn, timestep_sampler, cfg, device,
                                           mixed_precision=precision)
    batches = [{k: (v.contiguous(memory_format=fmt) if v.ndim == 4 else v)
                for k, v in example_batch(stage, micro, seed=i, device=device).items()} for i in range(accum)]
    window = new_window(device)
    prepared.train()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step(batches, window)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times) * images / timed_batch
    return TrainingEstimate(stage=stage.name, size=size, params=count_parameters(model), flops_per_image=flops,
                            device=str(device), precision=precision, channels_last=channels_last, layout=layout,
                            batch_size=images, timed_batch=timed_batch, timed_steps=steps, step_s=step_s,
                            max_steps=cfg.max_steps, max_seconds=cfg.max_seconds)


def format_duration(seconds: float) -> str:
    """``seconds`` as s, min, h or days: 42 → "42 s", 5400 → "1.5 h"."""
    for unit, scale in (("days", SECONDS_PER_DAY), ("h", 3600.0), ("min", 60.0)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds:.3g} s"


@dataclass(frozen=True)
class GpuFigure:
    """A tiny stage's training throughput recorded by tools/gpu_check.sh: ``gpu`` (the device's name),
    ``images_per_s`` at ``batch_size``, and the settings it ran with (``how``)."""

    stage: str
    gpu: str
    batch_size: int
    images_per_s: float
    how: str


def gpu_check_figures(path: str | Path) -> dict[str, GpuFigure]:
    """{stage: GpuFigure} from a ``gpu_check.json`` that tools/gpu_check.sh wrote (its train step: every tiny
    stage, SDPA attention); {} when the file is missing or holds no such figures. Raises ValueError (one line,
    naming the file) when it is not JSON."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a gpu_check.json that tools/gpu_check.sh writes ({err})") from None
    train = report.get("train") if isinstance(report, dict) else None
    if not isinstance(train, dict):
        return {}
    gpu = str((report.get("env") or {}).get("gpu") or train.get("device") or "GPU")
    how = f"gpu_check.sh: {train.get('steps', '?')} steps, bf16 + channels-last, with the data loader"
    figures = {}
    for run in train.get("runs") or []:
        if isinstance(run, dict) and run.get("attention") == "sdpa" and run.get("img_per_s"):
            figures[str(run["stage"])] = GpuFigure(str(run["stage"]), gpu, int(run["batch_size"]),
                                                   float(run["img_per_s"]), how)
    return figures


def estimate_rows(est: TrainingEstimate, gpu: GpuFigure | None = None) -> list[tuple[str, Any]]:
    """The figures of ``est`` as `cascade.summary` rows (name, value), with ``gpu``'s recorded figures beside."""
    timed = f"median of {est.timed_steps} step{'s' if est.timed_steps > 1 else ''}"
    if est.scaled:
        timed += f" at batch {est.timed_batch}, scaled linearly to {est.batch_size}"
    rows: list[tuple[str, Any]] = [
        ("parameters", format_count(est.params)),
        ("FLOPs per image", (f"{format_count(est.flops_per_image)} forward, "
                             f"~{format_count(3 * est.flops_per_image)} training (forward + backward)")),
        ("device", est.device),
        ("precision", est.precision if est.precision != "no" else "fp32"),
        ("memory layout", f"{'channels-last' if est.channels_last else 'contiguous'} ({est.layout})"),
        ("batch", f"{est.batch_size} images per step"),
        ("img/s", f"{est.images_per_s:.4g}"),
        ("s/step", f"{est.step_s:.4g} ({timed})"),
        ("s per 1,000 steps", f"{est.s_per_1000_steps:.4g} ({format_duration(est.s_per_1000_steps)})"),
        ("trainer.max_steps", f"{est.max_steps} steps: {format_duration(est.max_steps * est.step_s)}"),
    ]
    if est.max_seconds > 0:
        stop_after = int(est.max_seconds / est.step_s)
        rows.append(("trainer.max_seconds", f"{est.max_seconds:g} s: the run stops after ~{stop_after} steps"))
    rows.append(("days per 1M images", f"{est.days_per_million_images:.3g}"))
    if gpu is not None:
        days = 1e6 / gpu.images_per_s / SECONDS_PER_DAY
        rows.append((f"GPU ({gpu.gpu})",
                     f"{gpu.images_per_s:.3g} img/s at batch {gpu.batch_size} ({gpu.how}); 1M images in {days:.3g} days"))
    return rows

"""Distilling a trained stage (the teacher) into a student that samples in a few network evaluations.

`student_stage` turns the teacher's `StageConfig` into the student's: the same network with the guidance weight w
as an extra input (`DistillSpec`), and sampling defaults of its few-step sampler. `StageTrainer` trains it like any
stage (resume, interrupts, time budget, grids, quality proxy), starting from the teacher's EMA weights
(`init_student`) with the loss of `DistillationLoss` (`cascade.diffusion.distillation` holds the mathematics):

- ``step`` (the default): each of the student's S DDIM steps reproduces k guided DDIM steps of the teacher (the
  target of Salimans & Ho 2022 "Progressive Distillation" eq. 8 over k steps, in one run; with guidance, Meng et
  al. 2023 "On Distillation of Guided Diffusion Models" §4.2); it samples with DDIM in exactly S steps.
- ``consistency``: guided consistency distillation on a grid of ``levels`` noise levels with the teacher's DDIM step
  as the solver (Luo et al. 2023 "Latent Consistency Models" §4.2); it samples with the consistency sampler.
- ``guidance``: the student at (x_t, t, w) reproduces the teacher's guided output (Meng et al. 2023 §4.1); it
  samples with the teacher's samplers at half the network evaluations.

Why ``step`` by default: at the teacher's own CPU minutes it reached the few-step targets, while the consistency
student's samples got worse with more steps (docs/results/2026-12-06.md). Progressive distillation proper halves the
steps round by round, one run per round; reproducing k teacher steps at once keeps one run, so the trainer's loop,
resume and time budget serve it unchanged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from cascade import checkpoint
from cascade.config import DistillSpec, StageConfig, StageKind
from cascade.diffusion.augment import augment_low_res
from cascade.diffusion.distillation import (
    consistency_distillation_loss,
    distillation_grid,
    guidance_distillation_loss,
    step_distillation_loss,
)
from cascade.diffusion.gaussian import GaussianDiffusion
from cascade.training.trainer_config import DistillSettings

__all__ = ["DistillationLoss", "init_student", "load_teacher", "student_stage"]


def student_stage(teacher: StageConfig, teacher_path: str | Path, settings: DistillSettings) -> StageConfig:
    """The student's stage configuration: the teacher's (same network, diffusion and augmentation) distilled by
    ``settings.method``, with sampling defaults of its few-step sampler: DDIM in exactly ``settings.steps_for(kind)``
    steps (step), the consistency sampler over that many evaluations (consistency), or the teacher's sampler and
    steps (guidance); w and the SR level s stay the teacher's defaults (w as classifier-free guidance: a teacher's
    autoguidance default, ``sampling.guide`` "auto", does not carry over). ValueError (one line) for a teacher that is
    a classifier or already distilled, whose default w is above ``settings.w_max``, or whose T is too small for the
    grid."""
    if teacher.kind is StageKind.classifier:
        raise ValueError(f"teacher {teacher_path} is a classifier; distil a base or sr stage")
    if teacher.distill.method != "none":
        raise ValueError(f"teacher {teacher_path} is itself {teacher.distill.method}-distilled; distil the stage "
                         f"it came from ({teacher.distill.teacher})")
    w_max = settings.w_max
    if teacher.sampling.w > w_max:
        raise ValueError(f"distill.w_max {w_max:g} is below the teacher's default w {teacher.sampling.w:g}; raise "
                         "distill.w_max")
    method, steps = settings.method, settings.steps_for(teacher.kind)
    spec = DistillSpec(method=method, teacher=str(teacher_path), w_max=w_max,
                       levels={"step": steps, "consistency": settings.levels}.get(method, 0),
                       teacher_steps=settings.teacher_steps_for(teacher.kind) if method == "step" else 0)
    own = dataclasses.replace(teacher.sampling, guidance_interval=None, guide="cfg", guide_checkpoint=None)
    if method == "step":
        sampling = dataclasses.replace(own, sampler="ddim", steps=steps, eta=0.0)
    elif method == "consistency":
        sampling = dataclasses.replace(own, sampler="consistency", steps=settings.steps_for(teacher.kind), eta=0.0)
    else:
        sampling = own
    if teacher.diffusion.num_timesteps <= max(spec.levels, spec.teacher_steps):
        raise ValueError(f"distill: {max(spec.levels, spec.teacher_steps)} levels need more training timesteps than "
                         f"the teacher's {teacher.diffusion.num_timesteps}")
    return dataclasses.replace(teacher, distill=spec, sampling=sampling)


def load_teacher(stage: StageConfig, device: torch.device) -> nn.Module:
    """The teacher network of distilled ``stage`` (its ``distill.teacher`` checkpoint, EMA weights, eval mode, no
    gradients) on ``device``. CheckpointError / FileNotFoundError (one line) when it is missing or damaged;
    ValueError when it is not the student's stage (name, kind, resolutions, network or diffusion differ)."""
    teacher_cfg, model, _ = checkpoint.load_stage(stage.distill.teacher, weights="ema", device=device)
    mine = dataclasses.replace(stage, distill=DistillSpec(), sampling=teacher_cfg.sampling)
    if mine != teacher_cfg:
        raise ValueError(f"teacher {stage.distill.teacher} is not this student's stage ({teacher_cfg.name} "
                         f"{teacher_cfg.resolution}x{teacher_cfg.resolution}, not {stage.name} "
                         f"{stage.resolution}x{stage.resolution} with the same network and diffusion)")
    return model


def init_student(student: nn.Module, teacher_path: str | Path) -> None:
    """Load the teacher's EMA weights into ``student``: every tensor but the guidance-weight embedding, which keeps
    its zero-initialised output (the student starts as the teacher's conditional model). RuntimeError naming the
    first tensor when anything else does not fit."""
    weights = checkpoint.load_weights(teacher_path, "ema")
    missing, unexpected = student.load_state_dict(weights, strict=False)
    missing = [k for k in missing if "guidance_embed." not in k]
    if missing or unexpected:
        raise RuntimeError(f"teacher weights {teacher_path} do not fit the student: "
                           f"{(missing or unexpected)[0]} ({len(missing)} missing, {len(unexpected)} unexpected)")


class DistillationLoss:
    """The student's training loss ``loss(model, batch) -> {"loss", "per_sample": B, "t": B}``, for the trainer's
    step: per example a guidance weight w ~ U[0, w_max] (Luo et al. 2023 §4.2) and, per the method, a timestep t
    (guidance: uniform over the T training timesteps), one of the student's steps (step: uniform over its steps) or
    a level n ~ U{1..N} of the student's grid (consistency, t = τ_n); SR stages condition both networks on the
    same augmented low-resolution input (Ho et al. 2021 §3.2). The teacher sees the batch's labels and the null
    class; the student sees the labels (no dropout)."""

    def __init__(self, stage: StageConfig, diffusion: GaussianDiffusion, teacher: nn.Module):
        self.stage, self.diffusion, self.teacher = stage, diffusion, teacher
        spec = stage.distill
        self.method, self.w_max = spec.method, spec.w_max
        self.grid = (torch.tensor(distillation_grid(diffusion.num_timesteps, spec.levels))
                     if spec.method == "consistency" else None)
        if spec.method == "step":  # each student step i (τ_i → τ_{i−1}; τ_1 → clean) as k teacher steps
            fine = distillation_grid(diffusion.num_timesteps, spec.teacher_steps)
            k = spec.teacher_steps // spec.levels
            paths = [[fine[i * k - j] for j in range(k + 1)] for i in range(1, spec.levels + 1)]
            paths[0][-1] = -1  # the last step ends on clean data (ᾱ = 1), as the DDIM sampler's does
            self.paths = torch.tensor(paths)

    def conditioning(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        kwargs = {"y": batch["y"]}
        if self.stage.kind is StageKind.sr:
            x_low, aug_level = augment_low_res(batch["x_low"], self.stage.aug)
            kwargs.update(x_low=x_low, aug_level=aug_level)
        return kwargs

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x0 = batch["x"]
        n, device = x0.shape[0], x0.device
        kwargs = self.conditioning(batch)
        w = torch.rand(n, device=device) * self.w_max
        noise = torch.randn_like(x0)
        common = {"null_class": self.stage.num_classes, "model_kwargs": kwargs}
        if self.method == "guidance":
            t = torch.randint(0, self.diffusion.num_timesteps, (n,), device=device)
            per_sample = guidance_distillation_loss(model, self.teacher, self.diffusion, x0, t, w, noise, **common)
        elif self.method == "step":
            path = self.paths.to(device)[torch.randint(0, len(self.paths), (n,), device=device)]
            t = path[:, 0]
            per_sample = step_distillation_loss(model, self.teacher, self.diffusion, x0, path, w, noise,
                                                clip_denoised=self.stage.sampling.clip_denoised, **common)
        else:
            level = torch.randint(1, len(self.grid), (n,), device=device)
            grid = self.grid.to(device)
            t, t_prev = grid[level], grid[level - 1]
            per_sample = consistency_distillation_loss(model, self.teacher, self.diffusion, x0, t, t_prev, w, noise,
                                                       **common)
        return {"loss": per_sample.mean(), "per_sample": per_sample, "t": t}

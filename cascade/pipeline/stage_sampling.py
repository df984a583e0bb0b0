"""Sampling one stage with its `SamplingSettings`: the one loop every caller runs (the cascade, the trainer's
sample grids, the quality benchmark).

Per batch: the labels (and, SR stages, the low-resolution input, re-noised to the level s or handed over
already noised by a truncated previous stage), x_T, and a call of the settings' sampler on the respaced
diffusion with the model wrapped for guidance.

Reproducibility: all noise of sample i (its x_T, its augmentation noise and the per-step noise of the
ancestral sampler or DDIM with eta > 0) comes from generators seeded by (seed, stage, purpose, i)
(`cascade.diffusion.noise`), so a sample does not depend on the batch size or on the other samples.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from tqdm.auto import tqdm

from cascade.config import SamplingSettings, StageConfig, StageKind
from cascade.diffusion.augment import condition_low_res
from cascade.diffusion.guidance import (
    GuidanceInput,
    autoguidance,
    classifier_free_guidance,
    classifier_guidance,
)
from cascade.diffusion.noise import AUG_NOISE, STEP_NOISE, X_T, per_sample_generators, per_sample_noise
from cascade.diffusion.samplers import SAMPLERS
from cascade.pipeline.plan import stage_timesteps

__all__ = ["CPU_CHUNK", "CPU_CHUNK_PIXELS", "default_chunk", "guided_model", "sample_stage"]

# Sampling chunks on CPU: at most CPU_CHUNK images, and at most CPU_CHUNK_PIXELS pixels: 16 images at 32² and 64²,
# 8 at 128², 2 at 256², the fastest per image in `tools/bench.py --chunks` (larger chunks leave the caches and run
# slower per image; docs/results/2026-12-07.md).
CPU_CHUNK, CPU_CHUNK_PIXELS = 16, 2 * 256 * 256


def default_chunk(resolution: int, device: torch.device) -> int | None:
    """Images a stage samples at once when the caller gives no batch size: on CPU at most ``CPU_CHUNK`` images and
    ``CPU_CHUNK_PIXELS`` pixels of ``resolution``² (at least 1); elsewhere None (all at once)."""
    if device.type != "cpu":
        return None
    return max(1, min(CPU_CHUNK, CPU_CHUNK_PIXELS // (resolution * resolution)))


def guided_model(model: torch.nn.Module, diffusion: Any, config: StageConfig, settings: SamplingSettings,
                 classifier: torch.nn.Module | None = None, guide: torch.nn.Module | None = None) -> Any:
    """``model`` wrapped for the guidance ``settings`` ask, for w > 0 and inside ``settings.guidance_interval``
    only: classifier-free with ``settings.guide`` "cfg" (slides eq. 17; Ho & Salimans 2022 eq. 6), autoguidance
    by ``guide`` with "auto" (Karras et al. 2024 eq. 1, §3, at the paper's weight 1 + w); and, given a
    ``classifier`` and a scale > 0, classifier guidance (slides eq. 16; Dhariwal & Nichol 2021 Algorithm 1).
    ``diffusion``: the stage's, on its training timesteps (T bounds the guidance interval). ``guide``: the loaded
    model of ``settings.guide_checkpoint`` (eval mode, on the model's device). A distilled stage takes w as its
    network's input instead (`cascade.diffusion.guidance.GuidanceInput`: one evaluation per step). ValueError when
    ``settings.guide`` is "auto" and no ``guide`` is given."""
    if settings.guide == "auto" and guide is None:
        raise ValueError(f"stage {config.name}: guide auto needs its guide model (the checkpoint "
                         f"{settings.guide_checkpoint}, loaded); pass guide=")
    if config.distill.takes_w:
        model = GuidanceInput(model, settings.w)
    elif settings.w > 0 and settings.guide == "auto":  # the model, then its guide: two calls, inside the interval
        model = autoguidance(model, guide, 1 + settings.w, settings.guidance_interval, diffusion.num_timesteps)
    elif settings.w > 0:  # batched conditional + null-class call, inside the guidance interval only
        model = classifier_free_guidance(model, settings.w, config.num_classes, settings.guidance_interval,
                                         diffusion.num_timesteps)
    if classifier is not None and settings.classifier_scale > 0:
        model = classifier_guidance(model, classifier, diffusion.original_alphas_cumprod, settings.classifier_scale,
                                    diffusion.prediction)
    return model


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sample_stage(model: torch.nn.Module, diffusion: Any, config: StageConfig, settings: SamplingSettings,
                 labels: torch.Tensor, x_low: torch.Tensor | None = None, *, seed: int = 0, start_index: int = 0,
                 batch_size: int | None = None, device: torch.device | str = "cpu", precision: str = "fp32",
                 classifier: torch.nn.Module | None = None, guide: torch.nn.Module | None = None,
                 stop_at_index: int | None = None, truncated_level: float | None = None,
                 progress: bool = False) -> torch.Tensor:
    """Sample stage ``config`` for ``labels`` (N class indices) with ``settings``: N×3×R×R float32 CPU images.

    ``diffusion``: the stage's `GaussianDiffusion` on its training timesteps, respaced here to
    ``settings.steps`` (None: every timestep; Nichol & Dhariwal 2021 §4; the consistency sampler: levels of the
    student's grid, `cascade.pipeline.plan.stage_timesteps`). ``x_low`` (SR stages, N×3×r×r):
    clean low-resolution images in [-1, 1], re-noised to ``settings.aug_level`` (CDM §3.2:
    x_s = √ᾱ(s)·x + √(1−ᾱ(s))·ε), or, with ``truncated_level``, a truncated previous stage's z_k already at
    that level (passed on as is). ``stop_at_index``: stop the reverse process there and return z_k (not
    clamped). Sample i draws its noise as sample ``start_index`` + i of a run seeded with ``seed``, for the
    stage's name; ``batch_size`` (None: `default_chunk`) does not change the samples. ``precision``: "fp32" or
    "bf16" (autocast on ``device``). ``classifier``: the noise-aware classifier ``settings.classifier`` names,
    loaded by the caller; ``guide``: the model ``settings.guide_checkpoint`` names (guide "auto"), loaded by the
    caller on ``device``, given the same labels and SR inputs. Settings and inputs are trusted (checked by the
    caller); a sampler's ValueError passes through.
    """
    device = torch.device(device)
    respaced = diffusion.respace(stage_timesteps(config, settings, diffusion.num_timesteps))
    guided = guided_model(model, diffusion, config, settings, classifier, guide)
    options: dict[str, Any] = {"clip_denoised": settings.clip_denoised, "dynamic_threshold": settings.dynamic_threshold}
    if settings.sampler == "ddim":
        options["eta"] = settings.eta
    sampler = SAMPLERS[settings.sampler]
    n = len(labels)
    batch = min(n, batch_size or default_chunk(config.resolution, device) or n)
    steps_run = respaced.num_timesteps - (0 if stop_at_index is None else stop_at_index + 1)
    res = config.resolution
    chunks = []
    with tqdm(total=steps_run * -(-n // batch), desc=f"{config.name} ({res}x{res})", disable=not progress,
              leave=True) as bar:
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            idx = range(start_index + start, start_index + stop)  # the samples' indices in the run
            kwargs: dict[str, torch.Tensor] = {"y": labels[start:stop].to(device)}
            if config.kind is StageKind.sr:
                low = x_low[start:stop].to(device)
                if truncated_level is not None:  # z_k is already at the level s of ᾱ_k
                    level = torch.full((len(idx),), truncated_level, device=device)
                else:  # re-noise the clean input: x_s = √ᾱ(s)·x + √(1−ᾱ(s))·ε (CDM §3.2)
                    noise = per_sample_noise(seed, config.name, AUG_NOISE, idx, low.shape[1:])
                    low, level = condition_low_res(low, settings.aug_level, noise=noise.to(device))
                kwargs.update(x_low=low, aug_level=level)
            x_T = per_sample_noise(seed, config.name, X_T, idx, (3, res, res)).to(device)
            generator = per_sample_generators(seed, config.name, STEP_NOISE, idx)
            with _autocast(device, precision):
                x = sampler(guided, respaced, x_T=x_T, model_kwargs=kwargs, stop_at_index=stop_at_index,
                            generator=generator, callback=lambda *a, **k: bar.update(1), **options)
            chunks.append(x.float().cpu())
    return torch.cat(chunks)

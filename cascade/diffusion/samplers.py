"""Reverse-process samplers as free functions of (model, diffusion, x, ...), in the manner of k-diffusion.

A model is any callable `model(x_t, t, **model_kwargs)` → its prediction (ε, v or x_0, as the diffusion's
`prediction` says; C channels) or prediction‖v (2C channels), with t on the original training scale; the
samplers map a respaced diffusion's indices through its `timestep_map`. The guidance wrappers of
`cascade.diffusion.guidance` return a model with that same call signature, so every sampler accepts them.

Samplers: `sample_ddpm` (ancestral, DDPM Algorithm 2), `sample_ddim` (Song et al. 2021), two
second-order solvers of the probability-flow ODE, `sample_dpmpp2m` (DPM-Solver++(2M), Lu et al. 2022)
and `sample_heun` (Karras et al. 2022 'EDM', Algorithm 1), and `sample_consistency` (Song et al. 2023
'Consistency Models' Algorithm 1) for consistency-distilled students. Every one of them can stop early at
`stop_at_index` (truncated conditioning augmentation). Noise comes from `cascade.diffusion.noise` (one
generator, or one per sample). Equation numbers refer to the lecture slides (not in the repository); each
also names the paper's equation.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from cascade.diffusion.gaussian import GaussianDiffusion
from cascade.diffusion.noise import NoiseGenerator, check_generator, draw_noise

__all__ = ["SAMPLERS", "sample_consistency", "sample_ddim", "sample_ddpm", "sample_dpmpp2m", "sample_heun"]


def _sampling_device(model, generator: NoiseGenerator) -> torch.device:
    """The model's device if it has parameters or buffers, else the generator's, else the CPU."""
    if isinstance(model, nn.Module):
        for tensor in model.parameters():
            return tensor.device
        for tensor in model.buffers():
            return tensor.device
    if generator is None:
        return torch.device("cpu")
    return generator.device if isinstance(generator, torch.Generator) else generator[0].device


def _initial_noise(model, shape, x_T, generator) -> torch.Tensor:
    if x_T is not None:
        if shape is not None and tuple(shape) != tuple(x_T.shape):
            raise ValueError(f"shape {tuple(shape)} disagrees with x_T {tuple(x_T.shape)}")
        check_generator(generator, x_T.shape[0])
        return x_T
    if shape is None:
        raise ValueError("give either shape or x_T")
    check_generator(generator, shape[0])
    return draw_noise(tuple(shape), generator, _sampling_device(model, generator))


def _check_stop(diffusion: GaussianDiffusion, stop_at_index: int | None) -> int:
    if stop_at_index is None:
        return -1
    if not 0 <= stop_at_index < diffusion.num_timesteps:
        raise ValueError(f"stop_at_index must lie in [0, {diffusion.num_timesteps - 1}], got {stop_at_index}")
    return int(stop_at_index)


@torch.no_grad()
def sample_ddpm(model, diffusion: GaussianDiffusion, shape=None, x_T: torch.Tensor | None = None, *,
                model_kwargs: dict | None = None, clip_denoised: bool = True,
                dynamic_threshold: float | None = None, stop_at_index: int | None = None,
                generator: NoiseGenerator = None, progress: bool = False,
                callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """Ancestral sampling (slides Algorithm 2; Ho et al. 2020 'DDPM' Algorithm 2) with the diffusion's
    (fixed or learned) variance, over its (possibly respaced, Nichol & Dhariwal 2021 §4) steps.

    Starts from `x_T` or from N(0, I) noise of `shape` (B×C×H×W) drawn with `generator` (one torch.Generator,
    or one per sample so that each sample's noise does not depend on the batch it is in). Runs every index of
    the diffusion from N−1 down to 0, or down to `stop_at_index` + 1 so that the returned sample is at noise
    level alphas_cumprod[stop_at_index] (truncated conditioning augmentation, Ho et al. 2021 §3.2).
    `callback` receives dict(step, t, x, pred_xstart) after each step. Returns B×C×H×W; raises ValueError for
    a bad stop_at_index, shape or generator.
    """
    x = _initial_noise(model, shape, x_T, generator)
    stop = _check_stop(diffusion, stop_at_index)
    for step, index in enumerate(tqdm(range(diffusion.num_timesteps - 1, stop, -1), disable=not progress,
                                      desc="ddpm")):
        t = torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)
        out = diffusion.p_xstart_variance(model(x, diffusion.model_timesteps(t), **(model_kwargs or {})), x, t,
                                          clip_denoised, dynamic_threshold)
        # μ̃_t(x_t, x̂_0) = √ᾱ_{t−1}β_t/(1−ᾱ_t)·x̂_0 + √α_t(1−ᾱ_{t−1})/(1−ᾱ_t)·x_t (slides eq. 13; Ho et al. 2020 eq. 7).
        mean = (diffusion.extract("posterior_mean_coef1", t, x) * out["pred_xstart"]
                + diffusion.extract("posterior_mean_coef2", t, x) * x)
        if index > 0:
            # x_{t−1} = μ_θ(x_t, t) + σ_t·z (slides Algorithm 2, line 4; Ho et al. 2020 Algorithm 2).
            x = mean + torch.exp(0.5 * out["log_variance"]) * draw_noise(x.shape, generator, x.device, x.dtype)
        else:
            x = mean
        if callback is not None:
            callback({"step": step, "t": index, "x": x, "pred_xstart": out["pred_xstart"]})
    return x


@torch.no_grad()
def sample_ddim(model, diffusion: GaussianDiffusion, shape=None, x_T: torch.Tensor | None = None, *,
                eta: float = 0.0, model_kwargs: dict | None = None, clip_denoised: bool = True,
                dynamic_threshold: float | None = None, stop_at_index: int | None = None,
                generator: NoiseGenerator = None, progress: bool = False,
                callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021 'DDIM' eq. 12) with q_{σ,τ} over the (respaced) diffusion's steps;
    η = 0 deterministic, η = 1 ancestral-like. Arguments, shapes and errors as in `sample_ddpm` (also
    ValueError for η < 0); any learned variance in the output is ignored."""
    if not 0 <= eta <= 1:  # σ_τ ≤ √(1 − ᾱ_{τ−1}) needs η ≤ 1 (Song et al. 2021 eq. 16)
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    x = _initial_noise(model, shape, x_T, generator)
    stop = _check_stop(diffusion, stop_at_index)
    for step, index in enumerate(tqdm(range(diffusion.num_timesteps - 1, stop, -1), disable=not progress,
                                      desc="ddim")):
        t = torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)
        out = diffusion.p_xstart_variance(model(x, diffusion.model_timesteps(t), **(model_kwargs or {})), x, t,
                                          clip_denoised, dynamic_threshold)
        eps = diffusion.predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = diffusion.extract("alphas_cumprod", t, x)
        alpha_bar_prev = diffusion.extract("alphas_cumprod_prev", t, x)
        # σ_τ = η·√((1 − ᾱ_{τ−1})/(1 − ᾱ_τ))·√(1 − ᾱ_τ/ᾱ_{τ−1}) (Song et al. 2021 eq. 16).
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))
        # x_{τ−1} = √ᾱ_{τ−1}·x̂_0 + √(1 − ᾱ_{τ−1} − σ²)·ε̂ + σ·z (Song et al. 2021 eq. 12; slides, strided sampling).
        x = alpha_bar_prev.sqrt() * out["pred_xstart"] + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        if index > 0 and eta > 0:
            x = x + sigma * draw_noise(x.shape, generator, x.device, x.dtype)
        if callback is not None:
            callback({"step": step, "t": index, "x": x, "pred_xstart": out["pred_xstart"]})
    return x


def _ode_levels(diffusion: GaussianDiffusion, stop: int) -> list[tuple[int, float]]:
    """(index, ᾱ) of every level an ODE sampler visits: N−1 down to stop + 1, then the level it ends at
    (index `stop` ≥ 0, or −1 with ᾱ = 1: clean data)."""
    alphas_cumprod = diffusion.alphas_cumprod.tolist()
    last = [(stop, alphas_cumprod[stop])] if stop >= 0 else [(-1, 1.0)]
    return [(i, alphas_cumprod[i]) for i in range(diffusion.num_timesteps - 1, stop, -1)] + last


def _denoised(model, diffusion: GaussianDiffusion, x: torch.Tensor, index: int, model_kwargs,
              clip_denoised: bool, dynamic_threshold: float | None) -> torch.Tensor:
    """x̂_0(x, index) for any prediction type, clipped or thresholded as `p_mean_variance` does."""
    t = torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)
    model_output = model(x, diffusion.model_timesteps(t), **(model_kwargs or {}))
    return diffusion.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised,
                                     dynamic_threshold=dynamic_threshold)["pred_xstart"]


@torch.no_grad()
def sample_dpmpp2m(model, diffusion: GaussianDiffusion, shape=None, x_T: torch.Tensor | None = None, *,
                   model_kwargs: dict | None = None, clip_denoised: bool = True,
                   dynamic_threshold: float | None = None, stop_at_index: int | None = None,
                   generator: NoiseGenerator = None, progress: bool = False,
                   callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022 'DPM-Solver++', Algorithm 2): a multistep second-order solver of the
    probability-flow ODE in data prediction, on the (respaced) diffusion's discrete VP levels with
    α = √ᾱ, σ = √(1 − ᾱ) and λ = log(α/σ).

    One network evaluation per step. The first step is first order (it is DDIM), and so is the step to
    clean data (σ = 0, where x = x̂_0 as in DDIM). A step more than twice as long in λ as the previous one
    is first order too: the correction extrapolates x̂_0 linearly in λ over h_i from a slope measured
    over h_{i−1}, which overshoots where x̂_0 saturates, as on the jump to ᾱ_0 ≈ 1 of evenly respaced
    steps (the role of Lu et al.'s "lower order final" steps). `stop_at_index` = k ends at level ᾱ_k.
    Arguments as in `sample_ddpm` (the generator only draws x_T when it is not given); any learned
    variance in the output is ignored. Raises ValueError for a bad stop_at_index, shape or generator.
    """
    x = _initial_noise(model, shape, x_T, generator)
    stop = _check_stop(diffusion, stop_at_index)
    levels = _ode_levels(diffusion, stop)
    prev_xstart, prev_h = None, None
    for step, ((index, ab), (next_index, ab_next)) in enumerate(
            tqdm(list(itertools.pairwise(levels)), disable=not progress, desc="dpmpp2m")):
        xstart = _denoised(model, diffusion, x, index, model_kwargs, clip_denoised, dynamic_threshold)
        if ab_next == 1.0:  # σ = 0: the step's limit is x̂_0 itself (first order, as DDIM's last step)
            x = xstart
        else:
            alpha, sigma = math.sqrt(ab), math.sqrt(1.0 - ab)
            alpha_next, sigma_next = math.sqrt(ab_next), math.sqrt(1.0 - ab_next)
            # h_i = λ_{t_i} − λ_{t_{i−1}}, λ = log(α/σ) (Lu et al. 2022, Algorithm 2).
            h = math.log(alpha_next / sigma_next) - math.log(alpha / sigma)
            if prev_xstart is None or prev_h / h < 0.5:  # first order: DPM-Solver++(1), i.e. DDIM
                data = xstart
            else:
                r = prev_h / h
                # D_i = (1 + 1/(2r_i))·x_θ(x_{t_{i−1}}) − 1/(2r_i)·x_θ(x_{t_{i−2}}) (Lu et al. 2022, Algorithm 2).
                data = (1 + 1 / (2 * r)) * xstart - (1 / (2 * r)) * prev_xstart
            # x_{t_i} = (σ_{t_i}/σ_{t_{i−1}})·x_{t_{i−1}} − α_{t_i}·(e^{−h_i} − 1)·D_i (Lu et al. 2022, Algorithm 2).
            x = (sigma_next / sigma) * x - alpha_next * math.expm1(-h) * data
            prev_xstart, prev_h = xstart, h
        if callback is not None:
            callback({"step": step, "t": index, "x": x, "pred_xstart": xstart})
    return x


@torch.no_grad()
def sample_heun(model, diffusion: GaussianDiffusion, shape=None, x_T: torch.Tensor | None = None, *,
                model_kwargs: dict | None = None, clip_denoised: bool = True,
                dynamic_threshold: float | None = None, stop_at_index: int | None = None,
                generator: NoiseGenerator = None, progress: bool = False,
                callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022 'EDM', Algorithm 1 with
    S_churn = 0), in σ = √((1 − ᾱ)/ᾱ) space on the (respaced) diffusion's discrete levels.

    The ODE dx̃/dσ = (x̃ − D(x̃; σ))/σ (EDM Algorithm 1 with σ(t) = t, s(t) = 1) acts on x̃ = x_t/√ᾱ, which
    is x_0 + σ·ε; the denoiser D is the
    model's x̂_0 at x_t = √ᾱ·x̃. Two network evaluations per step, except the last step to clean data
    (σ = 0), which is Euler (EDM: "if σ_{i+1} ≠ 0"), and the first step, which is Euler too (that is a
    DDIM step, EDM sec. 3): from the top level (cosine: σ ≈ 2·10⁴) the trapezoidal correction would
    average d over a σ interval on most of which d is constant, and err by about the interval times the
    change of d; the Euler step's error there is damped by the flow to O(1/N²). So N steps cost 2N − 2
    evaluations. With `stop_at_index` = k the result is returned at level ᾱ_k on the VP scale
    (x_t = √ᾱ_k·x̃). Arguments as in `sample_ddpm`
    (the generator only draws x_T when it is not given); any learned variance in the output is ignored.
    Raises ValueError for a bad stop_at_index, shape or generator.
    """
    x = _initial_noise(model, shape, x_T, generator)
    stop = _check_stop(diffusion, stop_at_index)
    levels = _ode_levels(diffusion, stop)

    def sigma_of(ab: float) -> float:
        return math.sqrt((1.0 - ab) / ab)  # σ = √((1 − ᾱ)/ᾱ): x_t/√ᾱ = x_0 + σ·ε (slides eq. 2; Ho et al. 2020 'DDPM' eq. 4)

    x_tilde = x / math.sqrt(levels[0][1])
    for step, ((index, ab), (next_index, ab_next)) in enumerate(
            tqdm(list(itertools.pairwise(levels)), disable=not progress, desc="heun")):
        sigma, sigma_next = sigma_of(ab), sigma_of(ab_next)
        xstart = _denoised(model, diffusion, math.sqrt(ab) * x_tilde, index, model_kwargs, clip_denoised,
                           dynamic_threshold)
        # d_i = (x_i − D(x_i; σ_i))/σ_i; Euler step x_{i+1} = x_i + (σ_{i+1} − σ_i)·d_i (EDM Algorithm 1, l. 4–5).
        d = (x_tilde - xstart) / sigma
        x_next = x_tilde + (sigma_next - sigma) * d
        if sigma_next > 0 and step > 0:  # Heun's correction, except for the first and the final step
            xstart_next = _denoised(model, diffusion, math.sqrt(ab_next) * x_next, next_index, model_kwargs,
                                    clip_denoised, dynamic_threshold)
            d_next = (x_next - xstart_next) / sigma_next
            # Trapezoidal correction x_{i+1} = x_i + (σ_{i+1} − σ_i)·(d_i + d'_i)/2 (EDM Algorithm 1, l. 6–8).
            x_next = x_tilde + (sigma_next - sigma) * 0.5 * (d + d_next)
        x_tilde = x_next
        x = math.sqrt(ab_next) * x_tilde  # back on the VP scale: x_t = √ᾱ·x̃
        if callback is not None:
            callback({"step": step, "t": index, "x": x, "pred_xstart": xstart})
    return x


@torch.no_grad()
def sample_consistency(model, diffusion: GaussianDiffusion, shape=None, x_T: torch.Tensor | None = None, *,
                       model_kwargs: dict | None = None, clip_denoised: bool = True,
                       dynamic_threshold: float | None = None, stop_at_index: int | None = None,
                       generator: NoiseGenerator = None, progress: bool = False,
                       callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023 'Consistency Models' Algorithm 1, in VP form) of a
    consistency student: one network evaluation at each of the (respaced) diffusion's indices, N−1 down to 0.

    At index i the student's x̂_0 = f(x, t_i) (its prediction's x̂_0, clipped or thresholded as `p_mean_variance`
    does); before the next evaluation it is re-noised to that index's level, x = √ᾱ_{i−1}·x̂_0 + √(1 − ᾱ_{i−1})·z
    (slides eq. 2; Ho et al. 2020 'DDPM' eq. 4). Returns the last x̂_0; with `stop_at_index` = k it stops after the
    evaluation at k + 1 and returns x̂_0 re-noised to ᾱ_k (truncated conditioning augmentation). The levels are the
    caller's (`cascade.diffusion.distillation.distillation_timesteps`: the student's training grid). Arguments,
    shapes and errors as in `sample_ddpm`; any learned variance in the output is ignored.
    """
    x = _initial_noise(model, shape, x_T, generator)
    stop = _check_stop(diffusion, stop_at_index)
    for step, index in enumerate(tqdm(range(diffusion.num_timesteps - 1, stop, -1), disable=not progress,
                                      desc="consistency")):
        xstart = _denoised(model, diffusion, x, index, model_kwargs, clip_denoised, dynamic_threshold)
        if index - 1 > stop or stop >= 0:  # re-noise to the next level (or to the truncation level ᾱ_k)
            t = torch.full((x.shape[0],), index - 1, dtype=torch.long, device=x.device)
            # x_τ = √ᾱ_τ·x̂_0 + √(1 − ᾱ_τ)·z (Song et al. 2023 Algorithm 1, line 5, in VP form; slides eq. 2).
            x = diffusion.q_sample(xstart, t, draw_noise(x.shape, generator, x.device, x.dtype))
        else:
            x = xstart
        if callback is not None:
            callback({"step": step, "t": index, "x": x, "pred_xstart": xstart})
    return x


# Every sampler by the name `SamplingSettings.sampler` and the command lines use; each takes
# (model, diffusion, shape=None, x_T=None, *, model_kwargs, clip_denoised, dynamic_threshold, stop_at_index,
# generator, progress, callback) and the DDIM family also eta.
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm, "ddim": sample_ddim, "dpmpp2m": sample_dpmpp2m, "heun": sample_heun,
    "consistency": sample_consistency,
}

"""Reverse-process samplers as free functions of (model, diffusion, ...) and guidance as model wrappers.

A model is any callable `model(x_t, t, **model_kwargs)` → ε (C channels) or ε‖v (2C channels), with t
on the original training scale; the samplers map a respaced diffusion's indices through its
`timestep_map`. Guidance wrappers return a model with that same call signature, so every sampler accepts
them. Equation numbers refer to the lecture slides (shared/reference/diffusion-slides.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cascade.diffusion import GaussianDiffusion, _randn

NoiseGenerator = torch.Generator | Sequence[torch.Generator] | None  # one for the batch, or one per sample


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


def _check_generator(generator: NoiseGenerator, batch: int) -> None:
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, (str, bytes)) or not isinstance(generator, Sequence) or not all(
            isinstance(g, torch.Generator) for g in generator):
        raise ValueError(f"generator must be a torch.Generator or a sequence of them, got {type(generator).__name__}")
    if len(generator) != batch:
        raise ValueError(f"got {len(generator)} generators for a batch of {batch}: give one per sample")


def draw_noise(shape: tuple[int, ...], generator: NoiseGenerator, device, dtype=torch.float32) -> torch.Tensor:
    """N(0, I) noise of `shape`: from one generator, or row i from generator[i] (independent of batching)."""
    if generator is None or isinstance(generator, torch.Generator):
        return _randn(shape, generator, device, dtype)
    return torch.stack([_randn(shape[1:], g, device, dtype) for g in generator])


def _initial_noise(model, shape, x_T, generator) -> torch.Tensor:
    if x_T is not None:
        if shape is not None and tuple(shape) != tuple(x_T.shape):
            raise ValueError(f"shape {tuple(shape)} disagrees with x_T {tuple(x_T.shape)}")
        _check_generator(generator, x_T.shape[0])
        return x_T
    if shape is None:
        raise ValueError("give either shape or x_T")
    _check_generator(generator, shape[0])
    return draw_noise(tuple(shape), generator, _sampling_device(model, generator))


def _check_stop(diffusion: GaussianDiffusion, stop_at_index: int | None) -> int:
    if stop_at_index is None:
        return -1
    if not 0 <= stop_at_index < diffusion.num_timesteps:
        raise ValueError(f"stop_at_index must lie in [0, {diffusion.num_timesteps - 1}], got {stop_at_index}")
    return int(stop_at_index)


def _reverse_loop(step_fn, model, diffusion, shape, x_T, model_kwargs, stop_at_index, generator,
                  progress, callback, desc):
    x = _initial_noise(model, shape, x_T, generator)
    stop = _check_stop(diffusion, stop_at_index)
    indices = range(diffusion.num_timesteps - 1, stop, -1)
    for step, index in enumerate(tqdm(indices, disable=not progress, desc=desc)):
        t = torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)
        with torch.no_grad():
            model_output = model(x, diffusion.model_timesteps(t), **(model_kwargs or {}))
            x, pred_xstart = step_fn(model_output, x, t, index)
        if callback is not None:
            callback({"step": step, "t": index, "x": x, "pred_xstart": pred_xstart})
    return x


def sample_ddpm(model, diffusion: GaussianDiffusion, shape=None, x_T: torch.Tensor | None = None, *,
                model_kwargs: dict | None = None, clip_denoised: bool = True,
                dynamic_threshold: float | None = None, stop_at_index: int | None = None,
                generator: NoiseGenerator = None, progress: bool = False,
                callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """Ancestral sampling (Algorithm 2) with the diffusion's (fixed or learned) variance.

    Starts from `x_T` or from N(0, I) noise of `shape` drawn with `generator` (one torch.Generator, or one
    per sample so that each sample's noise does not depend on the batch it is in). Runs every index of the
    (possibly respaced) diffusion from T−1 down to 0, or down to `stop_at_index` + 1 so that the returned
    sample is at noise level alphas_cumprod[stop_at_index] (truncated conditioning augmentation).
    `callback` receives dict(step, t, x, pred_xstart) after each step.
    """

    def step_fn(model_output, x, t, index):
        out = diffusion.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised,
                                        dynamic_threshold=dynamic_threshold)
        if index == 0:
            return out["mean"], out["pred_xstart"]
        noise = draw_noise(x.shape, generator, x.device, x.dtype)
        # x_{t−1} = μ_θ(x_t, t) + σ_t·z (Algorithm 2, line 4).
        return out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise, out["pred_xstart"]

    return _reverse_loop(step_fn, model, diffusion, shape, x_T, model_kwargs, stop_at_index, generator,
                         progress, callback, "ddpm")


def sample_ddim(model, diffusion: GaussianDiffusion, shape=None, x_T: torch.Tensor | None = None, *,
                eta: float = 0.0, model_kwargs: dict | None = None, clip_denoised: bool = True,
                dynamic_threshold: float | None = None, stop_at_index: int | None = None,
                generator: NoiseGenerator = None, progress: bool = False,
                callback: Callable[[dict], None] | None = None) -> torch.Tensor:
    """DDIM sampling with q_{σ,τ} over the (respaced) diffusion's steps; η = 0 deterministic, η = 1
    ancestral-like. Arguments as in `sample_ddpm`; any learned variance in the output is ignored."""
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")

    def step_fn(model_output, x, t, index):
        out = diffusion.p_mean_variance(model_output, x, t, clip_denoised=clip_denoised,
                                        dynamic_threshold=dynamic_threshold)
        eps = diffusion.predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = diffusion._extract("alphas_cumprod", t, x)
        alpha_bar_prev = diffusion._extract("alphas_cumprod_prev", t, x)
        # σ_τ = η·√((1 − ᾱ_{τ−1})/(1 − ᾱ_τ))·√(1 − ᾱ_τ/ᾱ_{τ−1}) (DDIM).
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))
        # Mean of q_{σ,τ}(x_{τ−1} | x_τ, x_0): √ᾱ_{τ−1}·x̂_0 + √(1 − ᾱ_{τ−1} − σ²)·ε̂ (slides, strided sampling).
        mean = alpha_bar_prev.sqrt() * out["pred_xstart"] + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        if index == 0 or eta == 0:
            return mean, out["pred_xstart"]
        return mean + sigma * draw_noise(x.shape, generator, x.device, x.dtype), out["pred_xstart"]

    return _reverse_loop(step_fn, model, diffusion, shape, x_T, model_kwargs, stop_at_index, generator,
                         progress, callback, "ddim")


def _guided_output(model_output: torch.Tensor, channels: int, eps: torch.Tensor) -> torch.Tensor:
    """Replace the ε part of a raw output (ε or ε‖v), keeping any variance channels."""
    if model_output.shape[1] == channels:
        return eps
    return torch.cat([eps, model_output[:, channels:]], dim=1)


class ClassifierFreeGuidance(nn.Module):
    """ε̄ = (1 + w)·ε_θ(x_t, t, y) − w·ε_θ(x_t, t) (eq. 17), both halves in one batched forward pass."""

    def __init__(self, model, w: float, null_class: int):
        super().__init__()
        if not w >= 0:
            raise ValueError(f"guidance weight w must be >= 0, got {w}")
        self.model = model
        self.w = float(w)
        self.null_class = int(null_class)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **kwargs):
        if y is None:  # all-null: conditional and unconditional coincide
            return self.model(x, t, y=None, **kwargs)
        batch = x.shape[0]
        t = t.expand(batch) if t.ndim == 0 else t
        doubled = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == batch
                   else v for k, v in kwargs.items()}
        y_both = torch.cat([y, torch.full_like(y, self.null_class)])
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), y=y_both, **doubled)
        cond, uncond = out[:batch], out[batch:]
        channels = x.shape[1]
        # ε̄ = (1 + w)·ε_θ(x_t, t, y) − w·ε_θ(x_t, t) (eq. 17).
        eps = (1 + self.w) * cond[:, :channels] - self.w * uncond[:, :channels]
        return _guided_output(cond, channels, eps)


class ClassifierGuidance(nn.Module):
    """ε̄ = ε_θ − √(1 − ᾱ_t)·scale·∇_x log f_φ(y | x_t) (eq. 16) with a classifier `classifier(x_t, t)`."""

    def __init__(self, model, classifier, alphas_cumprod, scale: float):
        super().__init__()
        if not scale >= 0:
            raise ValueError(f"classifier guidance scale must be >= 0, got {scale}")
        self.model = model
        self.classifier = classifier
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        self.scale = float(scale)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **kwargs):
        if y is None:
            raise ValueError("classifier guidance needs class labels y in model_kwargs")
        out = self.model(x, t, y=y, **kwargs)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(self.classifier(x_in, t), dim=-1)
            selected = log_probs[torch.arange(x.shape[0], device=x.device), y]
            grad = torch.autograd.grad(selected.sum(), x_in)[0]
        t_index = t.long().expand(x.shape[0]) if t.ndim == 0 else t.long()
        alpha_bar = self.alphas_cumprod[t_index.cpu()].to(device=x.device, dtype=x.dtype)
        alpha_bar = alpha_bar.view(-1, *([1] * (x.ndim - 1)))
        channels = x.shape[1]
        # ε̄ = ε_θ(x_t, t) − √(1 − ᾱ_t)·s·∇_{x_t} log f_φ(y | x_t) (eq. 16).
        eps = out[:, :channels] - (1 - alpha_bar).sqrt() * self.scale * grad.to(out.dtype)
        return _guided_output(out, channels, eps)


def classifier_free_guidance(model, w: float, null_class: int) -> ClassifierFreeGuidance:
    """Wrap `model` with classifier-free guidance of weight w ≥ 0 (w = 0: plain conditional model)."""
    return ClassifierFreeGuidance(model, w, null_class)


def classifier_guidance(model, classifier, alphas_cumprod, scale: float) -> ClassifierGuidance:
    """Wrap `model` with classifier guidance; `alphas_cumprod` is the ORIGINAL (training) table, indexed by
    the original-scale timesteps the model receives (`diffusion.original_alphas_cumprod`)."""
    return ClassifierGuidance(model, classifier, alphas_cumprod, scale)


# Every sampler by the name `SamplingSettings.sampler` and the command lines use; each takes
# (model, diffusion, shape=None, x_T=None, *, model_kwargs, clip_denoised, dynamic_threshold, stop_at_index,
# generator, progress, callback) and the DDIM family also eta.
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ddpm": sample_ddpm, "ddim": sample_ddim}

"""Guidance as model wrappers: each returns a model with the wrapped model's call signature
`model(x_t, t, **model_kwargs)`, so every sampler of `cascade.diffusion.samplers` accepts it.

`classifier_free_guidance` (Ho & Salimans 2022, optionally limited to an interval of timesteps,
Kynkäänniemi et al. 2024), `autoguidance` (Karras et al. 2024: a weaker version of the same model in place of
the unconditional prediction, the same interval) and `classifier_guidance` (Dhariwal & Nichol 2021 §4.2), for
models predicting ε, v or x_0; `GuidanceInput` hands a distilled student its guidance weight as an input instead. Equation numbers refer to the lecture slides (not in the repository); each also names the
paper's equation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cascade.checks import is_int, is_number
from cascade.diffusion.parameterization import check_prediction, eps_shift_in_prediction

__all__ = ["GUIDES", "AutoGuidance", "ClassifierFreeGuidance", "ClassifierGuidance", "GuidanceInput", "autoguidance",
           "check_guidance_interval", "classifier_free_guidance", "classifier_guidance"]

# What guides a stage's weight w (`cascade.config.SamplingSettings.guide`): "cfg", the model's own null-class
# prediction (`ClassifierFreeGuidance`), or "auto", a weaker model of the same stage (`AutoGuidance`).
GUIDES = ("cfg", "auto")

def _check_weight(name: str, value) -> float:
    """A guidance weight or scale: a finite real number >= 0 (not a bool), as a float; ValueError otherwise."""
    if not is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _guided_output(model_output: torch.Tensor, channels: int, mean: torch.Tensor) -> torch.Tensor:
    """Replace the mean part of a raw output (prediction or prediction‖v), keeping any variance channels."""
    if model_output.shape[1] == channels:
        return mean
    return torch.cat([mean, model_output[:, channels:]], dim=1)


def check_guidance_interval(interval, num_timesteps: int | None) -> tuple[float, float] | None:
    """The guidance interval as (t_lo, t_hi) floats, or None (guidance at every t).

    Timesteps are on the training scale: 0 <= t_lo <= t_hi < num_timesteps (T), real numbers (not bools), T an
    integer >= 1. Raises a one-line ValueError for anything else, or when T is not given."""
    if interval is None:
        return None
    try:
        pair = tuple(interval)
    except TypeError:
        pair = ()
    if len(pair) != 2 or not all(is_number(v) for v in pair):
        raise ValueError(f"guidance_interval must be a pair (t_lo, t_hi) of timesteps, got {interval!r}")
    lo, hi = (float(v) for v in pair)
    if num_timesteps is None:
        raise ValueError("guidance_interval needs num_timesteps (the training T) to check it")
    if not is_int(num_timesteps) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")
    if not 0 <= lo <= hi < num_timesteps:
        raise ValueError(f"guidance_interval must satisfy 0 <= t_lo <= t_hi < T = {num_timesteps}, "
                         f"got ({lo:g}, {hi:g})")
    return lo, hi


class ClassifierFreeGuidance(nn.Module):
    """(1 + w)·ε_θ(x_t, t, y) − w·ε_θ(x_t, t) (slides eq. 17; Ho & Salimans 2022 eq. 6), both halves in one batched forward pass.

    The combination is made in the model's output space (ε, v or x_0): each is affine in ε at fixed x_t
    with coefficients summing to 1 on the x_t term ((1 + w) − w = 1), so combining outputs equals
    combining ε̂. With `interval` = (t_lo, t_hi) guidance applies only where t_lo <= t <= t_hi
    (training-scale timesteps; Kynkäänniemi et al. 2024 'Applying Guidance in a Limited Interval
    Improves Sample and Distribution Quality in Diffusion Models'); elsewhere the output is the plain
    conditional prediction and, when no sample of the batch is inside, the unconditional half is not
    computed.
    """

    def __init__(self, model, w: float, null_class: int, interval=None, num_timesteps: int | None = None):
        super().__init__()
        self.w = _check_weight("guidance weight w", w)
        if not is_int(null_class) or null_class < 0:
            raise ValueError(f"null_class must be a class index >= 0, got {null_class!r}")
        self.model = model
        self.null_class = null_class
        self.interval = check_guidance_interval(interval, num_timesteps)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **kwargs):
        if y is None:  # all-null: conditional and unconditional coincide
            return self.model(x, t, y=None, **kwargs)
        batch = x.shape[0]
        t = t.expand(batch) if t.ndim == 0 else t
        inside = None
        if self.interval is not None:
            inside = (t >= self.interval[0]) & (t <= self.interval[1])
            if not bool(inside.any()):  # outside the interval: the conditional prediction alone
                return self.model(x, t, y=y, **kwargs)
        doubled = {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == batch
                   else v for k, v in kwargs.items()}
        y_both = torch.cat([y, torch.full_like(y, self.null_class)])
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), y=y_both, **doubled)
        cond, uncond = out[:batch], out[batch:]
        channels = x.shape[1]
        # (1 + w)·ε_θ(x_t, t, y) − w·ε_θ(x_t, t) (slides eq. 17; Ho & Salimans 2022 eq. 6), in the model's output space.
        mean = (1 + self.w) * cond[:, :channels] - self.w * uncond[:, :channels]
        if inside is not None:  # guidance only inside [t_lo, t_hi] (Kynkäänniemi et al. 2024)
            mean = torch.where(inside.view(-1, *([1] * (x.ndim - 1))), mean, cond[:, :channels])
        return _guided_output(cond, channels, mean)


class AutoGuidance(nn.Module):
    """D_w = D_0 + w·(D_1 − D_0) (Karras et al. 2024 "Guiding a Diffusion Model with a Bad Version of Itself"
    eq. 1, §3): the good model D_1 = ``model`` extrapolated away from a weaker version of itself D_0 = ``guide``
    (an earlier checkpoint, a shorter EMA or a smaller network of the same stage), both conditional.

    ``w`` is the paper's weight, a finite number >= 0: w = 1 is the good model alone (the guide is not
    evaluated), w = 0 the guide alone, w > 1 guides. Both models get the same x_t, t and keyword inputs (class
    labels y; an SR stage's x_low and aug_level). The combination is made in the model's output space (ε, v or
    x_0): at fixed x_t each is affine in the denoiser D with the same coefficients for both models, and the
    weights (1 − w) + w = 1, so combining outputs equals combining denoisers. A learned-variance output keeps the
    good model's variance channels; the guide's are ignored (it may predict a fixed variance). With ``interval``
    = (t_lo, t_hi) guidance applies only where t_lo <= t <= t_hi (training-scale timesteps; Kynkäänniemi et al.
    2024); elsewhere the output is the good model's and, when no sample of the batch is inside, the guide is not
    evaluated. Raises ValueError (one line) for a bad w or interval, or a guide that is the model itself.
    """

    def __init__(self, model, guide, w: float, interval=None, num_timesteps: int | None = None):
        super().__init__()
        self.w = _check_weight("autoguidance weight w", w)
        if guide is model:
            raise ValueError("autoguidance: the guide is the model itself, which would not guide; pass a weaker "
                             "model of the same stage (an earlier checkpoint or a smaller network)")
        self.model = model
        self.guide = guide
        self.interval = check_guidance_interval(interval, num_timesteps)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs):
        batch = x.shape[0]
        t = t.expand(batch) if t.ndim == 0 else t
        good = self.model(x, t, **kwargs)
        inside = None
        if self.interval is not None:
            inside = (t >= self.interval[0]) & (t <= self.interval[1])
            if not bool(inside.any()):  # outside the interval: the good model alone
                return good
        if self.w == 1.0:  # D_1 alone
            return good
        bad = self.guide(x, t, **kwargs)
        channels = x.shape[1]
        # D_w = D_0 + w·(D_1 − D_0) (Karras et al. 2024 "Autoguidance" eq. 1, §3), in the model's output space.
        mean = bad[:, :channels] + self.w * (good[:, :channels] - bad[:, :channels])
        if inside is not None:  # guidance only inside [t_lo, t_hi] (Kynkäänniemi et al. 2024)
            mean = torch.where(inside.view(-1, *([1] * (x.ndim - 1))), mean, good[:, :channels])
        return _guided_output(good, channels, mean)


class GuidanceInput(nn.Module):
    """A distilled student with its guidance weight fixed: ``model(x_t, t, w=w·1, **kwargs)``, one network
    evaluation per call (the guidance the teacher needed two for is the student's input; Meng et al. 2023 §4.1)."""

    def __init__(self, model, w: float):
        super().__init__()
        self.model = model
        self.w = _check_weight("guidance weight w", w)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **kwargs):
        return self.model(x, t, w=torch.full((x.shape[0],), self.w, device=x.device), **kwargs)


class ClassifierGuidance(nn.Module):
    """ε̄ = ε_θ − √(1 − ᾱ_t)·scale·∇_x log f_φ(y | x_t) (slides eq. 16; Dhariwal & Nichol 2021 §4.2) with a classifier `classifier(x_t, t)`.

    For a v- or x_0-predicting model the same ε shift is mapped into its output space at fixed x_t
    (`cascade.diffusion.parameterization.eps_shift_in_prediction`)."""

    def __init__(self, model, classifier, alphas_cumprod, scale: float, prediction: str = "eps"):
        super().__init__()
        self.scale = _check_weight("classifier guidance scale", scale)
        self.model = model
        self.classifier = classifier
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        self.prediction = check_prediction(prediction)

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
        # ε̄ = ε_θ(x_t, t) − √(1 − ᾱ_t)·s·∇_{x_t} log f_φ(y | x_t) (slides eq. 16; Dhariwal & Nichol 2021 §4.2).
        delta_eps = -(1 - alpha_bar).sqrt() * self.scale * grad.to(out.dtype)
        mean = out[:, :channels] + eps_shift_in_prediction(delta_eps, alpha_bar, self.prediction)
        return _guided_output(out, channels, mean)


def classifier_free_guidance(model, w: float, null_class: int, interval=None,
                             num_timesteps: int | None = None) -> ClassifierFreeGuidance:
    """Wrap `model` with classifier-free guidance of weight w ≥ 0, finite (w = 0: plain conditional model);
    `null_class` is the index of the unconditional class (an int >= 0).

    `interval` = (t_lo, t_hi) limits guidance to t_lo <= t <= t_hi on the training scale (checked against
    num_timesteps = T: 0 <= t_lo <= t_hi < T); None guides at every t. Raises ValueError otherwise."""
    return ClassifierFreeGuidance(model, w, null_class, interval, num_timesteps)


def autoguidance(model, guide, w: float, interval=None, num_timesteps: int | None = None) -> AutoGuidance:
    """Wrap `model` (the good model D_1) with autoguidance by `guide` (a weaker model D_0 of the same stage, the
    same prediction type, classes and timesteps): D_w = D_0 + w·(D_1 − D_0) (Karras et al. 2024 eq. 1, §3) with the
    paper's weight w ≥ 0, finite (w = 1: `model` alone; the project's CFG-style weight w' maps to w = 1 + w').

    `interval` = (t_lo, t_hi) limits guidance to t_lo <= t <= t_hi on the training scale (checked against
    num_timesteps = T: 0 <= t_lo <= t_hi < T); None guides at every t. Raises ValueError otherwise."""
    return AutoGuidance(model, guide, w, interval, num_timesteps)


def classifier_guidance(model, classifier, alphas_cumprod, scale: float,
                        prediction: str = "eps") -> ClassifierGuidance:
    """Wrap `model` with classifier guidance; `alphas_cumprod` is the ORIGINAL (training) table, indexed by
    the original-scale timesteps the model receives (`diffusion.original_alphas_cumprod`); `prediction`
    is the model's output type (`diffusion.prediction`); `scale` a finite number >= 0. Raises ValueError otherwise."""
    return ClassifierGuidance(model, classifier, alphas_cumprod, scale, prediction)

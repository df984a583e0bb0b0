"""Gaussian diffusion math shared by every stage: forward process, posterior, reverse-process
parametrizations, training losses and the variational bound (`GaussianDiffusion`), on the tables of
`cascade.diffusion.schedules` and the prediction types of `cascade.diffusion.parameterization` (both re-exported here: this is
the core's one import for the math).

Pure math: nothing here knows about networks, data or training. A model is any callable
`model(x_t, t, **model_kwargs)` returning its prediction (C channels) or prediction‖v (2C channels, learned
variance), where the prediction is ε, v = √ᾱ·ε − √(1−ᾱ)·x_0 or x_0 (`prediction` = "eps", "v", "x0").
Timesteps are 0-indexed, t ∈ {0..T-1} (index t is the slides' t+1). All tables are float64 torch tensors
on the CPU; values are gathered per timestep and cast to the dtype/device of the tensor they act on.
Equation numbers refer to the lecture slides (not in the repository); each also names the paper's equation.

Longer than ~400 lines as one cohesive thing: `GaussianDiffusion`'s tables and the formulas that read them
(forward, posterior, reverse, losses, bound, respacing) belong together.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from cascade.diffusion.parameterization import (
    LOSS_WEIGHTINGS,
    PREDICTIONS,
    check_prediction,
    eps_from_v,
    eps_from_xstart,
    eps_shift_in_prediction,
    min_snr_weight,
    prediction_from_xstart_eps,
    prediction_to_xstart_eps,
    v_from_xstart_eps,
    xstart_from_eps,
    xstart_from_v,
)
from cascade.diffusion.schedules import (
    SCHEDULES,
    aug_alpha_bar,
    aug_level_from_alpha_bar,
    make_betas,
    space_timesteps,
)

MODEL_VAR_TYPES = ("fixed_small", "fixed_large", "learned_range")
LOSS_TYPES = ("simple", "hybrid")
__all__ = ["LOSS_TYPES", "LOSS_WEIGHTINGS", "MODEL_VAR_TYPES", "PREDICTIONS", "SCHEDULES", "GaussianDiffusion",
           "apply_dynamic_threshold", "aug_alpha_bar", "aug_level_from_alpha_bar", "check_prediction",
           "discretized_gaussian_log_likelihood", "eps_from_v", "eps_from_xstart", "eps_shift_in_prediction",
           "make_betas", "mean_flat", "min_snr_weight", "normal_kl", "prediction_from_xstart_eps",
           "prediction_to_xstart_eps", "space_timesteps", "v_from_xstart_eps", "xstart_from_eps", "xstart_from_v"]


# ----------------------------------------------------------------------------------------------------
# Gaussian helpers (per element; callers take means over dimensions)
# ----------------------------------------------------------------------------------------------------


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) per element, in nats."""
    # KL of two Gaussians, the terms L_{t−1} of slides eq. 7 / eq. 10 (Ho et al. 2020 'DDPM' eqs. 5, 8).
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor,
                                        log_scales: torch.Tensor) -> torch.Tensor:
    """Per-element log-likelihood (nats) of 8-bit data rescaled to [-1, 1] under a Gaussian discretized
    into 256 bins of width 2/255 (the edge bins extend to ±∞)."""
    if x.shape != means.shape:
        raise ValueError(f"x {tuple(x.shape)} and means {tuple(means.shape)} must have the same shape")
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered + 1.0 / 255.0)
    min_in = inv_stdv * (centered - 1.0 / 255.0)
    # L_0 = −log p_θ(x_0|x_1) of slides eq. 7 (Ho et al. 2020 'DDPM' eq. 5, §3.3) as the mass of x_0's bin (log_ndtr keeps the tails exact).
    log_cdf_plus = torch.special.log_ndtr(plus_in)
    log_one_minus_cdf_min = torch.special.log_ndtr(-min_in)
    cdf_delta = torch.special.ndtr(plus_in) - torch.special.ndtr(min_in)
    log_mid = torch.log(cdf_delta.clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_mid))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def apply_dynamic_threshold(pred_xstart: torch.Tensor, percentile: float) -> torch.Tensor:
    """Imagen's dynamic thresholding: s = max(1, percentile of |x̂_0| per sample), clamp to [−s, s], ÷ s."""
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"dynamic_threshold percentile must be in (0, 1], got {percentile}")
    flat = pred_xstart.detach().reshape(pred_xstart.shape[0], -1).abs().float()
    s = torch.quantile(flat, percentile, dim=1).clamp(min=1.0).to(pred_xstart.dtype)
    s = s.view(-1, *([1] * (pred_xstart.ndim - 1)))
    return torch.maximum(torch.minimum(pred_xstart, s), -s) / s

# ----------------------------------------------------------------------------------------------------
# The diffusion
# ----------------------------------------------------------------------------------------------------


class GaussianDiffusion:
    """A discrete Gaussian diffusion with T steps and its reverse-process parametrization.

    betas: β_1..β_T (any array-like, each in (0, 1)). model_var_type: 'fixed_small' (Σ = β̃_t),
    'fixed_large' (Σ = β_t, with β̃_1 at t = 0 as in DDPM / Improved DDPM) or 'learned_range' (network
    outputs prediction‖v, Σ = exp(v·log β_t + (1−v)·log β̃_t) with v mapped from [−1, 1] to [0, 1]; the
    variance channels do not depend on the prediction type). loss_type: 'simple' (slides Algorithm 1; Ho et al. 2020 'DDPM' Algorithm 1) or 'hybrid'
    (L_simple + λ·L_vlb, needs 'learned_range'). vlb_weight: λ. prediction: what the network's mean
    channels predict, 'eps' (ε, DDPM), 'v' (√ᾱ·ε − √(1−ᾱ)·x_0, Salimans & Ho 2022) or 'x0'.
    loss_weighting: 'uniform' (the plain MSE in the prediction's space; L_simple for ε) or 'min_snr'
    (Min-SNR-γ, Hang et al. 2023, with γ = min_snr_gamma > 0). timestep_map / original_alphas_cumprod:
    set by `respace`; the model is always called with timesteps on the original training scale.
    Raises ValueError naming the setting for any value outside these choices.
    """

    def __init__(self, betas, model_var_type: str = "fixed_small", loss_type: str = "simple",
                 vlb_weight: float = 0.001, *, prediction: str = "eps", loss_weighting: str = "uniform",
                 min_snr_gamma: float = 5.0, timestep_map=None, original_alphas_cumprod=None):
        betas = np.asarray(betas.detach().cpu() if isinstance(betas, torch.Tensor) else betas,
                           dtype=np.float64)
        if betas.ndim != 1 or betas.size < 1:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {betas.shape}")
        if not np.all((betas > 0) & (betas < 1)):
            raise ValueError("every beta must lie in (0, 1)")
        if model_var_type not in MODEL_VAR_TYPES:
            raise ValueError(f"unknown model_var_type {model_var_type!r}; expected one of {MODEL_VAR_TYPES}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss {loss_type!r}; expected one of {LOSS_TYPES}")
        if loss_type == "hybrid" and model_var_type != "learned_range":
            raise ValueError("the hybrid loss trains the variance: it needs model_var_type='learned_range'")
        if not vlb_weight >= 0:
            raise ValueError(f"vlb_weight must be >= 0, got {vlb_weight}")
        check_prediction(prediction)
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss_weighting {loss_weighting!r}; expected one of {LOSS_WEIGHTINGS}")
        if not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        self.prediction = prediction
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.vlb_weight = float(vlb_weight)
        self.num_timesteps = int(betas.shape[0])

        def table(a):
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))

        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        # β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t)·β_t (slides eq. 9; Ho et al. 2020 'DDPM' eq. 7); β̃ at index 0 is 0, so its log is clipped to β̃_1.
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        clip_to = posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.betas = table(betas)
        self.alphas = table(alphas)
        self.alphas_cumprod = table(alphas_cumprod)
        self.alphas_cumprod_prev = table(alphas_cumprod_prev)
        self.sqrt_alphas_cumprod = table(np.sqrt(alphas_cumprod))
        self.sqrt_one_minus_alphas_cumprod = table(np.sqrt(1.0 - alphas_cumprod))
        self.log_one_minus_alphas_cumprod = table(np.log(1.0 - alphas_cumprod))
        self.sqrt_recip_alphas_cumprod = table(np.sqrt(1.0 / alphas_cumprod))
        self.sqrt_recipm1_alphas_cumprod = table(np.sqrt(1.0 / alphas_cumprod - 1.0))
        self.log_betas = table(np.log(betas))
        self.posterior_variance = table(posterior_variance)
        self.posterior_log_variance_clipped = table(np.log(np.append(clip_to, posterior_variance[1:])))
        # fixed_large: Σ_t = β_t, except Σ_0 = β̃_1 for a better decoder likelihood (Ho et al. 2020 'DDPM'
        # code; Nichol & Dhariwal 2021 'Improved DDPM', the posterior_log_variance_clipped convention).
        large_variance = np.append(clip_to, betas[1:])
        self.large_variance = table(large_variance)
        self.large_log_variance = table(np.log(large_variance))
        # SNR_t = ᾱ_t/(1 − ᾱ_t) (Kingma et al. 2021 'VDM'); its loss weight per the prediction type.
        snr = alphas_cumprod / (1.0 - alphas_cumprod)
        self.snr = table(snr)
        self.loss_weights = (min_snr_weight(self.snr, self.min_snr_gamma, prediction)
                             if loss_weighting == "min_snr" else torch.ones_like(self.snr))
        # μ̃_t = coef1·x_0 + coef2·x_t (slides eq. 9; Ho et al. 2020 'DDPM' eq. 7).
        self.posterior_mean_coef1 = table(betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod))
        self.posterior_mean_coef2 = table((1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod))

        if timestep_map is None:
            timestep_map = np.arange(self.num_timesteps)
        timestep_map = torch.as_tensor(np.asarray(timestep_map), dtype=torch.long)
        if timestep_map.shape != (self.num_timesteps,):
            raise ValueError(f"timestep_map must have {self.num_timesteps} entries, got {tuple(timestep_map.shape)}")
        self.timestep_map = timestep_map
        self.original_alphas_cumprod = (self.alphas_cumprod if original_alphas_cumprod is None
                                        else torch.as_tensor(original_alphas_cumprod, dtype=torch.float64))
        self._device_tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    @classmethod
    def from_config(cls, schedule: str = "linear", num_timesteps: int = 1000,
                    model_var_type: str = "fixed_small", loss: str = "simple",
                    vlb_weight: float = 0.001, prediction: str = "eps", loss_weighting: str = "uniform",
                    min_snr_gamma: float = 5.0) -> GaussianDiffusion:
        """Build from the fields of a DiffusionConfig (schedule name instead of betas)."""
        return cls(make_betas(schedule, num_timesteps), model_var_type=model_var_type, loss_type=loss,
                   vlb_weight=vlb_weight, prediction=prediction, loss_weighting=loss_weighting,
                   min_snr_gamma=min_snr_gamma)

    def __repr__(self) -> str:
        return (f"GaussianDiffusion(num_timesteps={self.num_timesteps}, model_var_type={self.model_var_type!r}, "
                f"loss_type={self.loss_type!r}, vlb_weight={self.vlb_weight}, prediction={self.prediction!r}, "
                f"loss_weighting={self.loss_weighting!r}, min_snr_gamma={self.min_snr_gamma}, "
                f"respaced={self.num_timesteps != len(self.original_alphas_cumprod)})")

    # -- helpers -------------------------------------------------------------------------------------

    @property
    def out_channels_factor(self) -> int:
        """Model output channels per image channel: 2 for learned variance (prediction‖v), else 1."""
        return 2 if self.model_var_type == "learned_range" else 1

    def _check_t(self, t, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"timesteps must be integers, got dtype {t.dtype}")
        if t.ndim == 0:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"timesteps must have shape ({batch},), got {tuple(t.shape)}")
        # Range check on the host only: on an accelerator it would force a sync every step; there the
        # table gather's own index check catches out-of-range timesteps.
        if t.device.type == "cpu" and bool(((t < 0) | (t >= self.num_timesteps)).any()):
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}]")
        return t.long()

    def extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gather table `name` at timesteps t, shaped to broadcast against x, in x's dtype/device."""
        table = getattr(self, name)
        if x.device.type == "mps":  # no float64 there: gather on the CPU
            vals = table[t.cpu()].to(device=x.device, dtype=x.dtype)
        else:
            key = (name, x.device)
            if key not in self._device_tables:
                self._device_tables[key] = table.to(x.device)
            vals = self._device_tables[key][t].to(x.dtype)
        return vals.view(-1, *([1] * (x.ndim - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Map indices of this (possibly respaced) diffusion to the original training scale."""
        return self.timestep_map.to(t.device)[t]

    def _split_output(self, model_output: torch.Tensor, x_t: torch.Tensor):
        channels = x_t.shape[1]
        expected = channels * self.out_channels_factor
        if model_output.ndim != x_t.ndim or model_output.shape[1] != expected \
                or model_output.shape[2:] != x_t.shape[2:] or model_output.shape[0] != x_t.shape[0]:
            raise ValueError(
                f"model output {tuple(model_output.shape)} does not match x_t {tuple(x_t.shape)}: "
                f"model_var_type={self.model_var_type!r} needs {expected} channels"
            )
        model_output = model_output.to(x_t.dtype)
        if self.model_var_type == "learned_range":
            return model_output[:, :channels], model_output[:, channels:]
        return model_output, None

    # -- forward process and posterior ------------------------------------------------------------

    def q_mean_variance(self, x_start: torch.Tensor, t):
        """Mean, variance and log-variance of q(x_t | x_0) (slides eq. 2; Ho et al. 2020 'DDPM' eq. 4)."""
        t = self._check_t(t, x_start)
        mean = self.extract("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = (1.0 - self.extract("alphas_cumprod", t, x_start)).expand_as(x_start)
        log_variance = self.extract("log_one_minus_alphas_cumprod", t, x_start).expand_as(x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0): √ᾱ_t·x_0 + √(1−ᾱ_t)·ε (slides eq. 2; Ho et al. 2020 'DDPM' eq. 4)."""
        t = self._check_t(t, x_start)
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise {tuple(noise.shape)} must match x_start {tuple(x_start.shape)}")
        # x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε (slides eq. 2; Ho et al. 2020 'DDPM' eq. 4).
        return (self.extract("sqrt_alphas_cumprod", t, x_start) * x_start
                + self.extract("sqrt_one_minus_alphas_cumprod", t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t):
        """Mean μ̃_t, variance β̃_t and clipped log-variance of q(x_{t−1} | x_t, x_0) (slides eq. 8–9; Ho et al. 2020 'DDPM' eqs. 6–7)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start {tuple(x_start.shape)} and x_t {tuple(x_t.shape)} differ in shape")
        t = self._check_t(t, x_t)
        # μ̃_t(x_t, x_0) = √ᾱ_{t−1}β_t/(1−ᾱ_t)·x_0 + √α_t(1−ᾱ_{t−1})/(1−ᾱ_t)·x_t (slides eq. 9; Ho et al. 2020 'DDPM' eq. 7).
        mean = (self.extract("posterior_mean_coef1", t, x_t) * x_start
                + self.extract("posterior_mean_coef2", t, x_t) * x_t)
        variance = self.extract("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self.extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """x̂_0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t, slides eq. 2 (Ho et al. 2020 'DDPM' eq. 4) solved for x_0."""
        t = self._check_t(t, x_t)
        # x_0 = x_t/√ᾱ_t − √(1/ᾱ_t − 1)·ε (slides eq. 2 inverted; Ho et al. 2020 'DDPM' eq. 4).
        return (self.extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self.extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t, pred_xstart: torch.Tensor) -> torch.Tensor:
        """ε = (x_t/√ᾱ_t − x̂_0)/√(1/ᾱ_t − 1), slides eq. 2 (Ho et al. 2020 'DDPM' eq. 4) solved for ε."""
        t = self._check_t(t, x_t)
        # ε = (x_t − √ᾱ_t·x_0)/√(1 − ᾱ_t) (slides eq. 2 inverted; Ho et al. 2020 'DDPM' eq. 4).
        return ((self.extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart)
                / self.extract("sqrt_recipm1_alphas_cumprod", t, x_t))

    def predict_xstart_eps(self, x_t: torch.Tensor, t, model_mean: torch.Tensor):
        """(x̂_0, ε̂) from the mean channels of a model output in this diffusion's prediction space.

        'eps': x̂_0 from slides eq. 2 inverted (Ho et al. 2020 'DDPM' eq. 4); 'v': x̂_0 = √ᾱ·x_t − √(1−ᾱ)·v̂, ε̂ = √(1−ᾱ)·x_t + √ᾱ·v̂
        (Salimans & Ho 2022, sec. 4); 'x0': ε̂ from eq. 2 inverted. Neither is clipped."""
        t = self._check_t(t, x_t)
        if self.prediction == "eps":
            return self.predict_xstart_from_eps(x_t, t, model_mean), model_mean
        if self.prediction == "x0":
            return model_mean, self.predict_eps_from_xstart(x_t, t, model_mean)
        a = self.extract("sqrt_alphas_cumprod", t, x_t)
        s = self.extract("sqrt_one_minus_alphas_cumprod", t, x_t)
        # x̂ = α_t·z_t − σ_t·v̂ and ε̂ = σ_t·z_t + α_t·v̂ (Salimans & Ho 2022, sec. 4).
        return a * x_t - s * model_mean, s * x_t + a * model_mean

    def training_target(self, x_start: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """What the mean channels regress onto for x_t = q_sample(x_start, t, noise): ε, v or x_0."""
        t = self._check_t(t, x_start)
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x_start
        # v = α_t·ε − σ_t·x_0 (Salimans & Ho 2022, sec. 4).
        return (self.extract("sqrt_alphas_cumprod", t, x_start) * noise
                - self.extract("sqrt_one_minus_alphas_cumprod", t, x_start) * x_start)

    # -- reverse process ---------------------------------------------------------------------------

    def p_xstart_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t, clip_denoised: bool = True,
                          dynamic_threshold: float | None = None) -> dict[str, torch.Tensor]:
        """Σ_θ(x_t, t) of p_θ(x_{t−1} | x_t) (slides eq. 4; Ho et al. 2020 'DDPM' eq. 1) and the denoised x̂_0, from the raw network output:
        everything a sampler needs besides the posterior mean μ̃_t(x_t, x̂_0), which it forms itself.

        Returns a dict with `variance`, `log_variance` (B×C×H×W), `pred_xstart` (x̂_0, clipped to [−1, 1] when
        `clip_denoised`, or dynamically thresholded at percentile `dynamic_threshold` ∈ (0, 1], which takes
        precedence) and `eps` (the predicted ε, before any clipping), for any prediction type.
        """
        t = self._check_t(t, x_t)
        model_mean, v = self._split_output(model_output, x_t)
        if self.model_var_type == "learned_range":
            min_log = self.extract("posterior_log_variance_clipped", t, x_t)
            max_log = self.extract("log_betas", t, x_t)
            frac = (v + 1) / 2
            # Σ_θ = exp(v·log β_t + (1 − v)·log β̃_t) (slides "learn the variance"; Nichol & Dhariwal 2021 eq. 15).
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            # fixed_small: Σ = β̃_t (slides eq. 9; Ho et al. 2020 eq. 7); fixed_large: Σ = β_t (slides eq. 1),
            # β̃_1 at t = 0 (Ho et al. 2020 §3.2; Nichol & Dhariwal 2021).
            small = self.model_var_type == "fixed_small"
            variance = self.extract("posterior_variance" if small else "large_variance", t, x_t).expand_as(x_t)
            log_variance = self.extract("posterior_log_variance_clipped" if small else "large_log_variance",
                                        t, x_t).expand_as(x_t)
        pred_xstart, eps = self.predict_xstart_eps(x_t, t, model_mean)
        if dynamic_threshold is not None:
            pred_xstart = apply_dynamic_threshold(pred_xstart, dynamic_threshold)
        elif clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        return {"variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart, "eps": eps}

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t, clip_denoised: bool = True,
                        dynamic_threshold: float | None = None) -> dict[str, torch.Tensor]:
        """Mean, variance, log-variance of p_θ(x_{t−1} | x_t) (slides eq. 4; Ho et al. 2020 eq. 1) from the raw
        network output: `p_xstart_variance` plus `mean` = μ̃_t(x_t, x̂_0)."""
        out = self.p_xstart_variance(model_output, x_t, t, clip_denoised, dynamic_threshold)
        # μ_θ = μ̃_t(x_t, x̂_0), which equals slides eq. 13 (Ho et al. 2020 eq. 11) for the unclipped x̂_0.
        out["mean"], _, _ = self.q_posterior_mean_variance(out["pred_xstart"], x_t, self._check_t(t, x_t))
        return out

    # -- bound and losses --------------------------------------------------------------------------

    def prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) ‖ N(0, I)) per sample, in bits per dimension (slides eq. 7; Ho et al. 2020 'DDPM' eq. 5)."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x_start.device)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        # L_T of slides eq. 7 (Ho et al. 2020 'DDPM' eq. 5).
        kl = normal_kl(mean, log_variance, torch.zeros_like(mean), torch.zeros_like(log_variance))
        return mean_flat(kl) / math.log(2.0)

    def vb_terms_bpd(self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t,
                     clip_denoised: bool = False) -> dict[str, torch.Tensor]:
        """One term of the bound per sample, in bits/dim: L_{t−1} = KL(q(x_{t−1}|x_t,x_0) ‖ p_θ(x_{t−1}|x_t))
        for t > 0 and L_0 = −log p_θ(x_0|x_1) (discretized 8-bit likelihood) for t = 0 (slides eq. 7; Ho et al. 2020 'DDPM' eq. 5).

        Returns `output` (B) and `pred_xstart`.
        """
        t = self._check_t(t, x_t)
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
        # L_{t−1} (slides eq. 7 / eq. 10; Ho et al. 2020 'DDPM' eqs. 5, 8).
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        # L_0 (slides eq. 7; Ho et al. 2020 'DDPM' eq. 5): discretized Gaussian decoder.
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])) / math.log(2.0)
        return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start: torch.Tensor, t, noise: torch.Tensor | None = None,
                        model_kwargs: dict | None = None) -> dict[str, torch.Tensor]:
        """Per-sample training losses at timesteps t (indices of this diffusion).

        Returns `loss`, `mse` (mean over dimensions of ‖target − output‖² in the prediction's space: ε as in
        Algorithm 1, v or x_0; unweighted), `weight` (the loss weighting's per-sample weight, 1 for
        'uniform') and `vb` (the VLB term in bits/dim with a stop-gradient mean, so it only trains the
        variance; zeros for the simple loss). loss = weight·mse, plus λ·T·vb for the hybrid loss
        (λ = 0.001 reproduces improved-diffusion's vb·T/1000). Importance weights from a timestep sampler
        are applied by the caller.
        """
        t = self._check_t(t, x_start)
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        model_output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        model_mean, v = self._split_output(model_output, x_t)
        # L_simple = ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖² (slides Algorithm 1; Ho et al. 2020 'DDPM' Algorithm 1), or its v / x_0 analogue, per dimension.
        mse = mean_flat((self.training_target(x_start, t, noise) - model_mean) ** 2)
        weight = self.extract("loss_weights", t, mse.view(-1, 1)).view(-1)
        # Weighted MSE: w_t·‖target − output‖², w_t = 1 (uniform) or the Min-SNR-γ weight (Hang et al. 2023).
        loss = weight * mse
        if self.loss_type == "hybrid":
            frozen = torch.cat([model_mean.detach(), v], dim=1)
            vb = self.vb_terms_bpd(frozen, x_start, x_t, t, clip_denoised=False)["output"]
            # L_hybrid = L_simple + λ·L_vlb with L_vlb = T·vb_t (Improved DDPM).
            loss = loss + self.vlb_weight * self.num_timesteps * vb
        else:
            vb = torch.zeros_like(mse)
        return {"loss": loss, "mse": mse, "weight": weight, "vb": vb}

    @torch.no_grad()
    def calc_bpd_loop(self, model, x_start: torch.Tensor, clip_denoised: bool = True,
                      model_kwargs: dict | None = None, generator: torch.Generator | None = None,
                      progress: bool = False) -> dict[str, torch.Tensor]:
        """The full bound of slides eq. 7 (Ho et al. 2020 'DDPM' eq. 5) per image, in bits/dim, evaluating every term t = T−1..0.

        Returns `total_bpd` (B) = `prior_bpd` (B) + sum over t of `vb` (B×T), plus `xstart_mse` (B×T) and
        `mse` (B×T, of the ε prediction).
        """
        batch = x_start.shape[0]
        vb, xstart_mse, mse = [], [], []
        steps = range(self.num_timesteps - 1, -1, -1)
        for step in tqdm(steps, disable=not progress, desc="bpd"):
            t = torch.full((batch,), step, dtype=torch.long, device=x_start.device)
            noise = _randn(x_start.shape, generator, x_start.device, x_start.dtype)
            x_t = self.q_sample(x_start, t, noise=noise)
            model_output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
            terms = self.vb_terms_bpd(model_output, x_start, x_t, t, clip_denoised=clip_denoised)
            eps = self.predict_eps_from_xstart(x_t, t, terms["pred_xstart"])
            vb.append(terms["output"])
            xstart_mse.append(mean_flat((terms["pred_xstart"] - x_start) ** 2))
            mse.append(mean_flat((eps - noise) ** 2))
        vb_t = torch.stack(vb[::-1], dim=1)
        prior = self.prior_bpd(x_start)
        return {"total_bpd": vb_t.sum(dim=1) + prior, "prior_bpd": prior, "vb": vb_t,
                "xstart_mse": torch.stack(xstart_mse[::-1], dim=1), "mse": torch.stack(mse[::-1], dim=1)}

    # -- respacing ---------------------------------------------------------------------------------

    def respace(self, timesteps: str | Iterable[int]) -> GaussianDiffusion:
        """A diffusion over the kept steps (indices of this diffusion, or a `space_timesteps` string).

        β is recomputed from the retained ᾱ (β'_i = 1 − ᾱ_{k_i}/ᾱ_{k_{i−1}}) so fixed and learned
        variances stay correct; `timestep_map` maps new indices to the original training scale.
        """
        if isinstance(timesteps, str):
            timesteps = space_timesteps(self.num_timesteps, timesteps)
        kept = sorted({int(k) for k in timesteps})
        if not kept:
            raise ValueError("respace needs at least one timestep")
        if kept[0] < 0 or kept[-1] >= self.num_timesteps:
            raise ValueError(f"respaced timesteps must lie in [0, {self.num_timesteps - 1}], got {kept[0]}..{kept[-1]}")
        alphas_cumprod = self.alphas_cumprod.numpy()[kept]
        # β'_i = 1 − ᾱ_{k_i}/ᾱ_{k_{i−1}} keeps ᾱ at the retained steps (slides eq. 2; Ho et al. 2020 'DDPM' eq. 4).
        new_betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
        return GaussianDiffusion(new_betas, model_var_type=self.model_var_type, loss_type=self.loss_type,
                                 vlb_weight=self.vlb_weight, prediction=self.prediction,
                                 loss_weighting=self.loss_weighting, min_snr_gamma=self.min_snr_gamma,
                                 timestep_map=self.timestep_map[kept],
                                 original_alphas_cumprod=self.original_alphas_cumprod)


def _randn(shape, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (reproducible for a seed), moved to device."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)

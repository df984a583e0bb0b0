"""Gaussian diffusion math shared by every stage (`GaussianDiffusion`): the tables of a β schedule, the forward
process, the posterior, the reverse-process parametrizations and respacing, on the tables of
`cascade.diffusion.schedules` and the prediction types of `cascade.diffusion.parameterization` (both
re-exported here). The variational bound and the training losses live in `cascade.diffusion.objectives`;
`GaussianDiffusion`'s methods of those names call them.

Pure math: nothing here knows about networks, data or training. A model is any callable
`model(x_t, t, **model_kwargs)` returning its prediction (C channels) or prediction‖v (2C channels, learned
variance), where the prediction is ε, v = √ᾱ·ε − √(1−ᾱ)·x_0 or x_0 (`prediction` = "eps", "v", "x0").
Timesteps are 0-indexed, t ∈ {0..T-1} (index t is the slides' t+1). All tables are float64 torch tensors
on the CPU; values are gathered per timestep and cast to the dtype/device of the tensor they act on.
Equation numbers refer to the lecture slides (not in the repository); each also names the paper's equation.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch

from cascade.checks import is_number
from cascade.diffusion import objectives
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

if TYPE_CHECKING:
    from cascade.config import StageConfig

MODEL_VAR_TYPES = ("fixed_small", "fixed_large", "learned_range")  # Σ_θ: β̃_t, β_t, or learned between them
LOSS_TYPES = ("simple", "hybrid")  # L_simple (DDPM Algorithm 1) or L_simple + λ·L_vlb (Improved DDPM)
__all__ = ["LOSS_TYPES", "LOSS_WEIGHTINGS", "MODEL_VAR_TYPES", "PREDICTIONS", "SCHEDULES", "GaussianDiffusion",
           "apply_dynamic_threshold", "aug_alpha_bar", "aug_level_from_alpha_bar", "build_diffusion",
           "check_prediction", "eps_from_v", "eps_from_xstart", "eps_shift_in_prediction", "make_betas",
           "min_snr_weight", "prediction_from_xstart_eps", "prediction_to_xstart_eps", "space_timesteps",
           "v_from_xstart_eps", "xstart_from_eps", "xstart_from_v"]


def apply_dynamic_threshold(pred_xstart: torch.Tensor, percentile: float) -> torch.Tensor:
    """Imagen's dynamic thresholding: s = max(1, percentile of |x̂_0| per sample), clamp to [−s, s], ÷ s."""
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"dynamic_threshold percentile must be in (0, 1], got {percentile}")
    flat = pred_xstart.detach().reshape(pred_xstart.shape[0], -1).abs().float()
    s = torch.quantile(flat, percentile, dim=1).clamp(min=1.0).to(pred_xstart.dtype)
    s = s.view(-1, *([1] * (pred_xstart.ndim - 1)))
    return torch.maximum(torch.minimum(pred_xstart, s), -s) / s


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
        if not is_number(vlb_weight) or not vlb_weight >= 0:
            raise ValueError(f"vlb_weight must be >= 0, got {vlb_weight!r}")
        check_prediction(prediction)
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss_weighting {loss_weighting!r}; expected one of {LOSS_WEIGHTINGS}")
        if not is_number(min_snr_gamma) or not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma!r}")
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

    def check_timesteps(self, t, x: torch.Tensor) -> torch.Tensor:
        """t as a long tensor of shape (B,) for the batch x (a scalar is broadcast). Raises ValueError for
        non-integer timesteps, a wrong shape, or (on the CPU) a timestep outside [0, T − 1]."""
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

    def split_output(self, model_output: torch.Tensor, x_t: torch.Tensor):
        """(mean channels, variance channels v or None) of a raw model output B×C·k×H×W for x_t B×C×H×W,
        k = `out_channels_factor`, cast to x_t's dtype. Raises ValueError when the shapes do not match."""
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
        t = self.check_timesteps(t, x_start)
        mean = self.extract("sqrt_alphas_cumprod", t, x_start) * x_start
        variance = (1.0 - self.extract("alphas_cumprod", t, x_start)).expand_as(x_start)
        log_variance = self.extract("log_one_minus_alphas_cumprod", t, x_start).expand_as(x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0): √ᾱ_t·x_0 + √(1−ᾱ_t)·ε (slides eq. 2; Ho et al. 2020 'DDPM' eq. 4)."""
        t = self.check_timesteps(t, x_start)
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
        t = self.check_timesteps(t, x_t)
        # μ̃_t(x_t, x_0) = √ᾱ_{t−1}β_t/(1−ᾱ_t)·x_0 + √α_t(1−ᾱ_{t−1})/(1−ᾱ_t)·x_t (slides eq. 9; Ho et al. 2020 'DDPM' eq. 7).
        mean = (self.extract("posterior_mean_coef1", t, x_t) * x_start
                + self.extract("posterior_mean_coef2", t, x_t) * x_t)
        variance = self.extract("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self.extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """x̂_0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t, slides eq. 2 (Ho et al. 2020 'DDPM' eq. 4) solved for x_0."""
        t = self.check_timesteps(t, x_t)
        # x_0 = x_t/√ᾱ_t − √(1/ᾱ_t − 1)·ε (slides eq. 2 inverted; Ho et al. 2020 'DDPM' eq. 4).
        return (self.extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self.extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t, pred_xstart: torch.Tensor) -> torch.Tensor:
        """ε = (x_t/√ᾱ_t − x̂_0)/√(1/ᾱ_t − 1), slides eq. 2 (Ho et al. 2020 'DDPM' eq. 4) solved for ε."""
        t = self.check_timesteps(t, x_t)
        # ε = (x_t − √ᾱ_t·x_0)/√(1 − ᾱ_t) (slides eq. 2 inverted; Ho et al. 2020 'DDPM' eq. 4).
        return ((self.extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - pred_xstart)
                / self.extract("sqrt_recipm1_alphas_cumprod", t, x_t))

    def predict_xstart_eps(self, x_t: torch.Tensor, t, model_mean: torch.Tensor):
        """(x̂_0, ε̂) from the mean channels of a model output in this diffusion's prediction space.

        'eps': x̂_0 from slides eq. 2 inverted (Ho et al. 2020 'DDPM' eq. 4); 'v': x̂_0 = √ᾱ·x_t − √(1−ᾱ)·v̂, ε̂ = √(1−ᾱ)·x_t + √ᾱ·v̂
        (Salimans & Ho 2022, sec. 4); 'x0': ε̂ from eq. 2 inverted. Neither is clipped."""
        t = self.check_timesteps(t, x_t)
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
        t = self.check_timesteps(t, x_start)
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
        t = self.check_timesteps(t, x_t)
        model_mean, v = self.split_output(model_output, x_t)
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
        out["mean"], _, _ = self.q_posterior_mean_variance(out["pred_xstart"], x_t, self.check_timesteps(t, x_t))
        return out

    # -- bound and losses --------------------------------------------------------------------------

    def prior_bpd(self, x_start: torch.Tensor) -> torch.Tensor:
        """L_T per sample in bits/dim: `cascade.diffusion.objectives.prior_bpd`."""
        return objectives.prior_bpd(self, x_start)

    def vb_terms_bpd(self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t,
                     clip_denoised: bool = False) -> dict[str, torch.Tensor]:
        """One term of the bound per sample in bits/dim: `cascade.diffusion.objectives.vb_terms_bpd`."""
        return objectives.vb_terms_bpd(self, model_output, x_start, x_t, t, clip_denoised)

    def training_losses(self, model, x_start: torch.Tensor, t, noise: torch.Tensor | None = None,
                        model_kwargs: dict | None = None) -> dict[str, torch.Tensor]:
        """Per-sample training losses at timesteps t: `cascade.diffusion.objectives.training_losses`."""
        return objectives.training_losses(self, model, x_start, t, noise, model_kwargs)

    def calc_bpd_loop(self, model, x_start: torch.Tensor, clip_denoised: bool = True,
                      model_kwargs: dict | None = None, generator: torch.Generator | None = None,
                      progress: bool = False) -> dict[str, torch.Tensor]:
        """The full bound per image in bits/dim: `cascade.diffusion.objectives.calc_bpd_loop`."""
        return objectives.calc_bpd_loop(self, model, x_start, clip_denoised, model_kwargs, generator, progress)

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


def build_diffusion(cfg: StageConfig) -> GaussianDiffusion:
    """The stage's `GaussianDiffusion` (for a classifier stage: the noising it trains on), from the fields of
    its already validated ``cfg.diffusion`` (`cascade.config.DiffusionConfig`): schedule, T, variance type,
    loss, λ, prediction and loss weighting."""
    d = cfg.diffusion
    return GaussianDiffusion(
        make_betas(d.schedule, d.num_timesteps),
        model_var_type=d.model_var_type,
        loss_type=d.loss,
        vlb_weight=d.vlb_weight,
        prediction=d.prediction,
        loss_weighting=d.loss_weighting,
        min_snr_gamma=d.min_snr_gamma,
    )

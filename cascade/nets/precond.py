"""Preconditioning wrappers around a backbone network (as EDM's `EDMPrecond` wraps its network).

`ConditioningSkip` adds to a super-resolution backbone's mean output the posterior mean of the target
(ε, v or x_0) under a Gaussian prior centred on the upsampled low-resolution input, so the network only
learns the residual. It holds the diffusion's ᾱ table; the backbone knows nothing about ᾱ.
"""

from __future__ import annotations

import torch
from torch import nn

from cascade.checks import is_number
from cascade.diffusion.parameterization import check_prediction
from cascade.diffusion.schedules import aug_alpha_bar
from cascade.imageops import upsample

_BACKBONE = "backbone."


class ConditioningSkip(nn.Module):
    """Backbone output + E[target | x_t] if x_0 ~ N(x_up, σ²I), σ² = cond_skip_std² + (1 − ᾱ(s)).

    Call ``model(x_t, t, y=None, x_low=None, aug_level=None)`` (a distilled student's backbone also ``w=``) exactly
    like the backbone (a UNet with
    ``low_resolution`` set): x_t: B×C×R×R; t: B timesteps on the training scale of `alphas_cumprod`
    (T entries, each in (0, 1)); x_low: B×C×r×r in [−1, 1], upsampled to R with
    `cascade.imageops.upsample` into x_up; aug_level: B levels s ∈ [0, 1] (their ᾱ(s) from
    `cascade.diffusion.schedules.aug_alpha_bar`). The skip is added in float32 (also under autocast) to the first C
    output channels; any variance channels pass through. Returns the backbone's output shape, in x_t's
    dtype.

    Derivation (a = √ᾱ_t, s = √(1 − ᾱ_t), r = x_t − a·x_up, D = ᾱ_t·σ² + 1 − ᾱ_t): x_t = a·x_0 + s·ε
    (slides eq. 2; Ho et al. 2020 'DDPM' eq. 4) with x_0 ~ N(x_up, σ²I) makes (x_0, ε, x_t) jointly Gaussian, so
      E[ε | x_t]   = s·r/D,
      E[x_0 | x_t] = x_up + a·σ²·r/D,
      E[v | x_t]   = a·E[ε | x_t] − s·E[x_0 | x_t] = a·s·(1 − σ²)·r/D − s·x_up
    (v = √ᾱ·ε − √(1−ᾱ)·x_0, Salimans & Ho 2022). Each is the minimum-MSE estimate of its target under
    that prior, so the network starts at the prior's answer whatever its prediction type.

    The wrapper has no parameters or persistent buffers: its state dict is the backbone's with the same
    keys as the bare backbone (checkpoints of either load into the other). Raises ValueError unless
    cond_skip_std > 0, the backbone is a super-resolution network (`low_resolution` set) and the
    prediction type is one of "eps", "v", "x0".
    """

    def __init__(self, backbone: nn.Module, cond_skip_std: float, alphas_cumprod, prediction: str = "eps"):
        super().__init__()
        if not is_number(cond_skip_std) or not cond_skip_std > 0:
            raise ValueError(f"cond_skip_std must be > 0 for a conditioning skip, got {cond_skip_std!r}")
        if getattr(backbone, "low_resolution", None) is None:
            raise ValueError("cond_skip_std needs a super-resolution backbone (low_resolution set)")
        self.backbone = backbone
        self.cond_skip_std = float(cond_skip_std)
        self.prediction = check_prediction(prediction)
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float32)
        if alphas_cumprod.ndim != 1 or not bool(((alphas_cumprod > 0) & (alphas_cumprod < 1)).all()):
            raise ValueError("alphas_cumprod must be a 1-D table of values in (0, 1)")
        self.register_buffer("skip_alphas_cumprod", alphas_cumprod, persistent=False)
        self.register_state_dict_post_hook(_drop_backbone_prefix)
        self.register_load_state_dict_pre_hook(_add_backbone_prefix)

    @property
    def null_class(self) -> int | None:
        return self.backbone.null_class

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                x_low: torch.Tensor | None = None, aug_level: torch.Tensor | None = None,
                **student_inputs: torch.Tensor) -> torch.Tensor:
        # checks every input; student_inputs: a distilled student's w
        out = self.backbone(x_t, t, y=y, x_low=x_low, aug_level=aug_level, **student_inputs)
        x_up = upsample(x_low, x_t.shape[-1]).to(x_t.dtype)
        skip = self.skip(x_t, t, x_up, aug_level)  # float32, also under autocast
        channels = x_t.shape[1]
        out = torch.cat([out[:, :channels].float() + skip, out[:, channels:].float()], dim=1)
        return out.to(x_t.dtype)

    def skip(self, x_t: torch.Tensor, t: torch.Tensor, x_up: torch.Tensor, aug_level: torch.Tensor) -> torch.Tensor:
        """E[target | x_t] (float32, B×C×R×R) under x_0 ~ N(x_up, σ²I) for this wrapper's prediction type."""
        alpha_bar = self.skip_alphas_cumprod[t.long()].view(-1, 1, 1, 1)
        # range-checked on CPU only: a check on CUDA would force a host sync every step (as for class indices)
        alpha_bar_s = aug_alpha_bar(aug_level.float(), check=aug_level.device.type == "cpu")
        var = self.cond_skip_std**2 + (1.0 - alpha_bar_s).to(alpha_bar.dtype).view(-1, 1, 1, 1)
        a, s = alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt()
        x_up = x_up.float()
        # r/D with r = x_t − √ᾱ_t·μ, D = ᾱ_t·σ² + 1 − ᾱ_t: the Gaussian posterior's shared factor (slides eq. 2; Ho et al. 2020 'DDPM' eq. 4).
        scaled = (x_t.float() - a * x_up) / (alpha_bar * var + 1.0 - alpha_bar)
        if self.prediction == "eps":
            return s * scaled  # E[ε | x_t] = √(1−ᾱ_t)·r/D
        if self.prediction == "x0":
            return x_up + a * var * scaled  # E[x_0 | x_t] = μ + √ᾱ_t·σ²·r/D
        return a * s * (1.0 - var) * scaled - s * x_up  # E[v | x_t] = √ᾱ·E[ε|x_t] − √(1−ᾱ)·E[x_0|x_t]


def _drop_backbone_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict post hook: save the backbone's entries under the bare backbone's keys."""
    for key in [k for k in state_dict if k.startswith(prefix + _BACKBONE)]:
        state_dict[prefix + key[len(prefix + _BACKBONE):]] = state_dict.pop(key)


def _add_backbone_prefix(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Load pre hook: accept the bare backbone's keys (and, unchanged, already prefixed ones)."""
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + _BACKBONE)]:
        state_dict[prefix + _BACKBONE + key[len(prefix):]] = state_dict.pop(key)

"""Magnitude-preserving building blocks (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", EDM2 §2 and Table 1, Configs C, D and F).

Each block keeps activations of unit magnitude (per-element RMS 1) when its inputs have unit magnitude:

- `MPConv2d` / `MPLinear` (Configs C and D): the weight of each output unit is used normalised,
  ŵ_i = w_i/‖w_i‖₂ (computed as normalize(w_i)/√fan_in), so for i.i.d. unit-variance inputs the output has
  unit variance whatever the stored weights; in training the stored weights are also forced to
  normalize(w) (each element of unit RMS) before use, under no_grad (forced weight normalisation, Config D), so
  Adam's updates keep the same size relative to the weights for the whole run. No bias (EDM2 Config B).
- `mp_silu` / `MPSiLU` (Config F): SiLU(x)/0.596, 0.596 = √E[SiLU(z)²] for z ~ N(0, 1).
- `mp_sum` (Config F): ((1 − t)·a + t·b)/√((1 − t)² + t²), a weighted sum of two unit-magnitude terms that has
  unit magnitude; `mp_residual` is it with EDM2's residual balance t = 0.3.
- `mp_cat` (Config F): concatenation along channels scaled so that both parts contribute (1 − t)² : t² of the
  result's energy and the result has unit magnitude.

`zero_init_` starts a layer's output at zero: an `nn.Conv2d` / `nn.Linear` by zero weights and bias (ADM), a
magnitude-preserving layer by a learned scalar gain initialised to 0 (EDM2's output and embedding gains), since
its normalised weights cannot be zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MP_SILU_SCALE", "RESIDUAL_BALANCE", "MPConv2d", "MPLinear", "MPSiLU", "mp_cat", "mp_residual",
           "mp_silu", "mp_sum", "normalize", "zero_init_"]

# √E[SiLU(z)²] for z ~ N(0, 1) (EDM2 Config F): SiLU of a unit-variance input divided by it has unit magnitude.
MP_SILU_SCALE = 0.596
# EDM2's blend t of a residual branch into its stream (its residual and attention balance, Config F).
RESIDUAL_BALANCE = 0.3
# ε of `normalize` (EDM2's), so an all-zero weight row does not divide by zero.
NORMALIZE_EPS = 1e-4


def normalize(w: torch.Tensor, eps: float = NORMALIZE_EPS) -> torch.Tensor:
    """Each output unit's weights (dim 0; the rest is its fan-in N) scaled to unit RMS: w_i/(ε + ‖w_i‖₂/√N) (EDM2
    Config D), in float32 whatever ``w``'s dtype. Shape of ``w``: out × fan-in dims."""
    w = w.float()
    fan_in = w[0].numel()
    norm = torch.linalg.vector_norm(w, dim=tuple(range(1, w.ndim)), keepdim=True)
    return w / (eps + norm / math.sqrt(fan_in))  # w_i/(ε + ‖w_i‖/√N) (EDM2 Config D, normalize)


class _MPWeight(nn.Module):
    """A weight of shape ``shape`` (out first) stored at unit-RMS rows and used as ŵ = normalize(w)/√fan_in
    (times ``gain`` once `zero_init_` gave it one)."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(shape))
        self.register_parameter("gain", None)
        self.fan_in = math.prod(shape[1:])

    def effective_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """ŵ in ``dtype``; in training, first w ← normalize(w) in place under no_grad (EDM2 Config D, forced weight
        normalisation)."""
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight))
        w = normalize(self.weight) / math.sqrt(self.fan_in)  # ŵ_i = w_i/‖w_i‖₂ (EDM2 Config C)
        if self.gain is not None:
            w = w * self.gain
        return w.to(dtype)


class MPConv2d(_MPWeight):
    """Magnitude-preserving 2-D convolution (EDM2 Configs C, D): B×C_in×H×W → B×C_out×H'×W' with the normalised
    weight ŵ, no bias; the arguments are those of `nn.Conv2d` it takes (``padding`` as there). Keeps the input's
    memory format (channels_last) and dtype (bf16 under autocast)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0):
        super().__init__((out_channels, in_channels, kernel_size, kernel_size))
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.effective_weight(x.dtype), padding=self.padding)


class MPLinear(_MPWeight):
    """Magnitude-preserving linear layer (EDM2 Configs C, D): …×in → …×out with the normalised weight ŵ, no bias."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__((out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(x.dtype))


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU(x)/0.596: unit magnitude for unit-variance x (EDM2 Config F). Any shape."""
    return F.silu(x) / MP_SILU_SCALE  # MP-SiLU (EDM2 Config F)


class MPSiLU(nn.Module):
    """`mp_silu` as a module (for `nn.Sequential`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mp_silu(x)


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """((1 − t)·a + t·b)/√((1 − t)² + t²) for t in [0, 1] (EDM2 Config F, MP-Sum): unit magnitude for uncorrelated
    unit-magnitude a and b of one shape (or broadcastable)."""
    return ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t**2)  # MP-Sum (EDM2 Config F)


def mp_residual(x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """A residual branch blended into its stream: `mp_sum` with t = `RESIDUAL_BALANCE` (EDM2 Config F)."""
    return mp_sum(x, branch, RESIDUAL_BALANCE)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation of a (N_a channels along ``dim``) and b (N_b) as [(1 − t)·C/√N_a · a, t·C/√N_b · b] with
    C = √((N_a + N_b)/((1 − t)² + t²)) (EDM2 Config F, MP-Cat): unit magnitude for unit-magnitude a and b, each
    contributing in proportion (1 − t)² : t² whatever their widths. t in [0, 1]."""
    n_a, n_b = a.shape[dim], b.shape[dim]
    c = math.sqrt((n_a + n_b) / ((1 - t) ** 2 + t**2))  # C of MP-Cat (EDM2 Config F)
    # [(1 − t)·C/√N_a · a, t·C/√N_b · b] (EDM2 Config F, MP-Cat)
    return torch.cat([a * ((1 - t) * c / math.sqrt(n_a)), b * (t * c / math.sqrt(n_b))], dim=dim)


def zero_init_(layer: nn.Module) -> None:
    """Make ``layer``'s output start at zero: zero weight and bias of an `nn.Conv2d` / `nn.Linear` (ADM); a learned
    scalar gain initialised to 0 on an `MPConv2d` / `MPLinear` (EDM2's output and embedding gains). TypeError for
    another kind of layer."""
    if isinstance(layer, _MPWeight):
        layer.gain = nn.Parameter(torch.zeros((), device=layer.weight.device))
    elif isinstance(layer, (nn.Conv2d, nn.Linear)):
        nn.init.zeros_(layer.weight)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    else:
        raise TypeError(f"zero_init_ takes a convolution or linear layer, got {type(layer).__name__}")

"""Group normalisation (Wu & He 2018 "Group Normalization" eq. 1–3) with a fast backward for channels_last on CPU.

`GroupNorm` is ``nn.GroupNorm`` (same parameters, state dict and values) that works around PyTorch's CPU kernels
for channels_last input, which are slow in bf16 (the backward everywhere, the forward on maps of 16² and
smaller; docs/results/2026-12-07.md): for 4-D channels_last inputs on CPU the backward is computed in closed form
from per-(sample, channel) sums, and the forward on small maps runs the contiguous kernel on a copy. Everywhere
else (contiguous inputs, CUDA) it is ``F.group_norm``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GroupNorm", "group_norm"]

# Pixels per map up to which the forward runs PyTorch's contiguous kernel on a copy (16²: bf16 0.5 against 12 ms for
# the channels_last kernel at 64×32 channels; docs/results/2026-12-07.md).
SMALL_MAP = 256


class _ChannelsLastGroupNorm(torch.autograd.Function):
    """y = x̂·γ + β, x̂ = (x − μ_g)·rstd_g (Wu & He 2018 eq. 1–3), or with a per-sample modulation
    y = x̂·γ(1 + scale) + β(1 + scale) + shift (ADM's scale-shift norm, Dhariwal & Nichol 2021 §3), whose backward
    is computed in closed form from per-(sample, channel) sums. scale, shift: N×C or None."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, shift, groups: int, eps: float):
        n, c, h, w = x.shape
        small = h * w <= SMALL_MAP  # the channels_last forward kernel is slow on small maps: use a contiguous copy
        source = x.contiguous() if small else x
        if scale is None:
            y, mean, rstd = torch.native_group_norm(source, weight, bias, n, c, h * w, groups, eps)  # N×G fp32 stats
        else:
            x_hat, mean, rstd = torch.native_group_norm(source, None, None, n, c, h * w, groups, eps)
            scale, shift = scale.to(weight.dtype), shift.to(weight.dtype)
            gain = weight * (1 + scale)  # γ(1 + scale): N×C
            offset = torch.addcmul(shift, bias, 1 + scale)  # β(1 + scale) + shift
            y = torch.addcmul(offset.to(x.dtype)[:, :, None, None], x_hat, gain.to(x.dtype)[:, :, None, None])
        if small:
            y = y.contiguous(memory_format=torch.channels_last)
        ctx.save_for_backward(x, weight, bias, scale, mean, rstd)
        ctx.groups = groups
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, scale, mean, rstd = ctx.saved_tensors
        n, c, h, w = x.shape
        g = ctx.groups
        per = c // g
        dy = dy.contiguous(memory_format=torch.channels_last)
        mu, r = mean.view(n, g, 1), rstd.view(n, g, 1)
        # Per-(sample, channel) sums over the pixels, accumulated in float32 (returned in the input's dtype: a
        # float32 result would first copy the whole input to float32): Σ dy, Σ dy·x and so Σ dy·x̂, x̂ = (x − μ)·rstd.
        acc = mean.dtype  # float32, or float64 for float64 input
        s_dy = dy.sum((2, 3)).to(acc)
        mu_c, r_c = mu.expand(n, g, per).reshape(n, c), r.expand(n, g, per).reshape(n, c)
        s_dy_xhat = ((dy * x).sum((2, 3)).to(acc) - mu_c * s_dy) * r_c
        weight = weight.to(acc)
        gain = weight.expand(n, c) if scale is None else weight * (1 + scale.to(acc))  # the x̂ coefficient
        # ∂L/∂x = rstd·(a·dy − mean_g(a·dy) − x̂·mean_g(a·dy·x̂)), a the x̂ coefficient (Wu & He 2018 eq. 1–3
        # differentiated) = a·rstd·dy + b·x + c0 per (sample, channel):
        count = per * h * w
        mean_g = (gain * s_dy).view(n, g, per).sum(2, keepdim=True) / count  # mean over the group of a·dy
        mean_gx = (gain * s_dy_xhat).view(n, g, per).sum(2, keepdim=True) / count  # mean of a·dy·x̂
        a = gain.view(n, g, per) * r
        b = (-r * r * mean_gx).expand(n, g, per)
        c0 = (-r * mean_g - b * mu).expand(n, g, per)
        dx = torch.addcmul(c0.reshape(n, c, 1, 1).to(dy.dtype), a.reshape(n, c, 1, 1).to(dy.dtype), dy)
        dx.addcmul_(b.reshape(n, c, 1, 1).to(dy.dtype), x)
        if scale is None:
            return dx, s_dy_xhat.sum(0), s_dy.sum(0), None, None, None, None  # ∂L/∂γ = Σ dy·x̂, ∂L/∂β = Σ dy
        one_plus = 1 + scale.to(acc)
        grad_weight = (s_dy_xhat * one_plus).sum(0)  # y = x̂·γ(1+s) + β(1+s) + shift
        grad_bias = (s_dy * one_plus).sum(0)
        grad_scale = (s_dy_xhat * weight + s_dy * bias.to(acc)).to(scale.dtype)
        return dx, grad_weight, grad_bias, grad_scale, s_dy.to(scale.dtype), None, None


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (Wu & He 2018 eq. 1–3) that also applies ADM's per-sample scale-shift: ``forward(x,
    scale=None, shift=None)``: GN(x)·(1 + scale) + shift with scale, shift N×C×1×1 (Dhariwal & Nichol 2021 §3).
    On CPU channels_last input its backward is computed in closed form (`_ChannelsLastGroupNorm`), and the
    scale-shift is folded into the normalisation's affine there (one pass over the map, and none in the backward);
    values and gradients equal ``F.group_norm``'s up to rounding (bf16: within two bf16 units of the largest
    entry)."""

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                shift: torch.Tensor | None = None) -> torch.Tensor:
        if (x.device.type == "cpu" and x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)
                and not x.is_contiguous()):
            if torch.is_grad_enabled() or scale is not None:
                flat = (None, None) if scale is None else (scale.flatten(1), shift.flatten(1))
                return _ChannelsLastGroupNorm.apply(x, self.weight, self.bias, *flat, self.num_groups, self.eps)
            if x.shape[2] * x.shape[3] <= SMALL_MAP:
                y = F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
                return y.contiguous(memory_format=torch.channels_last)
        y = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return y if scale is None else torch.addcmul(shift, y, 1 + scale)  # GN(x)·(1+scale) + shift


def group_norm(channels: int, max_groups: int = 32) -> GroupNorm:
    """`GroupNorm` with gcd(max_groups, channels) groups, so narrow (tiny) widths stay valid."""
    return GroupNorm(math.gcd(max_groups, channels), channels)

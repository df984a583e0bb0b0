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
    """y = (x − μ_g)·rstd_g·γ_c + β_c (Wu & He 2018 eq. 1–3), its backward in closed form from per-channel sums."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float):
        n, c, h, w = x.shape
        if h * w <= SMALL_MAP:  # the channels_last forward kernel is slow on small maps: run it on a contiguous copy
            y, mean, rstd = torch.native_group_norm(x.contiguous(), weight, bias, n, c, h * w, groups, eps)
            y = y.contiguous(memory_format=torch.channels_last)
        else:
            y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, h * w, groups, eps)  # mean, rstd: N×G fp32
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.groups = groups
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        n, c, h, w = x.shape
        g = ctx.groups
        per = c // g
        dy = dy.contiguous(memory_format=torch.channels_last)
        mu, r = mean.view(n, g, 1), rstd.view(n, g, 1)
        x_centred = x - mu.expand(n, g, per).reshape(n, c, 1, 1).to(x.dtype)  # x − μ
        # Per-(sample, channel) sums over the pixels, accumulated in float32 (returned in the input's dtype: a
        # float32 result would first copy the whole input to float32): Σ dy and Σ dy·x̂, x̂ = (x − μ)·rstd.
        s_dy = dy.sum((2, 3)).float().view(n, g, per)
        s_dy_xhat = (dy * x_centred).sum((2, 3)).float().view(n, g, per) * r
        gamma = (weight.float() if weight is not None else torch.ones(c, device=x.device)).view(1, g, per)
        grad_weight = s_dy_xhat.sum(0).reshape(c) if weight is not None else None  # ∂L/∂γ_c = Σ dy·x̂
        grad_bias = s_dy.sum(0).reshape(c) if weight is not None else None  # ∂L/∂β_c = Σ dy
        count = per * h * w
        mean_g = (gamma * s_dy).sum(2, keepdim=True) / count  # mean over the group of γ·dy
        mean_gx = (gamma * s_dy_xhat).sum(2, keepdim=True) / count  # mean over the group of γ·dy·x̂
        # ∂L/∂x = rstd·(γ·dy − mean(γ·dy) − x̂·mean(γ·dy·x̂))  (Wu & He 2018 eq. 1–3 differentiated)
        #       = a·dy + b·(x − μ) + c0, per (sample, channel):
        a = (r * gamma).reshape(n, c, 1, 1)
        b = (-r * r * mean_gx).expand(n, g, per).reshape(n, c, 1, 1)
        c0 = (-r * mean_g).expand(n, g, per).reshape(n, c, 1, 1)
        dx = torch.addcmul(c0.to(dy.dtype), a.to(dy.dtype), dy)
        dx.addcmul_(b.to(dy.dtype), x_centred)
        return dx, grad_weight, grad_bias, None, None


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (Wu & He 2018 eq. 1–3) whose training backward on CPU channels_last input is computed in
    closed form (`_ChannelsLastGroupNorm`); values and gradients equal ``F.group_norm``'s up to rounding (bf16:
    within two bf16 units of the largest gradient entry)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)
                and not x.is_contiguous()):
            if torch.is_grad_enabled():
                return _ChannelsLastGroupNorm.apply(x, self.weight, self.bias, self.num_groups, self.eps)
            if x.shape[2] * x.shape[3] <= SMALL_MAP:
                y = F.group_norm(x.contiguous(), self.num_groups, self.weight, self.bias, self.eps)
                return y.contiguous(memory_format=torch.channels_last)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def group_norm(channels: int, max_groups: int = 32) -> GroupNorm:
    """`GroupNorm` with gcd(max_groups, channels) groups, so narrow (tiny) widths stay valid."""
    return GroupNorm(math.gcd(max_groups, channels), channels)

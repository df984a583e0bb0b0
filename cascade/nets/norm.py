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
from torch.autograd.function import once_differentiable

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
        # mean, rstd: N×G in float32 for low-precision input (the float32 affine makes the call mixed-precision)
        y, mean, rstd = torch.native_group_norm(source, weight, bias, n, c, h * w, groups, eps)
        if scale is not None:  # GN(x)·(1 + scale) + shift
            y = torch.addcmul(shift.to(y.dtype)[:, :, None, None], y, (1 + scale).to(y.dtype)[:, :, None, None])
        if small:
            y = y.contiguous(memory_format=torch.channels_last)
        ctx.save_for_backward(x, weight, bias, scale, mean, rstd)
        ctx.groups = groups
        return y

    @staticmethod
    @once_differentiable
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
        mu_c, r_c = mu.expand(n, g, per).reshape(n, c), r.expand(n, g, per).reshape(n, c)
        # Low precision: centre x first (x − μ rounds once, relative to x − μ), so a large group mean does not cancel
        # against rounded products below.
        low = x.dtype in (torch.float16, torch.bfloat16)
        xc = x - mu_c[:, :, None, None].to(x.dtype) if low else x
        s_dy = dy.sum((2, 3)).to(acc)
        s_dy_xc = (dy * xc).sum((2, 3)).to(acc)
        s_dy_xhat = (s_dy_xc if low else s_dy_xc - mu_c * s_dy) * r_c
        weight = weight.to(acc)
        gain = weight.expand(n, c) if scale is None else weight * (1 + scale.to(acc))  # the x̂ coefficient
        # ∂L/∂x = rstd·(a·dy − mean_g(a·dy) − x̂·mean_g(a·dy·x̂)), a the x̂ coefficient (Wu & He 2018 eq. 1–3
        # differentiated) = a·rstd·dy + b·xc + c0 per (sample, channel), xc = x − μ or x:
        count = per * h * w
        mean_g = (gain * s_dy).view(n, g, per).sum(2, keepdim=True) / count  # mean over the group of a·dy
        mean_gx = (gain * s_dy_xhat).view(n, g, per).sum(2, keepdim=True) / count  # mean of a·dy·x̂
        a = gain.view(n, g, per) * r
        b = (-r * r * mean_gx).expand(n, g, per)
        c0 = (-r * mean_g - (0 if low else b * mu)).expand(n, g, per)
        dx = torch.addcmul(c0.reshape(n, c, 1, 1).to(dy.dtype), a.reshape(n, c, 1, 1).to(dy.dtype), dy)
        dx.addcmul_(b.reshape(n, c, 1, 1).to(dy.dtype), xc)
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
    On CPU channels_last input (affine, the default) its backward, scale-shift included, is computed in closed form
    (`_ChannelsLastGroupNorm`: no separate backward pass for the scale-shift); values and gradients equal
    ``F.group_norm``'s up to rounding (bf16: within a few bf16 units of the largest entry). ValueError when only one
    of scale and shift is given."""

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                shift: torch.Tensor | None = None) -> torch.Tensor:
        if (scale is None) != (shift is None):
            raise ValueError("GroupNorm takes scale and shift together (N×C×1×1 each) or neither")
        if (self.affine and x.device.type == "cpu" and x.ndim == 4
                and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()):
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

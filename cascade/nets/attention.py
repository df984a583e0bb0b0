"""Attention for the UNet: multi-head self-attention over pixels and cross-attention to class tokens.

Both use softmax(QKᵀ/√d)·V (slides eq. 15; Rombach et al. 2022 'LDM' eq. 3; Vaswani et al. 2017) through ``F.scaled_dot_product_attention``, or xformers'
memory-efficient kernel when xformers is importable and the tensors are on CUDA.

Kernel choice on CPU (:func:`attention`): float32 goes to SDPA (its flash kernel). For bf16/fp16 with at most
``SHORT_SEQUENCE`` query tokens (maps up to 16²) the flash kernel's low-precision backward is dominated by
per-block overhead (4.5 ms per call at 64 tokens on a bf16-native Xeon; 3–5× the float32 kernel on an AVX2 EPYC), so
there: in training (gradients needed) the attention is written out, logits and softmax in float32 and the
probabilities times V in low precision (about half the float32 flash kernel's forward + backward time,
docs/results/2026-12-07.md); in inference it runs in float32 and is cast back (the upcast costs O(N·d) against the
attention's O(N²·d)). Longer low-precision sequences keep the low-precision flash kernel.

Layout: feature maps are B×C×H×W; in channels_last memory that is B×H×W×C, so the pixel tokens
B×(H·W)×C are a free view and the projections are plain ``nn.Linear`` matmuls with no transposes.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from cascade.nets.mp_layers import MPLinear, mp_residual
from cascade.nets.norm import group_norm

try:  # optional GPU extra
    import xformers.ops as _xops
except ImportError:  # pragma: no cover - depends on the environment
    _xops = None


# Query tokens up to which low-precision attention on CPU runs in float32 (see the module docstring).
SHORT_SEQUENCE = 256


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # SDPA wants B×heads×N×d: these transposes are views, not copies.
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(QKᵀ/√d)·V (slides eq. 15; Rombach et al. 2022 'LDM' eq. 3) for q: B×N×H×d, k, v: B×M×H×d (tokens, heads, head dim) → B×N×H×d.

    Uses xformers on CUDA when available, otherwise ``F.scaled_dot_product_attention``; on CPU, bf16/fp16
    inputs with N ≤ ``SHORT_SEQUENCE`` are attended by `explicit_attention` when gradients are needed and in float32 otherwise (outside autocast), returned in their dtype. Raises ValueError
    unless q, k, v are 4-D.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects B×N×heads×d tensors, got {tuple(q.shape)}, {tuple(k.shape)}")
    if _xops is not None and q.is_cuda:
        return _xops.memory_efficient_attention(q, k, v)
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and q.shape[1] <= SHORT_SEQUENCE:
        with torch.autocast("cpu", enabled=False):  # autocast would cast the inputs to other dtypes
            if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
                return explicit_attention(q, k, v)
            return _sdpa(q.float(), k.float(), v.float()).to(q.dtype)
    return _sdpa(q, k, v)


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(QKᵀ/√d)·V (slides eq. 15; Rombach et al. 2022 'LDM' eq. 3) written out: the logits and the softmax in
    float32, the probabilities cast to V's dtype for the second matmul; same layout as :func:`attention`."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # B×heads×N×d views
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))  # QKᵀ/√d (LDM eq. 3)
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v).transpose(1, 2)  # softmax(·)·V (LDM eq. 3)


def _num_heads(channels: int, head_channels: int) -> int:
    if head_channels <= 0 or channels % head_channels != 0:
        raise ValueError(
            f"channels ({channels}) must be a positive multiple of head_channels ({head_channels})"
        )
    return channels // head_channels


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """B×C×H×W → B×(H·W)×C (a view for channels_last input)."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)


def _image(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """B×(H·W)×C → B×C×H×W in channels_last memory (a view)."""
    b, _, c = tokens.shape
    return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)


def _output(channels: int, magnitude_preserving: bool):
    """An attention block's output projection and residual sum: a zero-initialised linear layer and x + h, or an MP
    linear layer and MP-Sum (EDM2 Configs C, F)."""
    if magnitude_preserving:
        return MPLinear(channels, channels), mp_residual
    proj = nn.Linear(channels, channels)
    nn.init.zeros_(proj.weight)
    nn.init.zeros_(proj.bias)
    return proj, operator.add


class SelfAttention2d(nn.Module):
    """Residual multi-head self-attention over the pixels of a feature map (zero-initialized output).
    ``magnitude_preserving``: MP linear layers and an MP-Sum residual instead (EDM2 Configs C, F)."""

    def __init__(self, channels: int, head_channels: int = 64, norm_groups: int = 32,
                 magnitude_preserving: bool = False):
        super().__init__()
        self.num_heads = _num_heads(channels, head_channels)
        self.norm = group_norm(channels, norm_groups)
        self.qkv = (MPLinear if magnitude_preserving else nn.Linear)(channels, 3 * channels)
        self.proj, self.residual = _output(channels, magnitude_preserving)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(_tokens(self.norm(x))).view(b, h * w, 3, self.num_heads, c // self.num_heads)
        out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).reshape(b, h * w, c)
        return self.residual(x, _image(self.proj(out), h, w))


class CrossAttention2d(nn.Module):
    """Residual cross-attention: Q = W_Q·φ(z) from pixels, K, V = W_K·τ(y), W_V·τ(y) from tokens (slides eq. 15; Rombach et al. 2022 'LDM' eq. 3).
    ``magnitude_preserving``: MP linear layers and an MP-Sum residual instead (EDM2 Configs C, F)."""

    def __init__(self, channels: int, context_dim: int, head_channels: int = 64, norm_groups: int = 32,
                 magnitude_preserving: bool = False):
        super().__init__()
        self.num_heads = _num_heads(channels, head_channels)
        self.norm = group_norm(channels, norm_groups)
        linear = MPLinear if magnitude_preserving else nn.Linear
        self.to_q = linear(channels, channels)
        self.to_kv = linear(context_dim, 2 * channels)
        self.proj, self.residual = _output(channels, magnitude_preserving)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if context.ndim != 3 or context.shape[0] != b:
            raise ValueError(f"context must be B×M×D with B={b}, got {tuple(context.shape)}")
        d = c // self.num_heads
        q = self.to_q(_tokens(self.norm(x))).view(b, h * w, self.num_heads, d)
        kv = self.to_kv(context).view(b, context.shape[1], 2, self.num_heads, d)
        out = attention(q, kv[:, :, 0], kv[:, :, 1]).reshape(b, h * w, c)
        return self.residual(x, _image(self.proj(out), h, w))


class ClassTokens(nn.Module):
    """τθ(y): a learned sequence of ``num_tokens`` tokens per class; index ``num_classes`` is the null class.
    Initialised with std dim^-½, or 1 (unit magnitude, EDM2 §2) with ``magnitude_preserving``."""

    def __init__(self, num_classes: int, num_tokens: int, dim: int, magnitude_preserving: bool = False):
        super().__init__()
        self.num_tokens, self.dim = num_tokens, dim
        self.table = nn.Embedding(num_classes + 1, num_tokens * dim)
        nn.init.normal_(self.table.weight, std=1.0 if magnitude_preserving else dim**-0.5)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.table(y).view(y.shape[0], self.num_tokens, self.dim)


class AttentionPool2d(nn.Module):
    """Attention pooling (CLIP/ADM style): the mean token attends to all pixels; returns B×C."""

    def __init__(self, channels: int, resolution: int, head_channels: int = 64):
        super().__init__()
        self.num_heads = _num_heads(channels, head_channels)
        self.pos = nn.Parameter(torch.randn(resolution * resolution + 1, channels) / channels**0.5)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        if h * w + 1 != self.pos.shape[0]:
            raise ValueError(f"AttentionPool2d built for {self.pos.shape[0] - 1} pixels, got {h}×{w}")
        tokens = _tokens(x)
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + self.pos.to(tokens.dtype)
        d = c // self.num_heads
        qkv = self.qkv(tokens).view(b, h * w + 1, 3, self.num_heads, d)
        out = attention(qkv[:, :1, 0], qkv[:, :, 1], qkv[:, :, 2]).reshape(b, c)  # query: the mean token
        return self.proj(out)

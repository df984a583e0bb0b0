"""ADM-style UNet for the cascade's base and super-resolution stages.

Residual blocks (GroupNorm, SiLU, dropout, 3×3 convs) with scale-shift conditioning on an embedding of
the timestep, the class (one extra "null" class for classifier-free guidance) and, for super-resolution
stages, the conditioning-augmentation level s; residual up/down-sampling blocks; skip connections;
multi-head self-attention (and optional cross-attention to learned class tokens) at chosen
resolutions; zero-initialized output convolutions; optional gradient checkpointing.

Written for channels_last + bf16 autocast: the layers keep the input's memory format, the pixel tokens
of attention are views, and nothing upcasts to float32 except the tiny embedding inputs and the output.

One module because its parts are one network: the blocks exist only to be composed by `UNetEncoder` / `UNet`, and
the magnitude-preserving variant swaps layers inside the same blocks (`cascade.nets.mp_layers` holds those layers).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cascade.checks import is_int
from cascade.config import blocks_per_level
from cascade.imageops import check_image_batch, upsample
from cascade.nets.attention import ClassTokens, CrossAttention2d, SelfAttention2d, group_norm
from cascade.nets.mp_layers import MPConv2d, MPLinear, MPSiLU, mp_cat, mp_residual, mp_silu, zero_init_


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps t: B → B×dim float32 (Transformer/DDPM)."""
    if t.ndim != 1:
        raise ValueError(f"timesteps must be a 1-D tensor of length B, got shape {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class EmbeddingMLP(nn.Sequential):
    """sinusoidal features → Linear → SiLU → Linear (MP linear layers and MP-SiLU with ``magnitude_preserving``)."""

    def __init__(self, in_dim: int, out_dim: int, magnitude_preserving: bool = False):
        linear = MPLinear if magnitude_preserving else nn.Linear
        super().__init__(linear(in_dim, out_dim), MPSiLU() if magnitude_preserving else nn.SiLU(),
                         linear(out_dim, out_dim))


def _resample(x: torch.Tensor, up: bool, down: bool) -> torch.Tensor:
    if up:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    if down:
        return F.avg_pool2d(x, 2)
    return x


class ResBlock(nn.Module):
    """Residual block with scale-shift conditioning: h = conv(SiLU(GN(h)·(1+scale) + shift)) (ADM).

    ``up``/``down`` make it a residual resampling block (nearest ×2 / average pool ÷2 on both paths).
    Takes the already SiLU-activated embedding. ``magnitude_preserving``: MP convolutions and embedding projection
    (its gain starting at 0), MP-SiLU and an MP-Sum residual in place of the zero-initialised output conv (EDM2
    Configs C, D, F).
    """

    def __init__(
        self,
        in_ch: int,
        emb_dim: int,
        out_ch: int,
        dropout: float = 0.0,
        up: bool = False,
        down: bool = False,
        norm_groups: int = 32,
        magnitude_preserving: bool = False,
    ):
        super().__init__()
        if up and down:
            raise ValueError("a ResBlock cannot both upsample and downsample")
        self.up, self.down = up, down
        conv = MPConv2d if magnitude_preserving else nn.Conv2d
        self.act = mp_silu if magnitude_preserving else F.silu
        self.residual = mp_residual if magnitude_preserving else operator.add
        self.in_norm = group_norm(in_ch, norm_groups)
        self.in_conv = conv(in_ch, out_ch, 3, padding=1)
        self.emb_proj = MPLinear(emb_dim, 2 * out_ch) if magnitude_preserving else nn.Linear(emb_dim, 2 * out_ch)
        if magnitude_preserving:
            zero_init_(self.emb_proj)
        self.out_norm = group_norm(out_ch, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.out_conv = conv(out_ch, out_ch, 3, padding=1)
        if not magnitude_preserving:
            nn.init.zeros_(self.out_conv.weight)
            nn.init.zeros_(self.out_conv.bias)
        self.skip = nn.Identity() if in_ch == out_ch else conv(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.act(self.in_norm(x))
        h = self.in_conv(_resample(h, self.up, self.down))
        x = _resample(x, self.up, self.down)
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h, scale, shift)  # GN(h)·(1+scale) + shift
        h = self.out_conv(self.dropout(self.act(h)))
        return self.residual(self.skip(x), h)


class EmbedSequential(nn.ModuleList):
    """Runs blocks in order, giving ResBlocks the embedding and cross-attention the context tokens."""

    def __init__(self, *blocks: nn.Module, use_checkpoint: bool = False):
        super().__init__(blocks)
        self.use_checkpoint = use_checkpoint

    def _run(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        for block in self:
            if isinstance(block, ResBlock):
                x = block(x, emb)
            elif isinstance(block, CrossAttention2d):
                x = block(x, context)
            else:
                x = block(x)
        return x

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._run, x, emb, context, use_reentrant=False)
        return self._run(x, emb, context)


def _attention_blocks(
    ch: int,
    res: int,
    attention_resolutions: Sequence[int],
    cross_attention_resolutions: Sequence[int],
    context_dim: int | None,
    head_channels: int,
    norm_groups: int,
    magnitude_preserving: bool = False,
) -> list[nn.Module]:
    blocks: list[nn.Module] = []
    if res in attention_resolutions:
        blocks.append(SelfAttention2d(ch, min(head_channels, ch), norm_groups, magnitude_preserving))
    if res in cross_attention_resolutions:
        if context_dim is None:
            raise ValueError("cross-attention needs class tokens: set num_classes")
        blocks.append(CrossAttention2d(ch, context_dim, min(head_channels, ch), norm_groups, magnitude_preserving))
    return blocks


class UNetEncoder(nn.Module):
    """The UNet's down path and middle block; shared by the UNet and the noise-aware classifier.

    ``forward(x, emb, context)`` returns (middle features, skip activations of every input block).
    ``magnitude_preserving``: EDM2's magnitude-preserving layers throughout (`ResBlock`).
    """

    def __init__(
        self,
        in_channels: int,
        model_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int | Sequence[int],
        resolution: int,
        emb_dim: int,
        attention_resolutions: Sequence[int] = (),
        cross_attention_resolutions: Sequence[int] = (),
        context_dim: int | None = None,
        dropout: float = 0.0,
        head_channels: int = 64,
        norm_groups: int = 32,
        use_checkpoint: bool = False,
        magnitude_preserving: bool = False,
    ):
        super().__init__()
        if resolution % 2 ** (len(channel_mult) - 1) != 0:
            raise ValueError(f"resolution {resolution} is not divisible by 2^{len(channel_mult) - 1}")
        attn = {
            "attention_resolutions": attention_resolutions,
            "cross_attention_resolutions": cross_attention_resolutions,
            "context_dim": context_dim,
            "head_channels": head_channels,
            "norm_groups": norm_groups,
            "magnitude_preserving": magnitude_preserving,
        }
        mp = {"magnitude_preserving": magnitude_preserving}
        ch, res = model_channels * channel_mult[0], resolution
        conv = MPConv2d if magnitude_preserving else nn.Conv2d
        self.input_blocks = nn.ModuleList([EmbedSequential(conv(in_channels, ch, 3, padding=1))])
        self.skip_channels = [ch]
        counts = blocks_per_level(num_res_blocks, len(channel_mult))
        for level, mult in enumerate(channel_mult):
            for _ in range(counts[level]):
                out = model_channels * mult
                blocks = [
                    ResBlock(ch, emb_dim, out, dropout, norm_groups=norm_groups, **mp),
                    *_attention_blocks(out, res, **attn),
                ]
                self.input_blocks.append(EmbedSequential(*blocks, use_checkpoint=use_checkpoint))
                ch = out
                self.skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = ResBlock(ch, emb_dim, ch, dropout, down=True, norm_groups=norm_groups, **mp)
                self.input_blocks.append(EmbedSequential(down, use_checkpoint=use_checkpoint))
                self.skip_channels.append(ch)
                res //= 2
        self.middle_block = EmbedSequential(
            ResBlock(ch, emb_dim, ch, dropout, norm_groups=norm_groups, **mp),
            SelfAttention2d(ch, min(head_channels, ch), norm_groups, magnitude_preserving),
            *_attention_blocks(ch, res, **{**attn, "attention_resolutions": ()}),
            ResBlock(ch, emb_dim, ch, dropout, norm_groups=norm_groups, **mp),
            use_checkpoint=use_checkpoint,
        )
        self.out_channels, self.out_resolution = ch, res

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None):
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        return self.middle_block(h, emb, context), skips


def check_batch_vector(v: torch.Tensor, name: str, batch: int) -> None:
    if not isinstance(v, torch.Tensor) or v.shape != (batch,):
        got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"{name} must be a tensor of shape ({batch},), got {got}")


class UNet(nn.Module):
    """Class-conditional UNet predicting the diffusion's target: ε, v or x_0 (‖ the variance channels for
    learned variance). It knows nothing of the noise schedule; the SR conditioning skip wraps it
    (`cascade.nets.precond.ConditioningSkip`).

    Call ``model(x_t, t, y=None, x_low=None, aug_level=None)``:
    - t: B timesteps on the original training scale; y: B class indices, ``num_classes`` = null class,
      None = all null;
    - super-resolution models (``low_resolution`` set) take x_low: B×3×r×r (upsampled here with
      ``cascade.imageops.upsample`` and concatenated to x_t) and aug_level: B floats in [0, 1],
      embedded as sinusoidal(1000·s) → MLP;
    - distilled students (``guidance_input``) take w: B guidance weights ≥ 0, embedded as sinusoidal(100·w) → MLP
      whose last layer starts at zero, so a student built from its teacher's weights starts as the teacher's
      conditional model (Meng et al. 2023 §4.1; Luo et al. 2023 §4.2).
    ``magnitude_preserving``: EDM2's magnitude-preserving layers (`cascade.nets.mp_layers`; Karras et al. 2024 §2,
    Configs C, D, F): MP convolutions and linear layers with forced weight normalisation, MP-SiLU, MP-Sum residuals,
    MP-Cat skip concatenations, the output scaled by a learned gain starting at 0; GroupNorm stays.
    Class indices are range-checked on CPU tensors (a check on CUDA would force a host sync; there the
    embedding's device assert catches them).
    """

    def __init__(
        self,
        resolution: int,
        model_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int | Sequence[int],
        num_classes: int | None,
        in_channels: int = 3,
        out_channels: int = 3,
        low_resolution: int | None = None,
        attention_resolutions: Sequence[int] = (),
        cross_attention_resolutions: Sequence[int] = (),
        num_class_tokens: int = 4,
        dropout: float = 0.0,
        head_channels: int = 64,
        norm_groups: int = 32,
        use_checkpoint: bool = False,
        guidance_input: bool = False,
        magnitude_preserving: bool = False,
    ):
        super().__init__()
        if low_resolution is not None and not 0 < low_resolution < resolution:
            raise ValueError(f"low_resolution must be in (0, {resolution}), got {low_resolution}")
        if num_classes is not None and not (is_int(num_classes) and num_classes >= 1):
            raise ValueError(f"num_classes must be a positive integer or None, got {num_classes!r}")
        self.resolution, self.low_resolution = resolution, low_resolution
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_classes, self.model_channels = num_classes, model_channels
        emb_dim = 4 * model_channels
        self.magnitude_preserving = magnitude_preserving
        self.act = mp_silu if magnitude_preserving else F.silu
        mp = {"magnitude_preserving": magnitude_preserving}
        self.time_embed = EmbeddingMLP(model_channels, emb_dim, **mp)
        self.aug_embed = EmbeddingMLP(model_channels, emb_dim, **mp) if low_resolution is not None else None
        self.guidance_embed = EmbeddingMLP(model_channels, emb_dim, **mp) if guidance_input else None
        if self.guidance_embed is not None:  # zero: a fresh w input leaves the teacher's function unchanged
            zero_init_(self.guidance_embed[-1])
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes is not None else None
        use_tokens = bool(cross_attention_resolutions) and num_classes is not None
        self.class_tokens = ClassTokens(num_classes, num_class_tokens, emb_dim, **mp) if use_tokens else None
        net_in = in_channels * (2 if low_resolution is not None else 1)
        self.encoder = UNetEncoder(
            net_in,
            model_channels,
            channel_mult,
            num_res_blocks,
            resolution,
            emb_dim,
            attention_resolutions,
            cross_attention_resolutions,
            emb_dim if use_tokens else None,
            dropout,
            head_channels,
            norm_groups,
            use_checkpoint,
            magnitude_preserving,
        )
        skip_channels = list(self.encoder.skip_channels)
        ch, res = self.encoder.out_channels, self.encoder.out_resolution
        attn = {
            "attention_resolutions": attention_resolutions,
            "cross_attention_resolutions": cross_attention_resolutions,
            "context_dim": emb_dim if use_tokens else None,
            "head_channels": head_channels,
            "norm_groups": norm_groups,
            "magnitude_preserving": magnitude_preserving,
        }
        self.output_blocks = nn.ModuleList()
        counts = blocks_per_level(num_res_blocks, len(channel_mult))
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(counts[level] + 1):
                out = model_channels * mult
                blocks = [
                    ResBlock(ch + skip_channels.pop(), emb_dim, out, dropout, norm_groups=norm_groups, **mp),
                    *_attention_blocks(out, res, **attn),
                ]
                ch = out
                if level and i == counts[level]:
                    blocks.append(ResBlock(ch, emb_dim, ch, dropout, up=True, norm_groups=norm_groups, **mp))
                    res *= 2
                self.output_blocks.append(EmbedSequential(*blocks, use_checkpoint=use_checkpoint))
        self.out_norm = group_norm(ch, norm_groups)
        self.out_conv = (MPConv2d if magnitude_preserving else nn.Conv2d)(ch, out_channels, 3, padding=1)
        zero_init_(self.out_conv)

    @property
    def null_class(self) -> int | None:
        return self.num_classes

    def _class_index(self, y: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor | None:
        if self.num_classes is None:
            if y is not None:
                raise ValueError("this UNet is unconditional: y must be None")
            return None
        if y is None:
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        check_batch_vector(y, "y", batch)
        if y.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"y must hold integer class indices, got {y.dtype}")
        if y.device.type == "cpu" and y.numel() and (int(y.min()) < 0 or int(y.max()) > self.num_classes):
            raise ValueError(
                f"class indices must be in [0, {self.num_classes}] ({self.num_classes} = null class), "
                f"got range [{int(y.min())}, {int(y.max())}]"
            )
        return y

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        x_low: torch.Tensor | None = None,
        aug_level: torch.Tensor | None = None,
        w: torch.Tensor | None = None,
    ) -> torch.Tensor:
        check_image_batch(x_t, "x_t", channels=self.in_channels, size=self.resolution)
        batch = x_t.shape[0]
        check_batch_vector(t, "t", batch)
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        y = self._class_index(y, batch, x_t.device)
        if y is not None:
            emb = emb + self.class_embed(y)
        h = x_t
        if self.low_resolution is None:
            if x_low is not None or aug_level is not None:
                raise ValueError("x_low/aug_level are only for super-resolution stages; this is a base model")
        else:
            if x_low is None or aug_level is None:
                raise ValueError(
                    f"super-resolution UNet needs x_low (B×{self.in_channels}×{self.low_resolution}"
                    f"×{self.low_resolution}) and aug_level (B floats in [0, 1])"
                )
            check_image_batch(x_low, "x_low", channels=self.in_channels, size=self.low_resolution, batch=batch)
            check_batch_vector(aug_level, "aug_level", batch)
            emb = emb + self.aug_embed(timestep_embedding(aug_level * 1000.0, self.model_channels))
            x_up = upsample(x_low, self.resolution).to(x_t.dtype)
            h = torch.cat([x_t, x_up], dim=1)
        if self.guidance_embed is None:
            if w is not None:
                raise ValueError("w is the input of a distilled student; this network takes no guidance weight")
        else:
            if w is None:
                raise ValueError("this distilled student needs w (B guidance weights >= 0) as an input")
            check_batch_vector(w, "w", batch)
            emb = emb + self.guidance_embed(timestep_embedding(w * 100.0, self.model_channels))
        context = self.class_tokens(y) if self.class_tokens is not None else None
        emb = self.act(emb)  # every ResBlock starts its embedding projection with SiLU (ADM)
        h, skips = self.encoder(h, emb, context)
        for block in self.output_blocks:
            skip = skips.pop()
            h = block(mp_cat(h, skip) if self.magnitude_preserving else torch.cat([h, skip], dim=1), emb, context)
        out = self.out_conv(self.act(self.out_norm(h)))
        return out.to(x_t.dtype)

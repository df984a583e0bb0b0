"""The benchmark's reference network: diffusers' UNet2DModel shaped like a stage and matched to its forward FLOPs.

`matched_diffusers(cfg, target_flops)` builds the UNet2DModel at the stage's resolution and channel multipliers
whose forward FLOPs come closest to the stage's own network, behind `DiffusersAdapter` (the cascade's model
signature). diffusers is the optional ``bench`` extra (``pip install 'cascade[bench]'``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cascade.config import StageConfig
from cascade.imageops import upsample
from cascade.nets.build import example_inputs


def require_diffusers():
    """The diffusers module; an ImportError naming the extra to install when it is missing."""
    try:
        import diffusers
    except ImportError as err:
        raise ImportError("--compare diffusers needs the optional 'bench' extra: pip install 'cascade[bench]' "
                          f"(or pip install diffusers); import failed: {err}") from None
    return diffusers


class DiffusersAdapter(nn.Module):
    """Calls diffusers' UNet2DModel with the cascade's model signature (SR: concatenates the upsampled x_low;
    the augmentation level is not embedded)."""

    def __init__(self, unet: nn.Module, resolution: int, low_resolution: int | None):
        super().__init__()
        self.unet, self.resolution, self.low_resolution = unet, resolution, low_resolution

    def forward(self, x_t, t, y=None, x_low=None, aug_level=None):
        h = x_t if x_low is None else torch.cat([x_t, upsample(x_low, self.resolution).to(x_t.dtype)], dim=1)
        return self.unet(h, t, class_labels=y).sample


def build_diffusers(cfg: StageConfig, width: int, layers: int) -> nn.Module:
    """UNet2DModel at the stage's resolution, channel multipliers and attention levels, with base ``width`` and
    ``layers`` per block."""
    diffusers = require_diffusers()
    u = cfg.unet
    widths = [width * m for m in u.channel_mult]
    groups = math.gcd(u.norm_groups, *widths)
    res, down = cfg.resolution, []
    for _ in widths:
        down.append("AttnDownBlock2D" if res in u.attention_resolutions else "DownBlock2D")
        res //= 2
    up = ["AttnUpBlock2D" if b == "AttnDownBlock2D" else "UpBlock2D" for b in reversed(down)]
    unet = diffusers.UNet2DModel(
        sample_size=cfg.resolution, in_channels=3 if cfg.low_resolution is None else 6,
        out_channels=6 if cfg.diffusion.learn_sigma else 3, block_out_channels=widths, layers_per_block=layers,
        down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=groups,
        attention_head_dim=min(u.head_channels, min(widths)), resnet_time_scale_shift="scale_shift",
        num_class_embeds=cfg.num_classes + 1, dropout=u.dropout)
    return DiffusersAdapter(unet, cfg.resolution, cfg.low_resolution)


def count_flops(model: nn.Module, inputs: dict) -> int:
    """Forward FLOPs of one call (FlopCounterMode)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    return counter.get_total_flops()


def matched_diffusers(cfg: StageConfig, target_flops: int) -> tuple[nn.Module, dict]:
    """diffusers' UNet2DModel at the stage's resolution and channel multipliers with forward FLOPs closest to
    ``target_flops`` (aim: within 10%) over 1–3 layers per block and widths near the stage's."""
    inputs = example_inputs(cfg, 1)
    width, mult = cfg.unet.model_channels, cfg.unet.channel_mult
    step = math.gcd(cfg.unet.norm_groups, 4)

    def flops_of(w, layers):
        return count_flops(build_diffusers(cfg, w, layers), inputs)

    best_w, layers, best_f = width, 1, flops_of(width, 1)
    for n in (1, 2, 3):  # FLOPs ≈ quadratic in width: per layer count, scale the width, refine on the grid
        f = best_f if n == 1 else flops_of(width, n)
        guess = width * math.sqrt(target_flops / f)
        for w in sorted({max(step, step * round(guess / step) + d * step) for d in (-1, 0, 1)} | {width}):
            f = flops_of(w, n)
            if abs(f / target_flops - 1) < abs(best_f / target_flops - 1) - 0.02 or (
                    w == width and abs(f / target_flops - 1) <= 0.1):  # prefer the stage's own widths
                best_w, layers, best_f = w, n, f
    info = {"widths": [best_w * m for m in mult], "layers_per_block": layers, "flops_ratio": best_f / target_flops}
    return build_diffusers(cfg, best_w, layers), info

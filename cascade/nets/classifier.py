"""Noise-aware classifier f_φ(y | x_t, t) for classifier guidance (slides eq. 16; Dhariwal & Nichol 2021 §4).

The UNet's encoder half (input conv, residual down path, middle block with attention), conditioned on a
sinusoidal timestep embedding only, then GroupNorm → SiLU → attention pooling → linear logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cascade.checks import is_int
from cascade.imageops import check_image_batch
from cascade.nets.attention import AttentionPool2d, group_norm
from cascade.nets.unet import EmbeddingMLP, UNetEncoder, check_batch_vector, timestep_embedding


class NoisyClassifier(nn.Module):
    """``classifier(x_t, t)`` → logits B×num_classes for noised images x_t at timesteps t (original scale)."""

    def __init__(
        self,
        resolution: int,
        model_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int | Sequence[int],
        num_classes: int,
        in_channels: int = 3,
        attention_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        head_channels: int = 64,
        norm_groups: int = 32,
        use_checkpoint: bool = False,
    ):
        super().__init__()
        if not (is_int(num_classes) and num_classes >= 1):
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.resolution, self.in_channels = resolution, in_channels
        self.num_classes, self.model_channels = num_classes, model_channels
        emb_dim = 4 * model_channels
        self.time_embed = EmbeddingMLP(model_channels, emb_dim)
        self.encoder = UNetEncoder(
            in_channels,
            model_channels,
            channel_mult,
            num_res_blocks,
            resolution,
            emb_dim,
            attention_resolutions,
            (),
            None,
            dropout,
            head_channels,
            norm_groups,
            use_checkpoint,
        )
        ch = self.encoder.out_channels
        self.out_norm = group_norm(ch, norm_groups)
        self.pool = AttentionPool2d(ch, self.encoder.out_resolution, min(head_channels, ch))
        self.head = nn.Linear(ch, num_classes)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        check_image_batch(x_t, "x_t", channels=self.in_channels, size=self.resolution)
        check_batch_vector(t, "t", x_t.shape[0])
        emb = F.silu(self.time_embed(timestep_embedding(t, self.model_channels)))
        h, _ = self.encoder(x_t, emb)
        logits = self.head(self.pool(F.silu(self.out_norm(h))))
        return logits.float()

"""Exponential moving average (EMA) of a model's weights, the weights sampling uses.

Parameters are averaged, θ_ema ← d·θ_ema + (1 − d)·θ, with the decay warmed up over the first updates,
d_n = min(decay, (1 + n) / (warmup + n)), so early EMA weights are not dominated by the random
initialisation. Buffers (e.g. normalisation statistics, fixed frequency tables) are copied, never averaged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A frozen copy of ``model`` whose parameters track an exponential moving average of the model's."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: float = 10.0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if warmup < 1.0:
            raise ValueError(f"EMA warmup must be >= 1 (1 disables the warm-up), got {warmup}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, num_updates: int) -> float:
        """Decay used for the update after ``num_updates`` earlier ones."""
        return min(self.decay, (1.0 + num_updates) / (self.warmup + num_updates))  # warmed-up EMA decay

    @torch.no_grad()
    def update(self, model: nn.Module, apply: torch.Tensor | None = None) -> None:
        """Move the average towards ``model``'s parameters and copy its buffers.

        ``apply`` is an optional 0-dim 0/1 tensor on the model's device: 0 leaves the average unchanged
        (a skipped optimizer step) without a host–device synchronisation.
        """
        weight = 1.0 - self.decay_at(self.num_updates)
        if apply is not None:
            weight = apply.to(torch.float32) * weight
        ema_params = dict(self.model.named_parameters())
        for name, param in model.named_parameters():
            ema = ema_params[name]
            ema.lerp_(param.detach().to(ema.dtype), weight)  # θ_ema ← θ_ema + (1 − d)(θ − θ_ema)
        ema_buffers = dict(self.model.named_buffers())
        for name, buffer in model.named_buffers():
            ema_buffers[name].copy_(buffer)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], num_updates: int) -> None:
        self.model.load_state_dict(state_dict)
        self.num_updates = num_updates

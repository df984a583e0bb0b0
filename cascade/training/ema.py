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
    """A frozen copy of ``model`` whose parameters track an exponential moving average of the model's.

    ``num_updates`` counts applied updates only: a skipped step (``apply`` = 0) neither moves the average nor
    advances the warm-up. The count lives on the model's device, so skipping needs no host synchronisation.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: float = 10.0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if warmup < 1.0:
            raise ValueError(f"EMA warmup must be >= 1 (1 disables the warm-up), got {warmup}")
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        self._count = torch.zeros((), dtype=torch.long, device=device)

    @property
    def num_updates(self) -> int:
        """Updates applied so far (reading it synchronises with the device)."""
        return int(self._count)

    def decay_at(self, num_updates: int) -> float:
        """Decay used for the update after ``num_updates`` earlier ones."""
        return min(self.decay, (1.0 + num_updates) / (self.warmup + num_updates))  # warmed-up EMA decay

    @torch.no_grad()
    def update(self, model: nn.Module, apply: torch.Tensor | None = None) -> None:
        """Move the average towards ``model``'s parameters and copy its buffers.

        ``apply`` is an optional 0-dim 0/1 tensor on the model's device: 0 leaves the average and the
        warm-up count unchanged (a skipped optimizer step) without a host–device synchronisation.
        """
        n = self._count.to(torch.float64)
        decay = torch.clamp((1.0 + n) / (self.warmup + n), max=self.decay)  # warmed-up EMA decay, as decay_at
        weight = (1.0 - decay).to(torch.float32)
        if apply is not None:
            applied = apply.to(device=self._count.device, dtype=torch.long)
            weight = weight * applied.to(torch.float32)
        ema_params = dict(self.model.named_parameters())
        for name, param in model.named_parameters():
            ema = ema_params[name]
            ema.lerp_(param.detach().to(ema.dtype), weight.to(ema.dtype))  # θ_ema ← θ_ema + (1 − d)(θ − θ_ema)
        ema_buffers = dict(self.model.named_buffers())
        for name, buffer in model.named_buffers():
            ema_buffers[name].copy_(buffer)
        self._count += 1 if apply is None else applied

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], num_updates: int) -> None:
        self.model.load_state_dict(state_dict)
        self._count.fill_(int(num_updates))

"""Exponential moving average (EMA) of a model's weights, the weights sampling uses.

Parameters are averaged, θ_ema ← d·θ_ema + (1 − d)·θ, with the decay warmed up over the first updates,
d_n = min(decay, (1 + n) / (warmup + n)), so early EMA weights are not dominated by the random
initialisation. Buffers (e.g. normalisation statistics, fixed frequency tables) are copied, never averaged.

`PowerEMA` tracks power-function EMAs beside it (Karras et al. 2024, EDM2 §3.1), whose snapshots a post-hoc EMA
of any width is reconstructed from (`cascade.training.posthoc_ema`); `EMAGroup` updates several EMAs as one.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from cascade.ema_profiles import check_sigma_rels, gamma_from_sigma_rel


def lerp_all(averages: list[torch.Tensor], params: list[torch.Tensor], weight: torch.Tensor) -> None:
    """averages[i] ← averages[i] + weight·(params[i] − averages[i]) for every i as a few multi-tensor
    (``torch._foreach_*``) calls; ``weight`` a 0-dim tensor (on CPU read once; elsewhere used on the device, so no
    host synchronisation). ``params`` are cast to each average's dtype where they differ."""
    params = [p if p.dtype == a.dtype else p.to(a.dtype) for a, p in zip(averages, params)]
    if weight.device.type == "cpu":
        torch._foreach_lerp_(averages, params, float(weight))
        return
    step = torch._foreach_sub(params, averages)
    torch._foreach_mul_(step, weight.to(averages[0].dtype))
    torch._foreach_add_(averages, step)


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
        pairs = [(ema_params[name], param.detach()) for name, param in model.named_parameters()]
        lerp_all([e for e, _ in pairs], [p for _, p in pairs], weight)  # θ_ema ← θ_ema + (1 − d)(θ − θ_ema)
        ema_buffers = dict(self.model.named_buffers())
        buffers = [(ema_buffers[name], buffer) for name, buffer in model.named_buffers()]
        if buffers:
            torch._foreach_copy_([e for e, _ in buffers], [b for _, b in buffers])
        self._count += 1 if apply is None else applied

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor], num_updates: int) -> None:
        self.model.load_state_dict(state_dict)
        self._count.fill_(int(num_updates))


class PowerEMA:
    """Power-function EMAs of ``model``'s parameters, one per relative width in ``sigma_rels`` (EDM2 §3.1, App. C).

    Each averages with β_t = (1 − 1/t)^(γ+1) (EDM2 eq. 127, one step per update; γ from σ_rel by EDM2 eq. 126),
    t the number of applied updates: the first update (β = 0) replaces the starting copy, and after t updates
    θ_1 … θ_t carry the weights (k^(γ+1) − (k − 1)^(γ+1)) / t^(γ+1). ``start_step`` is the training step at which
    the count started (0, or the step of a resume that found no power-EMA state to continue). The averages keep
    the parameters' dtype and device; buffers are copied, never averaged. ``update(model, apply)`` follows the
    `EMA` contract: ``apply`` a 0-dim 0/1 tensor on the device, 0 leaving averages and count unchanged, without
    a host synchronisation. ValueError for a σ_rel outside (0, 0.3), a repeated one or none at all.
    """

    def __init__(self, model: nn.Module, sigma_rels: tuple[float, ...], start_step: int = 0):
        sigma_rels = tuple(float(s) for s in sigma_rels)
        if not sigma_rels:
            raise ValueError("PowerEMA needs at least one sigma_rel, e.g. (0.05, 0.10)")
        check_sigma_rels(sigma_rels, "sigma_rels")
        self.sigma_rels = sigma_rels
        self.gammas = tuple(gamma_from_sigma_rel(s) for s in sigma_rels)
        self.start_step = int(start_step)
        with torch.no_grad():
            self.averages = [{name: p.detach().clone() for name, p in model.named_parameters()} for _ in sigma_rels]
            # Non-persistent buffers (e.g. a schedule table) are not weights: the model's state dict leaves them out
            # (told by identity, since a state-dict hook may rename its keys).
            persistent = {id(t) for t in model.state_dict(keep_vars=True).values()}
            self.buffers = {name: b.detach().clone() for name, b in model.named_buffers() if id(b) in persistent}
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._count = torch.zeros((), dtype=torch.long, device=device)

    @property
    def num_updates(self) -> int:
        """Updates applied so far, t (reading it synchronises with the device)."""
        return int(self._count)

    @torch.no_grad()
    def update(self, model: nn.Module, apply: torch.Tensor | None = None) -> None:
        """Move every average towards ``model``'s parameters and copy its buffers (``apply`` as in `EMA.update`)."""
        t = self._count.to(torch.float64) + 1.0  # the count this update makes
        applied = None if apply is None else apply.to(device=self._count.device, dtype=torch.long)
        params = [(name, p.detach()) for name, p in model.named_parameters()]
        for averages, gamma in zip(self.averages, self.gammas):
            beta = (1.0 - 1.0 / t) ** (gamma + 1.0)  # EDM2 eq. 127: β_t = (1 − 1/t)^(γ+1)
            weight = 1.0 - beta  # float64
            if applied is not None:
                weight = weight * applied.to(torch.float64)
            lerp_all([averages[name] for name, _ in params], [p for _, p in params], weight)  # θ_γ ← β θ_γ + (1 − β) θ
        for name, buffer in model.named_buffers():
            if name in self.buffers:
                self.buffers[name].copy_(buffer)
        self._count += 1 if applied is None else applied

    def profile_state_dict(self, index: int) -> dict[str, torch.Tensor]:
        """The model state dict of profile ``index`` (its averaged parameters and the copied buffers)."""
        return {**self.buffers, **self.averages[index]}

    def state_dict(self) -> dict:
        """Everything an exact resume needs (CPU copies; plain tensors and numbers: ``weights_only`` loads it)."""
        return {"sigma_rels": list(self.sigma_rels), "num_updates": self.num_updates, "start_step": self.start_step,
                "averages": [{k: v.detach().to("cpu", copy=True) for k, v in a.items()} for a in self.averages],
                "buffers": {k: v.detach().to("cpu", copy=True) for k, v in self.buffers.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict`'s record. ValueError when it tracked other widths or another network."""
        recorded = tuple(float(s) for s in state["sigma_rels"])
        if recorded != self.sigma_rels:
            raise ValueError(f"the power-EMA state tracks sigma_rels {list(recorded)}, this run "
                             f"{list(self.sigma_rels)}")
        for averages, saved in zip(self.averages, state["averages"]):
            if averages.keys() != saved.keys():
                raise ValueError("the power-EMA state was saved from another network (parameter names differ)")
            for name, avg in averages.items():
                avg.copy_(saved[name])
        for name, buffer in self.buffers.items():
            buffer.copy_(state["buffers"][name])
        self._count.fill_(int(state["num_updates"]))
        self.start_step = int(state["start_step"])


class EMAGroup:
    """Several EMAs (`EMA`, `PowerEMA`) updated by one ``update(model, apply)`` call, as `TrainStep` makes it."""

    def __init__(self, *emas):
        self.emas = [e for e in emas if e is not None]

    def update(self, model: nn.Module, apply: torch.Tensor | None = None) -> None:
        for ema in self.emas:
            ema.update(model, apply)

"""Timestep samplers for training: uniform, or importance sampling by the second moment of each term's
loss (Improved DDPM), which lowers the variance of the VLB objective.

`sample` returns timesteps and importance weights 1/(T·p_t); the trainer multiplies per-sample losses by
the weights, so the expected weighted loss equals the uniform-t loss.
"""

from __future__ import annotations

import numpy as np
import torch

from cascade.checks import is_int
from cascade.config import TIMESTEP_SAMPLERS


class TimestepSampler:
    """Base class: a distribution p_t over {0..T-1} given by `weights()`."""

    def __init__(self, num_timesteps: int):
        if not is_int(num_timesteps) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")
        self.num_timesteps = int(num_timesteps)

    def weights(self) -> np.ndarray:
        """Unnormalized non-negative sampling weights, one per timestep (float64)."""
        return np.ones(self.num_timesteps, dtype=np.float64)

    def sample(self, batch_size: int, device, generator: torch.Generator | None = None):
        """Draw `batch_size` timesteps; returns (t long tensor, importance weights 1/(T·p_t) float tensor)."""
        p = self.weights()
        p = p / p.sum()
        gen_device = generator.device if generator is not None else torch.device("cpu")
        probs = torch.from_numpy(p).to(gen_device)
        t = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * probs[t])
        return t.to(device), weights.to(device=device, dtype=torch.float32)

    def update_with_all_losses(self, ts, losses) -> None:
        """Record per-sample losses (gathered over all processes); a no-op for fixed distributions."""

    def state_dict(self) -> dict:
        return {"num_timesteps": self.num_timesteps}

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_timesteps"]) != self.num_timesteps:
            raise ValueError(f"state is for {state['num_timesteps']} timesteps, sampler has {self.num_timesteps}")


class UniformSampler(TimestepSampler):
    """t ~ Uniform{0..T-1}; all weights are 1."""


class LossSecondMomentResampler(TimestepSampler):
    """p_t ∝ √E[L_t²] over the last `history_per_term` losses of each t, mixed with `uniform_prob` of
    uniform; uniform until every t has a full history (Improved DDPM, section 3.3)."""

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        if history_per_term < 1:
            raise ValueError(f"history_per_term must be >= 1, got {history_per_term}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must be in [0, 1], got {uniform_prob}")
        self.history_per_term = int(history_per_term)
        self.uniform_prob = float(uniform_prob)
        self._loss_history = np.zeros((self.num_timesteps, self.history_per_term), dtype=np.float64)
        self._loss_counts = np.zeros(self.num_timesteps, dtype=np.int64)

    def warmed_up(self) -> bool:
        return bool((self._loss_counts == self.history_per_term).all())

    def weights(self) -> np.ndarray:
        if not self.warmed_up():
            return np.ones(self.num_timesteps, dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        total = weights.sum()
        if not np.isfinite(total) or total <= 0:
            return np.ones(self.num_timesteps, dtype=np.float64)
        # p_t ∝ √E[L_t²], mixed with a little uniform so every t keeps being visited.
        return weights / total * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def update_with_all_losses(self, ts, losses) -> None:
        ts = np.asarray(ts.detach().cpu() if isinstance(ts, torch.Tensor) else ts).reshape(-1)
        losses = np.asarray(losses.detach().float().cpu() if isinstance(losses, torch.Tensor) else losses,
                            dtype=np.float64).reshape(-1)
        if ts.shape != losses.shape:
            raise ValueError(f"{ts.size} timesteps but {losses.size} losses")
        if ts.size and (ts.min() < 0 or ts.max() >= self.num_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}]")
        for t, loss in zip(ts.astype(np.int64), losses):
            if self._loss_counts[t] == self.history_per_term:
                self._loss_history[t, :-1] = self._loss_history[t, 1:]  # drop the oldest
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1

    def state_dict(self) -> dict:
        """Plain tensors and numbers only, so it loads with torch.load(weights_only=True)."""
        return {"num_timesteps": self.num_timesteps, "history_per_term": self.history_per_term,
                "uniform_prob": self.uniform_prob, "loss_history": torch.from_numpy(self._loss_history.copy()),
                "loss_counts": torch.from_numpy(self._loss_counts.copy())}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if int(state["history_per_term"]) != self.history_per_term:
            raise ValueError(f"state has history_per_term={state['history_per_term']}, "
                             f"sampler has {self.history_per_term}")
        self.uniform_prob = float(state["uniform_prob"])
        self._loss_history = np.asarray(state["loss_history"], dtype=np.float64).copy()
        self._loss_counts = np.asarray(state["loss_counts"], dtype=np.int64).copy()


def make_timestep_sampler(kind: str, num_timesteps: int) -> TimestepSampler:
    """'uniform' or 'loss-second-moment' (DiffusionConfig.timestep_sampler)."""
    if kind == "uniform":
        return UniformSampler(num_timesteps)
    if kind == "loss-second-moment":
        return LossSecondMomentResampler(num_timesteps)
    raise ValueError(f"unknown timestep sampler {kind!r}; expected one of {TIMESTEP_SAMPLERS}")

"""Timestep samplers for training: uniform; importance sampling by the second moment of each term's loss
(Improved DDPM), which lowers the variance of the VLB objective; or EDM's log-normal noise levels.

`sample` returns timesteps and per-sample loss weights; the trainer multiplies per-sample losses by them.
An importance sampler (``importance_weighted``) returns 1/(T·p_t), so the expected weighted loss equals the
uniform-t loss: it changes the variance of the estimate, not the objective. The log-normal sampler changes
the training distribution itself (EDM trains on ln σ ~ N(P_mean, P_std²) and does not re-weight back to
uniform), so its weights are 1 and the objective is E over its p_t.
"""

from __future__ import annotations

import numpy as np
import torch

from cascade.checks import is_int
from cascade.config import TIMESTEP_SAMPLERS, DiffusionConfig
from cascade.diffusion.gaussian import GaussianDiffusion


class TimestepSampler:
    """Base class: a distribution p_t over {0..T-1} given by `weights()`. ``importance_weighted``: `sample`
    returns the importance weights 1/(T·p_t) (the objective stays the uniform-t one); False: weights 1 (p_t is
    the training distribution)."""

    importance_weighted = True

    def __init__(self, num_timesteps: int):
        if not is_int(num_timesteps) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")
        self.num_timesteps = int(num_timesteps)

    def weights(self) -> np.ndarray:
        """Unnormalized non-negative sampling weights, one per timestep (float64)."""
        return np.ones(self.num_timesteps, dtype=np.float64)

    def sample(self, batch_size: int, device, generator: torch.Generator | None = None):
        """Draw `batch_size` timesteps t ~ p_t; returns (t long tensor, float32 weights: 1/(T·p_t) when
        ``importance_weighted``, else ones)."""
        p = self.weights()
        p = p / p.sum()
        gen_device = generator.device if generator is not None else torch.device("cpu")
        probs = torch.from_numpy(p).to(gen_device)
        t = torch.multinomial(probs, batch_size, replacement=True, generator=generator)
        if not self.importance_weighted:
            return t.to(device), torch.ones(batch_size, device=device, dtype=torch.float32)
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


class LogNormalSampler(TimestepSampler):
    """EDM's noise-level distribution ln σ ~ N(P_mean, P_std²) (Karras et al. 2022 "EDM" §5, Table 1) on a
    discrete VP process with σ_t = √((1 − ᾱ_t)/ᾱ_t): t is the timestep whose ln σ_t is nearest to the drawn
    ln σ. Timestep t covers ln σ in [m_t, m_{t+1}), the midpoints m_t = (ln σ_{t−1} + ln σ_t)/2 (m_0 = −∞,
    m_T = +∞), so p_t = Φ((m_{t+1} − P_mean)/P_std) − Φ((m_t − P_mean)/P_std) exactly, and `sample` draws from it.

    It changes the training distribution (EDM does not re-weight back to uniform t): ``importance_weighted``
    is False and `sample`'s weights are 1. Stateless: its state is its settings, checked on load.

    ``alphas_cumprod``: ᾱ_t for t = 0..T−1, strictly decreasing in (0, 1) (a float64 tensor or array);
    ``p_std`` > 0. ValueError otherwise."""

    importance_weighted = False

    def __init__(self, alphas_cumprod, p_mean: float = -1.2, p_std: float = 1.2):
        abar = np.asarray(alphas_cumprod, dtype=np.float64).reshape(-1)
        super().__init__(abar.size)
        if not (np.all((abar > 0) & (abar < 1)) and np.all(np.diff(abar) < 0)):
            raise ValueError("alphas_cumprod must be strictly decreasing in (0, 1)")
        if not (np.isfinite(p_mean) and np.isfinite(p_std) and p_std > 0):
            raise ValueError(f"p_std must be > 0 and p_mean finite, got p_mean={p_mean}, p_std={p_std}")
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        log_sigma = 0.5 * (np.log1p(-abar) - np.log(abar))  # ln σ_t = ½·ln((1 − ᾱ_t)/ᾱ_t) (EDM Table 1, VP σ)
        mid = (log_sigma[:-1] + log_sigma[1:]) / 2  # m_t: the boundaries between nearest-in-log-σ cells
        z = torch.from_numpy((mid - self.p_mean) / self.p_std)
        cdf = np.concatenate([[0.0], torch.special.ndtr(z).numpy(), [1.0]])  # Φ((m_t − P_mean)/P_std)
        self._p = np.diff(cdf)  # p_t = Φ(m_{t+1}) − Φ(m_t): the log-normal's mass of t's cell (EDM Table 1)

    def weights(self) -> np.ndarray:
        """p_t (sums to 1, float64)."""
        return self._p.copy()

    def state_dict(self) -> dict:
        return {"num_timesteps": self.num_timesteps, "p_mean": self.p_mean, "p_std": self.p_std}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if (float(state["p_mean"]), float(state["p_std"])) != (self.p_mean, self.p_std):
            raise ValueError(f"state is for p_mean={state['p_mean']}, p_std={state['p_std']}; sampler has "
                             f"p_mean={self.p_mean}, p_std={self.p_std}")


def make_timestep_sampler(kind: str, num_timesteps: int, *, alphas_cumprod=None, p_mean: float = -1.2,
                          p_std: float = 1.2) -> TimestepSampler:
    """A sampler by name (DiffusionConfig.timestep_sampler): 'uniform', 'loss-second-moment' or 'lognormal'
    (which needs the process's ``alphas_cumprod``, T of them, and uses ``p_mean`` / ``p_std``). ValueError for an
    unknown name or a missing or mismatched ᾱ."""
    if kind == "uniform":
        return UniformSampler(num_timesteps)
    if kind == "loss-second-moment":
        return LossSecondMomentResampler(num_timesteps)
    if kind == "lognormal":
        if alphas_cumprod is None or len(alphas_cumprod) != num_timesteps:
            raise ValueError(f"the lognormal timestep sampler needs the process's {num_timesteps} alphas_cumprod")
        return LogNormalSampler(alphas_cumprod, p_mean, p_std)
    raise ValueError(f"unknown timestep sampler {kind!r}; expected one of {TIMESTEP_SAMPLERS}")


def stage_timestep_sampler(cfg: DiffusionConfig, diffusion: GaussianDiffusion) -> TimestepSampler:
    """The training timestep sampler of a stage: ``cfg.timestep_sampler`` on ``diffusion``'s (unrespaced) ᾱ_t,
    with ``cfg.p_mean`` / ``cfg.p_std``."""
    return make_timestep_sampler(cfg.timestep_sampler, diffusion.num_timesteps,
                                 alphas_cumprod=diffusion.alphas_cumprod, p_mean=cfg.p_mean, p_std=cfg.p_std)

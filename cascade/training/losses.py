"""The training losses of the three stage kinds as callables ``loss(model, batch) -> dict``, chosen once per run
by `make_stage_loss`: `DiffusionLoss` (base), `SRDiffusionLoss` (super-resolution, with conditioning
augmentation) and `ClassifierLoss` (noise-aware classifier)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cascade.config import AugConfig, StageConfig, StageKind
from cascade.diffusion.augment import augment_low_res
from cascade.diffusion.gaussian import GaussianDiffusion
from cascade.training.timestep_sampler import TimestepSampler, UniformSampler


def drop_labels(y: torch.Tensor, p_uncond: float, null_class: int) -> torch.Tensor:
    """Replace each label by the null class with probability p_uncond (classifier-free guidance)."""
    if p_uncond == 0:
        return y
    drop = torch.rand(y.shape, device=y.device) < p_uncond
    return torch.where(drop, torch.full_like(y, null_class), y)


def sample_timesteps(timestep_sampler: TimestepSampler, batch: int, device: torch.device):
    """(t, per-sample loss weights or None): the sampler's draw and weights (importance weights 1/(T·p_t), or 1
    for a sampler that sets the training distribution, e.g. the log-normal); uniform t is drawn on the device (no
    host round trip) with weights None."""
    if isinstance(timestep_sampler, UniformSampler):
        return torch.randint(0, timestep_sampler.num_timesteps, (batch,), device=device), None
    return timestep_sampler.sample(batch, device)


class DiffusionLoss:
    """Training loss of a base stage: null-class dropout with probability p_uncond (Ho & Salimans 2022 §3.2),
    then the diffusion's per-sample loss at t from the timestep sampler (L_simple, slides eq. 14 / Ho et al.
    2020 eq. 14; or the hybrid L_simple + λ·L_vlb, Nichol & Dhariwal 2021 eq. 16), times the sampler's weights
    (`sample_timesteps`: importance-weighted for an importance sampler, unweighted otherwise).
    Returns {"loss": scalar, "per_sample": B, "t": B}."""

    def __init__(self, diffusion: GaussianDiffusion, timestep_sampler: TimestepSampler, *, num_classes: int,
                 p_uncond: float):
        self.diffusion, self.timestep_sampler = diffusion, timestep_sampler
        self.num_classes, self.p_uncond = num_classes, p_uncond

    def conditioning(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"y": drop_labels(batch["y"], self.p_uncond, self.num_classes)}

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x0 = batch["x"]
        t, weights = sample_timesteps(self.timestep_sampler, x0.shape[0], x0.device)
        per_sample = self.diffusion.training_losses(model, x0, t, noise=torch.randn_like(x0),
                                                    model_kwargs=self.conditioning(batch))["loss"]
        loss = (per_sample * weights).mean() if weights is not None else per_sample.mean()
        return {"loss": loss, "per_sample": per_sample, "t": t}


class SRDiffusionLoss(DiffusionLoss):
    """Training loss of a super-resolution stage: `DiffusionLoss` with the low-resolution input conditioned by
    Gaussian (and, per the stage, blur) augmentation at a random level s (Ho et al. 2021 "Cascaded Diffusion
    Models" §3.2), which the model also receives."""

    def __init__(self, diffusion: GaussianDiffusion, timestep_sampler: TimestepSampler, *, num_classes: int,
                 p_uncond: float,
                 aug: AugConfig):
        super().__init__(diffusion, timestep_sampler, num_classes=num_classes, p_uncond=p_uncond)
        self.aug = aug

    def conditioning(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x_low, aug_level = augment_low_res(batch["x_low"], self.aug)
        return {**super().conditioning(batch), "x_low": x_low, "aug_level": aug_level}


class ClassifierLoss:
    """Training loss of a noise-aware classifier (Dhariwal & Nichol 2021 §4.1): cross-entropy of the label on
    x_t ~ q(x_t | x_0) at a random t. Returns {"loss", "per_sample": B, "t": B, "correct": count}."""

    def __init__(self, diffusion: GaussianDiffusion, timestep_sampler: TimestepSampler):
        self.diffusion, self.timestep_sampler = diffusion, timestep_sampler

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x0, y = batch["x"], batch["y"]
        t, _ = sample_timesteps(self.timestep_sampler, x0.shape[0], x0.device)
        x_t = self.diffusion.q_sample(x0, t, noise=torch.randn_like(x0))
        logits = model(x_t, self.diffusion.model_timesteps(t))
        per_sample = F.cross_entropy(logits.float(), y, reduction="none")
        return {"loss": per_sample.mean(), "per_sample": per_sample, "t": t,
                "correct": (logits.argmax(dim=1) == y).sum()}


def example_batch(stage: StageConfig, batch_size: int, *, seed: int = 0,
                  device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A random training batch of the stage's shapes, as the loss callables read it: "x" (B×3×R×R, standard normal
    clamped to [-1, 1]), "y" (B class indices) and, for SR stages, "x_low" (B×3×r×r, likewise). Deterministic for
    ``seed``; for timing (`tools/bench.py`, `cascade.training.memory_format`), not for training."""
    gen = torch.Generator().manual_seed(seed)
    res = stage.resolution
    batch = {"x": torch.randn(batch_size, 3, res, res, generator=gen).clamp(-1, 1),
             "y": torch.randint(0, stage.num_classes, (batch_size,), generator=gen)}
    if stage.low_resolution:
        low = stage.low_resolution
        batch["x_low"] = torch.randn(batch_size, 3, low, low, generator=gen).clamp(-1, 1)
    return {k: v.to(device) for k, v in batch.items()}


def make_stage_loss(stage: StageConfig, diffusion: GaussianDiffusion, timestep_sampler: TimestepSampler,
                    p_uncond: float) -> DiffusionLoss | ClassifierLoss:
    """The loss callable ``loss(model, batch)`` of the stage's kind, chosen once per run."""
    if stage.kind is StageKind.classifier:
        return ClassifierLoss(diffusion, timestep_sampler)
    if stage.kind is StageKind.sr:
        return SRDiffusionLoss(diffusion, timestep_sampler, num_classes=stage.num_classes, p_uncond=p_uncond,
                               aug=stage.aug)
    return DiffusionLoss(diffusion, timestep_sampler, num_classes=stage.num_classes, p_uncond=p_uncond)

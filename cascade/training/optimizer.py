"""The optimizer of a training run: AdamW (Loshchilov & Hutter 2019), fused where the device has the kernel, with a
linear warm-up to the learning rate and, after it, a constant rate or EDM2's inverse-square-root decay."""

from __future__ import annotations

import math

import torch

from cascade.training.trainer_config import TrainerConfig

__all__ = ["FUSED_ADAMW_DEVICES", "lr_factor", "make_lr_schedule", "make_optimizer"]

FUSED_ADAMW_DEVICES = ("cpu", "cuda", "xpu")


def make_optimizer(model: torch.nn.Module, cfg: TrainerConfig, device: torch.device):
    """(AdamW, LR scheduler, fused) of a run: AdamW (fused on CPU/CUDA/XPU) with linear warmup to lr over
    ``cfg.warmup_steps``, then ``cfg.lr_schedule`` (`make_lr_schedule`)."""
    fused = device.type in FUSED_ADAMW_DEVICES
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay, fused=fused)
    return optimizer, make_lr_schedule(optimizer, cfg), fused


def lr_factor(steps_taken: int, cfg: TrainerConfig) -> float:
    """The learning rate of the optimizer step after ``steps_taken`` steps, as a fraction of ``cfg.lr``: the linear
    warm-up min(1, (s + 1)/warmup_steps) times, with ``lr_schedule`` "inv_sqrt", 1/√max(s/lr_ref_steps, 1)."""
    warmup = cfg.warmup_steps
    # min(1, (s + 1)/warmup): linear warm-up (Goyal et al. 2017 §2.2)
    factor = min(1.0, (steps_taken + 1) / warmup) if warmup else 1.0
    if cfg.lr_schedule == "inv_sqrt":
        # α(s) = α_ref/√max(s/t_ref, 1) (Karras et al. 2024 "EDM2" eq. 16)
        factor /= math.sqrt(max(steps_taken / cfg.lr_ref_steps, 1.0))
    return factor


def make_lr_schedule(optimizer: torch.optim.Optimizer, cfg: TrainerConfig, steps_taken: int = 0):
    """The run's LR schedule (`lr_factor`: linear warmup to ``cfg.lr`` over ``cfg.warmup_steps``, then constant or
    EDM2's inverse-square-root decay, ``cfg.lr_schedule``), a function of the step count alone, positioned after
    ``steps_taken`` optimizer steps, with ``cfg``'s optimizer settings (lr, betas, eps, weight decay) written into
    every parameter group. A resumed run calls it after loading the optimizer's state, so settings changed on the
    command line take effect (the Adam moments and step counts stay those of the checkpoint)."""
    for group in optimizer.param_groups:
        group.update(lr=cfg.lr, initial_lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                     weight_decay=cfg.weight_decay)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg), last_epoch=steps_taken - 1)

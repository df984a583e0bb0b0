"""The optimizer of a training run: AdamW (Loshchilov & Hutter 2019), fused where the device has the kernel, with a
linear warm-up to the learning rate and a constant rate after it."""

from __future__ import annotations

import torch

from cascade.training.trainer_config import TrainerConfig

__all__ = ["FUSED_ADAMW_DEVICES", "make_lr_schedule", "make_optimizer"]

FUSED_ADAMW_DEVICES = ("cpu", "cuda", "xpu")


def make_optimizer(model: torch.nn.Module, cfg: TrainerConfig, device: torch.device):
    """(AdamW, LR scheduler, fused) of a run: AdamW (fused on CPU/CUDA/XPU) with linear warmup to lr over
    ``cfg.warmup_steps``, then constant."""
    fused = device.type in FUSED_ADAMW_DEVICES
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay, fused=fused)
    return optimizer, make_lr_schedule(optimizer, cfg), fused


def make_lr_schedule(optimizer: torch.optim.Optimizer, cfg: TrainerConfig, steps_taken: int = 0):
    """The run's LR schedule (linear warmup to ``cfg.lr`` over ``cfg.warmup_steps``, then constant) positioned after
    ``steps_taken`` optimizer steps, with ``cfg``'s optimizer settings (lr, betas, eps, weight decay) written into
    every parameter group. A resumed run calls it after loading the optimizer's state, so settings changed on the
    command line take effect (the Adam moments and step counts stay those of the checkpoint)."""
    for group in optimizer.param_groups:
        group.update(lr=cfg.lr, initial_lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                     weight_decay=cfg.weight_decay)
    warmup = cfg.warmup_steps
    # lr_s = lr·min(1, (s + 1)/warmup): linear warm-up (Goyal et al. 2017 §2.2), then constant
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0,
                                             last_epoch=steps_taken - 1)

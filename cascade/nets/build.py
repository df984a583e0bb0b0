"""Turn a StageConfig into its network (and, through `cascade.diffusion.gaussian.build_diffusion`, re-exported
here, its diffusion process); example inputs and size measures."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cascade.config import StageConfig, StageKind
from cascade.diffusion.gaussian import build_diffusion
from cascade.nets.classifier import NoisyClassifier
from cascade.nets.precond import ConditioningSkip
from cascade.nets.unet import UNet

__all__ = ["build_diffusion", "build_model", "count_parameters", "example_inputs", "forward_flops"]


def build_model(cfg: StageConfig) -> nn.Module:
    """The stage's network, freshly initialized: a UNet (base, sr; wrapped in a ConditioningSkip when
    ``unet.cond_skip_std`` > 0; taking the guidance weight w as an input when the stage is distilled; with EDM2's
    magnitude-preserving layers when ``unet.magnitude_preserving``) or a NoisyClassifier (classifier)."""
    u = cfg.unet
    common = {
        "resolution": cfg.resolution,
        "model_channels": u.model_channels,
        "channel_mult": u.channel_mult,
        "num_res_blocks": u.num_res_blocks,
        "num_classes": cfg.num_classes,
        "attention_resolutions": u.attention_resolutions,
        "dropout": u.dropout,
        "head_channels": u.head_channels,
        "norm_groups": u.norm_groups,
        "use_checkpoint": u.use_checkpoint,
    }
    if cfg.kind is StageKind.classifier:
        if u.cross_attention_resolutions:
            raise ValueError(
                "the classifier has no class input: unet.cross_attention_resolutions must be empty"
            )
        return NoisyClassifier(**common)
    unet = UNet(
        **common,
        out_channels=6 if cfg.diffusion.learn_sigma else 3,
        low_resolution=cfg.low_resolution,
        cross_attention_resolutions=u.cross_attention_resolutions,
        num_class_tokens=u.num_class_tokens,
        guidance_input=cfg.distill.takes_w,
        magnitude_preserving=u.magnitude_preserving,
    )
    if not u.cond_skip_std:
        return unet
    return ConditioningSkip(unet, u.cond_skip_std, build_diffusion(cfg).alphas_cumprod,
                            prediction=cfg.diffusion.prediction)


def example_inputs(
    cfg: StageConfig,
    batch_size: int = 1,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Random keyword inputs for the stage's model call (x_t, t, and y / x_low / aug_level / w as the stage needs)."""
    r = cfg.resolution
    if torch.device(device).type == "meta":
        rand = lambda *s: torch.empty(*s, device=device)
        t = torch.empty(batch_size, dtype=torch.long, device=device)
        y = torch.empty(batch_size, dtype=torch.long, device=device)
    else:
        rand = lambda *s: torch.randn(*s, generator=generator).to(device)
        t = torch.randint(0, cfg.diffusion.num_timesteps, (batch_size,), generator=generator).to(device)
        y = torch.randint(0, cfg.num_classes, (batch_size,), generator=generator).to(device)
    inputs = {"x_t": rand(batch_size, 3, r, r), "t": t}
    if cfg.kind is StageKind.classifier:
        return inputs
    inputs["y"] = y
    if cfg.distill.takes_w:
        inputs["w"] = rand(batch_size).abs() if device != "meta" else rand(batch_size)
    if cfg.kind is StageKind.sr:
        lr = cfg.low_resolution
        inputs["x_low"] = rand(batch_size, 3, lr, lr)
        inputs["aug_level"] = rand(batch_size).abs().clamp(max=1.0) if device != "meta" else rand(batch_size)
    return inputs


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(cfg: StageConfig, model: nn.Module | None = None) -> int:
    """Forward FLOPs for one image (torch FlopCounterMode), counted on the meta device unless a model is given."""
    if model is None:
        with torch.device("meta"):
            model = build_model(cfg)
    device = next(model.parameters()).device
    inputs = example_inputs(cfg, 1, device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    return counter.get_total_flops()

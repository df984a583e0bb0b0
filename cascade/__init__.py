"""cascade: cascaded diffusion models for class-conditional image generation.

The diffusion core (schedules, forward process, losses, bound, respacing) and the samplers are
exported here; heavier pieces (the pipeline, training, data, metrics) load on first use.
"""

from cascade.diffusion import (
    GaussianDiffusion,
    aug_alpha_bar,
    aug_level_from_alpha_bar,
    make_betas,
    space_timesteps,
)
from cascade.samplers import classifier_free_guidance, classifier_guidance, sample_ddim, sample_ddpm

_LAZY = {
    "CascadePipeline": "cascade.pipeline",
    "CascadeConfigError": "cascade.pipeline",
    "UNet": "cascade.unet",
    "train_stage": "cascade.train",
    "make_stage_loader": "cascade.data",
    "write_shards": "cascade.shards",
    "load_stage": "cascade.checkpoint",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cascade' has no attribute {name!r}")


__all__ = [
    "CascadeConfigError",
    "CascadePipeline",
    "GaussianDiffusion",
    "UNet",
    "aug_alpha_bar",
    "aug_level_from_alpha_bar",
    "classifier_free_guidance",
    "classifier_guidance",
    "load_stage",
    "make_betas",
    "make_stage_loader",
    "sample_ddim",
    "sample_ddpm",
    "space_timesteps",
    "train_stage",
    "write_shards",
]

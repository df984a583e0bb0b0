"""cascade: cascaded diffusion models for class-conditional image generation.

The diffusion core (schedules, forward process, losses, bound, respacing), the samplers and the guidance
wrappers are exported here; heavier pieces (the pipeline, training, data, metrics) load on first use.

Subpackages, lowest first (each imports only those before it; `tests/test_layering.py` checks it):
`diffusion` (the math and the samplers), `nets` (networks and their preconditioning), `data` (image
sources, shards, the stage loader), `pipeline` (sampling one stage or a chain of stages), `training`,
`evaluation`, and `harness` (the quality benchmark, the judge, the demo). `config`, `checkpoint`, `errors`,
`checks`, `atomic`, `imageops`, `device` and `locks` sit at the root and serve them all.
"""

from cascade.diffusion.gaussian import (
    GaussianDiffusion,
    aug_alpha_bar,
    aug_level_from_alpha_bar,
    make_betas,
    space_timesteps,
)
from cascade.diffusion.guidance import autoguidance, classifier_free_guidance, classifier_guidance
from cascade.diffusion.samplers import sample_ddim, sample_ddpm

_LAZY = {
    "CascadePipeline": "cascade.pipeline.cascade_pipeline",
    "CascadeConfigError": "cascade.pipeline.cascade_pipeline",
    "UNet": "cascade.nets.unet",
    "train_stage": "cascade.training.trainer",
    "make_stage_loader": "cascade.data.loader",
    "write_shards": "cascade.data.shards",
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
    "autoguidance",
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

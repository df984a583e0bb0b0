"""Stage definitions of the cascade (base, super-resolution, classifier) and the registry by name."""

from stages.build import build_diffusion, build_model, count_parameters, example_inputs, forward_flops
from stages.config import AugConfig, DiffusionConfig, StageConfig, UNetConfig
from stages.presets import SIZES, STAGE_NAMES, get_stage

__all__ = [
    "SIZES",
    "STAGE_NAMES",
    "AugConfig",
    "DiffusionConfig",
    "StageConfig",
    "UNetConfig",
    "build_diffusion",
    "build_model",
    "count_parameters",
    "example_inputs",
    "forward_flops",
    "get_stage",
]

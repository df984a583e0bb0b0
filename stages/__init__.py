"""The cascade's stage definitions: the presets of every stage (`stages.presets`) and their registry by name.

The configuration dataclasses and the builders live in the core package (`cascade.config`, `cascade.nets.build`)
and are re-exported here, so `stages` is the one place a user looks for what a stage is; the core never
imports this package.
"""

from cascade.config import AugConfig, DiffusionConfig, StageConfig, UNetConfig
from cascade.nets.build import build_diffusion, build_model, count_parameters, example_inputs, forward_flops
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

"""A checked sampling run: per-stage `SamplingSettings` resolved against the chain (`StagePlan`, `SamplingPlan`)
and the rules for building them from overrides. No sampling here: `cascade.pipeline.cascade_pipeline` runs a plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cascade.config import SamplingSettings, StageConfig, StageKind
from cascade.diffusion.gaussian import space_timesteps


class CascadeConfigError(ValueError):
    """A checkpoint or setting the cascade cannot use; the message is one line naming the stage and fix."""


@dataclass
class StagePlan:
    """One stage's part of a checked run: its settings and what they resolve to."""

    name: str
    resolution: int
    settings: SamplingSettings
    timesteps: list[int]  # the kept timesteps on the training scale
    aug_level: float | None = None  # SR stages: the level s the model is told (truncation moves it to ᾱ_k's)
    stop_at_index: int | None = None  # truncated: the respaced index whose z_k is handed over
    diffusion: Any = field(default=None, repr=False)  # the respaced diffusion

    def to_dict(self) -> dict[str, Any]:
        return {**self.settings.to_dict(), "resolution": self.resolution, "num_steps": len(self.timesteps),
                "aug_level": self.aug_level, "stop_at_index": self.stop_at_index}


@dataclass
class SamplingPlan:
    """Everything a run needs, checked before any sampling (see `CascadePipeline.validate`)."""

    classes: list[int]
    num_per_class: int
    seed: int
    batch_size: int | None
    stages: list[StagePlan]

    @property
    def labels(self) -> torch.Tensor:
        """Class of every sample: each class repeated num_per_class times, in the order given."""
        return torch.tensor(self.classes, dtype=torch.long).repeat_interleave(self.num_per_class)

    @property
    def indices(self) -> list[int]:
        """Index of every sample within its class."""
        return list(range(self.num_per_class)) * len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "classes": self.classes,
            "num_per_class": self.num_per_class,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "stages": {s.name: s.to_dict() for s in self.stages},
        }


def _per_stage(value: Any, names: Sequence[str], option: str) -> dict[str, Any]:
    """A single value for every stage, or a {stage: value} dict naming only stages of the chain."""
    if not isinstance(value, Mapping):
        return {n: value for n in names}
    for name in value:
        if name not in names:
            raise CascadeConfigError(
                f"{option}: stage {name!r} is not in the chain ({', '.join(names)}); drop it or add the stage"
            )
    return {n: value.get(n) for n in names}


def respaced_timesteps(name: str, num_timesteps: int, steps: int | str | None) -> list[int]:
    """The kept training timesteps for `SamplingSettings.steps` (its form already checked)."""
    if steps is None:
        return list(range(num_timesteps))
    if isinstance(steps, int) and steps > num_timesteps:
        raise CascadeConfigError(f"stage {name}: steps {steps} exceeds its {num_timesteps} training timesteps; "
                                 f"use at most {num_timesteps}")
    try:
        return sorted(space_timesteps(num_timesteps, str(steps)))
    except ValueError as err:
        raise CascadeConfigError(
            f"stage {name}: bad steps {steps!r} ({err}); use a count like 50, 'ddim25' or sections like '10,5'"
        ) from None


def settings_for(stage: StageConfig, base: SamplingSettings, changes: Mapping[str, Any]) -> SamplingSettings:
    """``base`` with ``changes``, checked for ``stage``; errors become one-line CascadeConfigErrors."""
    try:
        settings = dataclasses.replace(base, **changes)
        settings.check_for(stage)
    except (TypeError, ValueError) as err:
        message = str(err)
        raise CascadeConfigError(message if message.startswith(("stage ", "aug_level:")) else
                                 f"stage {stage.name}: {message}") from None
    return settings


# Settings that only some kinds take: a single value for the whole chain goes to those stages alone.
_ONLY_FOR = {"aug_level": StageKind.sr, "truncate": StageKind.sr, "classifier": StageKind.base,
             "classifier_scale": StageKind.base}
_SETTING_NAMES = tuple(f.name for f in dataclasses.fields(SamplingSettings))


def resolve_settings(configs: Sequence[StageConfig], overrides: Mapping[str, Any]) -> dict[str, SamplingSettings]:
    """Each stage's own `SamplingSettings` (``config.sampling``) with ``overrides``: one value for every stage it
    applies to (``aug_level``, ``truncate``: SR stages; ``classifier``, ``classifier_scale``: the base stage;
    the rest: all) or a {stage: value} dict naming stages of the chain; None keeps the default. Raises
    CascadeConfigError (one line, naming the stage) on an unknown setting or a bad value."""
    names = [c.name for c in configs]
    unknown = sorted(set(overrides) - set(_SETTING_NAMES))
    if unknown:
        raise CascadeConfigError(f"unknown sampling setting(s) {', '.join(unknown)}; valid: "
                                 f"{', '.join(_SETTING_NAMES)}")
    per_stage = {key: _per_stage(value, names, key) for key, value in overrides.items()}
    out = {}
    for cfg in configs:
        changes = {}
        for key, values in per_stage.items():
            value = values[cfg.name]
            named = isinstance(overrides[key], Mapping)
            if value is None or (not named and key in _ONLY_FOR and cfg.kind is not _ONLY_FOR[key]):
                continue
            changes[key] = value
        out[cfg.name] = settings_for(cfg, cfg.sampling, changes)
    return out

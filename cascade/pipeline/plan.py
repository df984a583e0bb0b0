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
from cascade.diffusion.distillation import distillation_timesteps
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
    guidance_input: bool = False  # a distilled stage: w is its network's input (one evaluation per step)
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


def stage_timesteps(stage: StageConfig, settings: SamplingSettings, num_timesteps: int | None = None) -> list[int]:
    """The kept training timesteps (ascending) ``stage`` samples at with ``settings`` (already checked for it): a step
    or consistency student's levels on its grid (`cascade.diffusion.distillation.distillation_timesteps`), else the
    respacing of ``settings.steps`` (`respaced_timesteps`); over ``num_timesteps`` training timesteps (None: the
    stage's T)."""
    num_timesteps = stage.diffusion.num_timesteps if num_timesteps is None else num_timesteps
    if stage.distill.method in ("step", "consistency"):  # its own grid (steps checked against it)
        return distillation_timesteps(num_timesteps, stage.distill.levels, settings.steps)
    return respaced_timesteps(stage.name, num_timesteps, settings.steps)


def monitor_settings(stage: StageConfig, steps: int | str) -> SamplingSettings:
    """The settings a training run's sample grids and quality proxy sample ``stage`` with: its own, over ``steps``
    (`TrainerConfig.sample_steps`), except a step or consistency student's, which keep their few steps (the levels it
    was trained on). Autoguidance (``guide`` "auto") is left out, as classifier guidance is: they sample the model
    being trained alone (w = 0), without loading its guide."""
    own = stage.sampling
    if own.guide == "auto":
        own = dataclasses.replace(own, guide="cfg", guide_checkpoint=None, w=0.0)
    if stage.distill.method in ("step", "consistency"):
        return own
    return dataclasses.replace(own, steps=steps)


def settings_for(stage: StageConfig, base: SamplingSettings, changes: Mapping[str, Any]) -> SamplingSettings:
    """``base`` with ``changes``, checked for ``stage``; errors become one-line CascadeConfigErrors. A change of
    ``guide`` to "cfg" without a ``guide_checkpoint`` change drops ``base``'s guide checkpoint."""
    if changes.get("guide") == "cfg" and "guide_checkpoint" not in changes:
        changes = {**changes, "guide_checkpoint": None}
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


def stage_overrides(configs: Sequence[StageConfig], overrides: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{stage: {setting: value}}: what ``overrides`` change in each stage's own settings. An override is one
    value for every stage it applies to (``aug_level``, ``truncate``: SR stages; ``classifier``,
    ``classifier_scale``: the base stage; the rest: all) or a {stage: value} dict naming stages of the chain;
    None keeps the default. Raises CascadeConfigError (one line) on an unknown setting or a stage not in the
    chain."""
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
        out[cfg.name] = changes
    return out


def resolve_settings(configs: Sequence[StageConfig], overrides: Mapping[str, Any]) -> dict[str, SamplingSettings]:
    """Each stage's own `SamplingSettings` (``config.sampling``) with ``overrides`` (as `stage_overrides` applies
    them). Raises CascadeConfigError (one line, naming the stage) on an unknown setting or a bad value."""
    changes = stage_overrides(configs, overrides)
    return {cfg.name: settings_for(cfg, cfg.sampling, changes[cfg.name]) for cfg in configs}


def model_call_indices(sampler: str, num_steps: int, stop_at_index: int | None = None) -> list[int]:
    """The respaced indices (0 .. num_steps − 1) at which ``sampler`` calls the model for one sample, in call order.

    ddpm, ddim and dpmpp2m call it once per step, from num_steps − 1 down to stop_at_index + 1 (0 without a stop).
    heun also calls it at the next level for its trapezoidal correction, except on the first step and on the step
    to clean data (Karras et al. 2022 "EDM" Algorithm 1; `cascade.diffusion.samplers.sample_heun`): 2N − 2 calls
    for N ≥ 2 steps to clean data, 2N − 1 when stopped early (truncation)."""
    stop = -1 if stop_at_index is None else stop_at_index
    visited = list(range(num_steps - 1, stop, -1))
    if sampler != "heun":
        return visited
    calls = []
    for step, index in enumerate(visited):
        calls.append(index)
        if step > 0 and index - 1 >= 0:  # the correction at the next level (none to clean data, none on step 0)
            calls.append(index - 1)
    return calls


def network_evaluations(settings: SamplingSettings, timesteps: Sequence[int], stop_at_index: int | None = None, *,
                        guidance_input: bool = False) -> int:
    """Network evaluations per image of one stage: NFE, counting each image the network sees in a call.

    ``timesteps``: the kept training timesteps (sorted; respaced index i is ``timesteps[i]``). Each model call
    (`model_call_indices`) costs 1, or 2 where guidance is on (w > 0 and t inside ``settings.guidance_interval``,
    if any): with guide "cfg" the conditional and the null-class prediction, batched in one call
    (`cascade.diffusion.guidance.ClassifierFreeGuidance`); with guide "auto" the model and its guide, one call
    each (`cascade.diffusion.guidance.AutoGuidance`); always 1 for a distilled stage (``guidance_input``: w is its
    network's input). A classifier's gradient (classifier guidance) is not counted."""
    interval = settings.guidance_interval

    def guided(index: int) -> bool:
        t = timesteps[index]
        return not guidance_input and settings.w > 0 and (interval is None or interval[0] <= t <= interval[1])

    return sum(2 if guided(i) else 1 for i in model_call_indices(settings.sampler, len(timesteps), stop_at_index))


def describe_stage_plan(sp: StagePlan, marks: Mapping[str, str] | None = None) -> str:
    """One line of what stage plan ``sp`` samples with, e.g. ``32x32 · ddim 25 steps · eta=0 · w=3 (--w) · 50 NFE/image``:
    resolution, sampler and step count, DDIM's η, w (and its interval; with autoguidance ``autoguidance w=1
    guide=<path>``), the SR level s and truncation, clipping, classifier guidance, and `network_evaluations` per
    image. ``marks``: {setting: label} of values given by the
    caller (a command-line option), shown after the value in parentheses; the rest are the stage's defaults."""
    marks = marks or {}
    s = sp.settings

    def mark(*keys: str) -> str:
        labels = [marks[k] for k in keys if k in marks]
        return f" ({', '.join(labels)})" if labels else ""

    items = [f"{sp.resolution}x{sp.resolution}",
             f"{s.sampler}{mark('sampler')} {len(sp.timesteps)} steps{mark('steps')}"]
    if s.sampler == "ddim":
        items.append(f"eta={s.eta:g}{mark('eta')}")
    w = f"w={s.w:g}{mark('w')}" + (" (distilled)" if sp.guidance_input else "")
    if s.guide == "auto":
        w = f"autoguidance{mark('guide')} {w} guide={s.guide_checkpoint}{mark('guide_checkpoint')}"
    if s.guidance_interval is not None and s.w > 0:
        w += f" for t in [{s.guidance_interval[0]:g}, {s.guidance_interval[1]:g}]{mark('guidance_interval')}"
    items.append(w)
    if sp.aug_level is not None:
        items.append(f"s={sp.aug_level:.3g}{mark('aug_level')}" + (f" truncated{mark('truncate')}" if s.truncate
                                                                    else ""))
    if sp.stop_at_index is not None:
        items.append(f"stops after {len(sp.timesteps) - 1 - sp.stop_at_index} of {len(sp.timesteps)} steps "
                     "(hands z_s on)")
    if s.dynamic_threshold is not None:
        items.append(f"dynamic threshold {s.dynamic_threshold:g}{mark('dynamic_threshold')}")
    elif not s.clip_denoised:
        items.append(f"unclipped{mark('clip_denoised')}")
    if s.classifier:
        items.append(f"classifier guidance {s.classifier_scale:g}{mark('classifier', 'classifier_scale')}")
    items.append(f"{network_evaluations(s, sp.timesteps, sp.stop_at_index, guidance_input=sp.guidance_input)} "
                 "NFE/image")
    return " · ".join(items)

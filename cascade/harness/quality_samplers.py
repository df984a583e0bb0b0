"""How the quality benchmark samples: `--samplers` and `--student-samplers` items (`SamplerSetting`,
`parse_samplers`), a distilled student's own settings when no `--student-samplers` are given
(`default_student_samplers`), one applied to a stage's own `SamplingSettings` and checked for it (`stage_settings`), and
`sample_images`, which samples with one through the cascade's stage sampler and counts the network evaluations per
image (a guided step of a teacher counts 2, a step of a distilled student 1)."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from cascade.checks import is_int
from cascade.config import SamplingSettings, StageConfig
from cascade.diffusion.samplers import SAMPLERS
from cascade.harness.quality_recipes import BenchError
from cascade.pipeline.stage_sampling import sample_stage

__all__ = ["SamplerSetting", "default_student_samplers", "parse_samplers", "sample_images", "stage_settings"]


@dataclass(frozen=True)
class SamplerSetting:
    """One way of sampling: `sampler` (a key of cascade.diffusion.samplers.SAMPLERS) over `steps` respaced steps, with
    classifier-free guidance weight w, DDIM η, and (SR stages) the augmentation level s (None: the stage's
    own `sampling.aug_level`); `sample_images` applies it to the stage's own `SamplingSettings`. `label` is the
    spec it was parsed from."""

    label: str
    sampler: str
    steps: int
    w: float | None  # None: the stage's own sampling.w
    eta: float = 0.0
    aug_level: float | None = None
    guidance_interval: tuple[float, float] | None = None  # None: the stage's own sampling.guidance_interval


_SPEC_KEYS = {"w": "w", "eta": "eta", "s": "aug_level", "gi": "guidance_interval"}


def parse_samplers(text: str, default_w: float | None,
                   samplers: Mapping[str, Callable] = SAMPLERS, option: str = "--samplers") -> list[SamplerSetting]:
    """`ddim25,ddpm50:w=1,ddim25:s=0.03,consistency4` → settings. Each item is SAMPLER STEPS (a sampler name
    followed by its step count) and optional `:w=W`, `:eta=E`, `:s=S`, `:gi=LO-HI` (guidance only for timesteps
    LO..HI); w defaults to `default_w` (None: the stage's own `sampling.w`). BenchError (one line starting with
    ``option``, the command-line option the text came from) on a bad item. Whether a setting suits a stage (the
    consistency sampler only for a consistency student, its steps at most the student's levels) is
    `stage_settings`'s check."""
    names = sorted(samplers, key=len, reverse=True)  # longest first: a name may end in a digit
    example = f"e.g. {option} ddim25,ddpm50:w=1"
    settings = []
    for item in [i.strip() for i in text.split(",")]:
        head, *options = item.split(":")
        name = next((n for n in names if head.startswith(n) and re.fullmatch(r"\d+", head[len(n):])), None)
        if name is None:
            raise BenchError(f"{option}: bad item {item!r}; expected SAMPLER STEPS with SAMPLER one of "
                             f"{', '.join(samplers)} ({example})")
        values: dict[str, float | None] = {"w": default_w}
        interval = None
        for part in options:
            key, sep, raw = part.partition("=")
            if not sep or key not in _SPEC_KEYS:
                raise BenchError(f"{option}: bad option {part!r} in {item!r}; use w=W, eta=E, s=S or gi=LO-HI "
                                 f"({example})")
            if key == "gi":
                bounds = re.fullmatch(r"(\d+(?:\.\d*)?)-(\d+(?:\.\d*)?)", raw)
                if bounds is None or float(bounds[1]) > float(bounds[2]):
                    raise BenchError(f"{option}: gi in {item!r} must be LO-HI timesteps with LO <= HI, e.g. "
                                     f"gi=100-800, got {raw!r}")
                interval = (float(bounds[1]), float(bounds[2]))
                continue
            try:
                values[key] = float(raw)
            except ValueError:
                raise BenchError(f"{option}: {key} in {item!r} must be a number, got {raw!r}") from None
        steps = int(head[len(name):])
        if steps < 1 or (values["w"] or 0.0) < 0 or values.get("eta", 0.0) < 0 or not 0 <= values.get("s", 0.0) <= 1:
            raise BenchError(f"{option}: {item!r}: need steps >= 1, w >= 0, eta >= 0 and s in [0, 1]")
        if values.get("eta", 0.0) and "eta" not in inspect.signature(samplers[name]).parameters:
            raise BenchError(f"{option}: {item!r}: sampler {name} takes no eta")
        settings.append(SamplerSetting(item, name, steps, **{_SPEC_KEYS[k]: v for k, v in values.items()},
                                       guidance_interval=interval))
    labels = [s.label for s in settings]
    if len(set(labels)) != len(labels):
        raise BenchError(f"{option}: an item is named twice in {text!r}; name each once")
    return settings


def default_student_samplers(student: StageConfig, default_w: float | None = None) -> list[SamplerSetting]:
    """The settings a distilled ``student`` is sampled with when no `--student-samplers` are given: its own
    sampler and steps (`student.sampling`, as `cascade.training.distill.student_stage` set them: ``ddim4`` for a
    base step student, ``ddim2`` for an SR one; the teacher's own sampler for a guidance student) and, for a
    consistency student, also 1 and 2 steps (fewest first). Labels as `parse_samplers` reads them (a step count
    that is not a number in brackets); w is ``default_w`` (None: the student's own ``sampling.w``)."""
    own = student.sampling
    step_counts = [own.steps]
    if student.distill.method == "consistency":
        step_counts = sorted({1, 2} | {own.steps})
    eta = f":eta={own.eta:g}" if own.eta else ""
    return [SamplerSetting(f"{own.sampler}{steps if is_int(steps) else f'[{steps}]'}{eta}", own.sampler, steps,
                           default_w, eta=own.eta) for steps in step_counts]


def stage_settings(stage_cfg: StageConfig, setting: SamplerSetting, option: str = "--samplers") -> SamplingSettings:
    """The stage's own `SamplingSettings` as ``setting`` changes them, checked for the stage
    (`SamplingSettings.check_for`: e.g. a consistency student samples only with the consistency sampler, in 1 to
    its ``distill.levels`` steps, at w up to its ``distill.w_max``). BenchError (one line: ``option``, the item,
    the reason) otherwise."""
    changes: dict[str, Any] = {"sampler": setting.sampler, "steps": setting.steps, "eta": setting.eta}
    if setting.w is not None:
        changes["w"] = setting.w
    if setting.aug_level is not None:
        changes["aug_level"] = setting.aug_level
    if setting.guidance_interval is not None:
        changes["guidance_interval"] = setting.guidance_interval
    try:
        settings = dataclasses.replace(stage_cfg.sampling, **changes)  # the stage's own defaults, as changed
        settings.check_for(stage_cfg)
    except ValueError as err:
        raise BenchError(f"{option}: {setting.label}: {err}") from None
    return settings


@contextlib.contextmanager
def _count_forward_rows(model: torch.nn.Module) -> Iterator[list[int]]:
    """Yields [rows]: the images `model`'s forward passes process while inside (a guided step runs 2 per image)."""
    rows = [0]

    def hook(_module, args, kwargs):
        first = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        rows[0] += int(first.shape[0])

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()


def sample_images(model: torch.nn.Module, diffusion: Any, stage_cfg: StageConfig, setting: SamplerSetting,
                  labels: torch.Tensor, x_low: torch.Tensor | None = None, *, seed: int = 0, batch_size: int = 100,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
    """Sample `labels` (N) with one setting: (N×3×R×R float32 CPU images, network evaluations per image).

    The stage's own `SamplingSettings` as `setting` changes them (`stage_settings`; BenchError when they do
    not suit the stage), sampled by the cascade's stage sampler
    (`cascade.pipeline.stage_sampling.sample_stage`): SR stages take clean low-resolution inputs x_low
    (N×3×r×r in [-1, 1]), re-noised to level s as the cascade re-noises them; sample i's noise is seeded by
    (`seed`, stage, i), so it does not depend on `batch_size`."""
    settings = stage_settings(stage_cfg, setting)
    with _count_forward_rows(model) as rows:
        images = sample_stage(model, diffusion, stage_cfg, settings, labels, x_low, seed=seed, batch_size=batch_size,
                              device=device)
    return images, rows[0] / len(labels)

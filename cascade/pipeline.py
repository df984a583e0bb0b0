"""CascadePipeline: chain independently trained stages at sampling time.

base stage → (its output re-noised to level s, or, truncated, its reverse process stopped at the step
matching s and z_k handed over) → SR stage → … Each stage is rebuilt from its checkpoint alone.

Reproducibility: all noise of sample i (its x_T, its augmentation noise and the per-step noise of the
ancestral sampler or DDIM with eta > 0) comes from generators seeded by (seed, stage, purpose, i), so a
sample does not depend on the batch size or on the other samples: the same seed gives the same images
up to the rounding of batched convolutions.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from cascade.augment import condition_low_res
from cascade.checkpoint import load_config, load_stage, resolve_checkpoint
from cascade.diffusion import aug_alpha_bar, aug_level_from_alpha_bar, space_timesteps
from cascade.imageops import float_to_uint8
from cascade.samplers import (
    classifier_free_guidance,
    classifier_guidance,
    draw_noise,
    sample_ddim,
    sample_ddpm,
)

DEFAULT_CHAIN = ("base32", "sr64", "sr128", "sr256")
SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim}
PRECISIONS = ("fp32", "bf16")
LABELS_KEY = "labels"


class CascadeConfigError(ValueError):
    """A checkpoint or setting the cascade cannot use; the message is one line naming the stage and fix."""


@dataclass
class LoadedStage:
    """One stage rebuilt from its checkpoint."""

    name: str
    config: Any  # stages.StageConfig
    model: torch.nn.Module
    diffusion: Any  # cascade.GaussianDiffusion on the training timesteps
    checkpoint: Path
    step: int
    class_names: list[str] | None = None


@dataclass
class StagePlan:
    """Resolved sampling settings of one stage."""

    name: str
    resolution: int
    w: float
    steps: int | str | None  # as requested; None = every training timestep
    timesteps: list[int]  # the kept timesteps on the training scale
    aug_level: float | None = None  # SR stages: the level s the model is told
    sampler: str = "ddpm"  # "ddpm" (ancestral, Algorithm 2) or "ddim"
    stop_at_index: int | None = None  # truncated: the respaced index whose z_k is handed over
    diffusion: Any = field(default=None, repr=False)  # the respaced diffusion

    def to_dict(self) -> dict[str, Any]:
        return {
            "resolution": self.resolution,
            "w": self.w,
            "steps": self.steps,
            "num_steps": len(self.timesteps),
            "aug_level": self.aug_level,
            "sampler": self.sampler,
            "stop_at_index": self.stop_at_index,
        }


@dataclass
class SamplingPlan:
    """Everything a run needs, checked before any sampling (see `CascadePipeline.validate`)."""

    classes: list[int]
    num_per_class: int
    sampler: str | dict[str, str]  # as requested; each StagePlan holds its own
    eta: float
    truncate: bool
    seed: int
    batch_size: int | None
    classifier: str | None
    classifier_scale: float
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
            "sampler": self.sampler,
            "eta": self.eta,
            "truncate": self.truncate,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "classifier": self.classifier,
            "classifier_scale": self.classifier_scale,
            "stages": {s.name: s.to_dict() for s in self.stages},
        }


def _sample_seed(*parts: int) -> int:
    """A 63-bit seed derived from non-negative integers (numpy SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _stage_key(name: str) -> int:
    return zlib.crc32(name.encode())


_X_T, _AUG_NOISE, _STEP_NOISE = 0, 1, 2  # the purposes noise is drawn for


def _per_sample_generators(seed: int, stage: str, purpose: int, indices: range) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by (seed, stage, purpose, sample index): the same noise on every
    device and for every batching."""
    return [torch.Generator().manual_seed(_sample_seed(seed, _stage_key(stage), purpose, i)) for i in indices]


def _per_sample_noise(seed: int, stage: str, purpose: int, indices: range, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise of each sample from its own CPU generator: independent of the batching."""
    return draw_noise((len(indices), *shape), _per_sample_generators(seed, stage, purpose, indices), "cpu")


def _class_names(record: dict[str, Any]) -> list[str] | None:
    """Class names of the dataset a stage was trained on, as the trainer records them."""
    names = record.get("train", {}).get("dataset", {}).get("class_names")
    return [str(n) for n in names] if names else None


def _check_chain(names: Sequence[str], configs: Sequence[Any]) -> None:
    """Each SR stage must take the previous stage's output size; the chain starts with a base stage."""
    if not names:
        raise CascadeConfigError("no stages given; name at least the base stage, e.g. base32")
    for i, (name, cfg) in enumerate(zip(names, configs)):
        if cfg.name != name:
            raise CascadeConfigError(
                f"stage {name}: its checkpoint holds stage {cfg.name!r}; give {name} a {name} checkpoint"
            )
        if i == 0 and cfg.kind != "base":
            raise CascadeConfigError(
                f"stage {name}: the chain must start with a base stage, but {name} is a {cfg.kind} stage; "
                "start with base32"
            )
        if i > 0 and cfg.kind != "sr":
            raise CascadeConfigError(
                f"stage {name}: only super-resolution stages can follow the base stage, but {name} is a "
                f"{cfg.kind} stage; remove it from the chain"
            )
        if i > 0 and cfg.low_resolution != configs[i - 1].resolution:
            prev = names[i - 1]
            raise CascadeConfigError(
                f"stage {name}: takes {cfg.low_resolution}x{cfg.low_resolution} inputs but {prev} makes "
                f"{configs[i - 1].resolution}x{configs[i - 1].resolution} images; put a stage of resolution "
                f"{cfg.low_resolution} before {name} or drop {name}"
            )


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


def _respaced_timesteps(name: str, num_timesteps: int, steps: int | str | None) -> list[int]:
    if steps is None:
        return list(range(num_timesteps))
    if isinstance(steps, bool) or not isinstance(steps, (int, str)):
        raise CascadeConfigError(f"stage {name}: steps must be an int or a spacing string, got {steps!r}")
    if isinstance(steps, int):
        if steps < 1:
            raise CascadeConfigError(f"stage {name}: steps must be a positive number of steps, got {steps}")
        if steps > num_timesteps:
            raise CascadeConfigError(
                f"stage {name}: steps {steps} exceeds its {num_timesteps} training timesteps; "
                f"use at most {num_timesteps}"
            )
    try:
        return sorted(space_timesteps(num_timesteps, str(steps)))
    except ValueError as err:
        raise CascadeConfigError(
            f"stage {name}: bad steps {steps!r} ({err}); use a count like 50, 'ddim25' or sections like '10,5'"
        ) from None


def _number(what: str, value: Any, low: float, high: float | None = None) -> float:
    """`value` as a float in [low, high]; `what` names it in the error ("stage sr64: w")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CascadeConfigError(f"{what} must be a number, got {value!r}")
    if not value >= low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise CascadeConfigError(f"{what} must be {bound}, got {value}")
    return float(value)


def _check_start_index(start_index: Any) -> None:
    if isinstance(start_index, bool) or not isinstance(start_index, int) or start_index < 0:
        raise CascadeConfigError(f"start_index must be an integer >= 0, got {start_index!r}")


def _check_device(device: str | torch.device, precision: str) -> torch.device:
    if precision not in PRECISIONS:
        raise CascadeConfigError(f"precision {precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CascadeConfigError(f"device {device!r} is not a torch device; use e.g. cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CascadeConfigError(f"device {device} is not available on this machine; use cpu")
    return dev


def _read_checkpoint(name: str, path: str | Path) -> tuple[Path, dict[str, Any], Any]:
    """(step folder, config record, StageConfig) of a checkpoint, without loading weights."""
    import stages as stage_registry  # stage definitions live outside the core package

    try:
        ckpt = resolve_checkpoint(path)
        record = load_config(ckpt)
        return ckpt, record, stage_registry.StageConfig.from_dict(record["stage"])
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise CascadeConfigError(f"stage {name}: {err}; train it or pass a checkpoint for {name}") from None


def _load(name: str, ckpt: Path, record: dict[str, Any], cfg: Any, device: torch.device,
          weights: str = "ema") -> LoadedStage:
    _, model, diffusion = load_stage(ckpt, weights=weights, device=device)
    return LoadedStage(name, cfg, model, diffusion, ckpt, int(record["step"]), _class_names(record))


class CascadePipeline:
    """Samples classes through a chain of stages: base → sr64 → sr128 → sr256 (or a prefix of it)."""

    def __init__(self, stages: Sequence[LoadedStage], *, device: str | torch.device = "cpu",
                 precision: str = "fp32"):
        _check_chain([s.name for s in stages], [s.config for s in stages])
        self.device = _check_device(device, precision)
        self.precision = precision
        self.stages = list(stages)
        self._classifiers: dict[str, LoadedStage] = {}
        for stage in self.stages:
            self._place(stage.model)

    def _place(self, model: torch.nn.Module) -> None:
        model.to(self.device)
        if self.precision == "bf16" and self.device.type == "cuda":
            model.to(memory_format=torch.channels_last)

    @classmethod
    def from_checkpoints(cls, checkpoints: Mapping[str, str | Path], *, device: str | torch.device = "cpu",
                         precision: str = "fp32", weights: str = "ema") -> CascadePipeline:
        """Build from {stage: checkpoint path} in chain order (run dir, its checkpoints dir or a step dir).

        The chain is checked from the checkpoints' configs before any weights are loaded.
        """
        dev = _check_device(device, precision)
        found = {name: _read_checkpoint(name, path) for name, path in checkpoints.items()}
        _check_chain(list(found), [cfg for _, _, cfg in found.values()])
        return cls([_load(name, *found[name], dev, weights) for name in found], device=dev, precision=precision)

    @classmethod
    def from_runs(cls, runs_dir: str | Path = "runs", stages: Sequence[str] = DEFAULT_CHAIN, *,
                  checkpoints: Mapping[str, str | Path] | None = None, **kwargs: Any) -> CascadePipeline:
        """Latest checkpoint of `<runs_dir>/<stage>/` per stage; `checkpoints` overrides some stages."""
        checkpoints = dict(checkpoints or {})
        for name in checkpoints:
            if name not in stages:
                raise CascadeConfigError(
                    f"stage {name}: has a checkpoint but is not in the chain ({', '.join(stages)}); "
                    "add it to the stages or drop its checkpoint"
                )
        chain = {name: checkpoints.get(name, Path(runs_dir) / name) for name in stages}
        return cls.from_checkpoints(chain, **kwargs)

    @property
    def class_names(self) -> list[str] | None:
        """Class names recorded in the base stage's checkpoint, if any."""
        return self.stages[0].class_names

    def run_record(self, plan: SamplingPlan) -> dict[str, Any]:
        """The JSON record of a sampling run: settings, checkpoints, device, precision and class names."""
        return {**plan.to_dict(), "checkpoints": self.checkpoints(), "device": str(self.device),
                "precision": self.precision, "class_names": self.class_names}

    def checkpoints(self) -> dict[str, dict[str, Any]]:
        """Where each stage came from, for the record of a run."""
        found = {s.name: {"path": str(s.checkpoint), "step": s.step} for s in self.stages}
        found.update({f"classifier:{p}": {"path": str(c.checkpoint), "step": c.step}
                      for p, c in self._classifiers.items()})
        return found

    def _classifier(self, path: str | Path) -> LoadedStage:
        key = str(path)
        if key not in self._classifiers:
            ckpt, record, cfg = _read_checkpoint("classifier", path)
            base = self.stages[0].config
            if cfg.kind != "classifier":
                raise CascadeConfigError(
                    f"classifier: {path} holds a {cfg.kind} stage ({cfg.name}); pass a classifier checkpoint"
                )
            if cfg.resolution != base.resolution:
                raise CascadeConfigError(
                    f"classifier: it sees {cfg.resolution}x{cfg.resolution} images but the base stage "
                    f"{base.name} makes {base.resolution}x{base.resolution}; pass a matching classifier"
                )
            ours, theirs = base.diffusion, cfg.diffusion
            if (ours.schedule, ours.num_timesteps) != (theirs.schedule, theirs.num_timesteps):
                raise CascadeConfigError(
                    f"classifier: trained on a {theirs.schedule} schedule of {theirs.num_timesteps} steps but "
                    f"{base.name} uses {ours.schedule} with {ours.num_timesteps}; pass a classifier trained "
                    f"on {base.name}'s schedule"
                )
            self._classifiers[key] = _load("classifier", ckpt, record, cfg, self.device)
            self._place(self._classifiers[key].model)
        return self._classifiers[key]

    def validate(self, classes: Sequence[int], *, num_per_class: int = 1, w: float | Mapping = 0.0,
                 steps: int | str | Mapping | None = None, sampler: str | Mapping = "ddpm", eta: float = 0.0,
                 aug_level: float | Mapping | None = None, truncate: bool = False,
                 classifier: str | Path | None = None, classifier_scale: float = 0.0,
                 batch_size: int | None = None, seed: int = 0) -> SamplingPlan:
        """Every check before any sampling; returns the resolved plan or raises CascadeConfigError.

        w, steps, sampler and aug_level are one value for all (SR) stages or a {stage: value} dict;
        aug_level defaults to each SR stage's `aug.sample_aug_level`, steps to every training timestep,
        sampler to "ddpm".
        """
        names = [s.name for s in self.stages]
        if isinstance(classes, (int, str)) or not classes:
            raise CascadeConfigError(f"classes must be a non-empty list of class indices, got {classes!r}")
        for c in classes:
            if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
                raise CascadeConfigError(f"classes must be integers, got {c!r}")
            for stage in self.stages:
                n = stage.config.num_classes
                if not 0 <= c < n:
                    raise CascadeConfigError(
                        f"stage {stage.name}: class {c} is out of range; its checkpoint knows {n} classes, "
                        f"choose classes in 0..{n - 1}"
                    )
        for option, value, low in (("num_per_class", num_per_class, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise CascadeConfigError(f"{option} must be an integer >= {low}, got {value!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise CascadeConfigError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        samplers = _per_stage(sampler, names, "sampler")
        for name, value in samplers.items():
            if value is not None and value not in SAMPLERS:
                raise CascadeConfigError(
                    f"stage {name}: sampler {value!r} is unknown; use one of {', '.join(SAMPLERS)}"
                )
        eta = _number("eta", eta, 0.0)
        classifier_scale = _number(f"stage {names[0]}: classifier_scale", classifier_scale, 0.0)
        if classifier_scale > 0 and classifier is None:
            raise CascadeConfigError(
                f"stage {names[0]}: classifier_scale {classifier_scale} needs a classifier checkpoint; "
                "pass one (--classifier PATH)"
            )
        if classifier is not None:
            n = self._classifier(classifier).config.num_classes
            if max(classes) >= n or min(classes) < 0:
                raise CascadeConfigError(f"classifier: knows {n} classes; choose classes in 0..{n - 1}")

        ws = _per_stage(w, names, "w")
        stepss = _per_stage(steps, names, "steps")
        if isinstance(aug_level, Mapping) and names[0] in aug_level:
            raise CascadeConfigError(
                f"aug_level: stage {names[0]} is the base stage and takes no conditioning; name SR stages only"
            )
        augs = _per_stage(aug_level, names, "aug_level")
        plans = []
        for stage in self.stages:
            cfg = stage.config
            timesteps = _respaced_timesteps(stage.name, stage.diffusion.num_timesteps, stepss[stage.name])
            plan = StagePlan(
                name=stage.name,
                resolution=cfg.resolution,
                w=_number(f"stage {stage.name}: w", 0.0 if ws[stage.name] is None else ws[stage.name], 0.0),
                steps=stepss[stage.name],
                timesteps=timesteps,
                sampler=samplers[stage.name] or "ddpm",
                diffusion=stage.diffusion.respace(timesteps),
            )
            if cfg.kind == "sr":
                s = augs[stage.name]
                plan.aug_level = _number(f"stage {stage.name}: aug_level", cfg.aug.sample_aug_level if s is None else s,
                                         0.0, 1.0)
            plans.append(plan)
        if truncate:
            for prev, nxt in itertools.pairwise(plans):
                self._truncate(prev, nxt)
        return SamplingPlan(
            classes=[int(c) for c in classes], num_per_class=num_per_class,
            sampler=dict(sampler) if isinstance(sampler, Mapping) else sampler, eta=eta,
            truncate=bool(truncate), seed=seed, batch_size=batch_size,
            classifier=None if classifier is None else str(classifier), classifier_scale=classifier_scale,
            stages=plans,
        )

    @staticmethod
    def _truncate(prev: StagePlan, nxt: StagePlan) -> None:
        """Stop `prev` at the index k whose ᾱ_k is nearest ᾱ(s) of `nxt` and tell `nxt` the level of z_k."""
        alphas_cumprod = torch.as_tensor(prev.diffusion.alphas_cumprod, dtype=torch.float64)
        target = aug_alpha_bar(torch.tensor(nxt.aug_level, dtype=torch.float64))  # ᾱ(s), contracts
        k = int(torch.argmin((alphas_cumprod - target).abs()))
        prev.stop_at_index = k
        nxt.aug_level = float(aug_level_from_alpha_bar(alphas_cumprod[k : k + 1])[0])

    def _guided(self, stage: LoadedStage, plan: StagePlan, run: SamplingPlan) -> Any:
        model = stage.model
        if plan.w > 0:  # eq. 17, batched conditional + null-class call
            model = classifier_free_guidance(model, plan.w, stage.config.num_classes)
        if stage is self.stages[0] and run.classifier is not None and run.classifier_scale > 0:  # eq. 16
            classifier = self._classifier(run.classifier).model
            model = classifier_guidance(model, classifier, plan.diffusion.original_alphas_cumprod,
                                        run.classifier_scale)
        return model

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sample_stage(self, stage: LoadedStage, sp: StagePlan, plan: SamplingPlan, labels: torch.Tensor,
                      x_low: torch.Tensor | None, *, start_index: int, progress: bool) -> torch.Tensor:
        """Sample one stage for `labels` (N) from `x_low` (SR stages: the previous stage's output, or z_k when
        the plan is truncated); sample i draws its noise as sample start_index + i of the run."""
        n = len(labels)
        batch = plan.batch_size or n
        model = self._guided(stage, sp, plan)
        sample = SAMPLERS[sp.sampler]
        if sp.sampler == "ddim":
            sample = partial(sample, eta=plan.eta)
        steps_run = len(sp.timesteps) - (0 if sp.stop_at_index is None else sp.stop_at_index + 1)
        shape = (3, sp.resolution, sp.resolution)
        chunks = []
        with tqdm(total=steps_run * -(-n // batch), desc=f"{sp.name} ({sp.resolution}x{sp.resolution})",
                  disable=not progress, leave=True) as bar:
            for start in range(0, n, batch):
                stop = min(start + batch, n)
                idx = range(start_index + start, start_index + stop)  # the samples' indices in the run
                kwargs: dict[str, torch.Tensor] = {"y": labels[start:stop].to(self.device)}
                if stage.config.kind == "sr":
                    low = x_low[start:stop].to(self.device)
                    if plan.truncate:  # z_k is already at the level s of ᾱ_k
                        level = torch.full((len(idx),), sp.aug_level, device=self.device)
                    else:  # re-noise the clean input: x_s = √ᾱ(s)·x + √(1−ᾱ(s))·ε (contracts)
                        noise = _per_sample_noise(plan.seed, sp.name, _AUG_NOISE, idx, low.shape[1:])
                        low, level = condition_low_res(low, sp.aug_level, noise=noise.to(self.device))
                    kwargs.update(x_low=low, aug_level=level)
                x_T = _per_sample_noise(plan.seed, sp.name, _X_T, idx, shape).to(self.device)
                generator = _per_sample_generators(plan.seed, sp.name, _STEP_NOISE, idx)
                with self._autocast():
                    x = sample(model, sp.diffusion, x_T=x_T, model_kwargs=kwargs,
                               stop_at_index=sp.stop_at_index, generator=generator,
                               callback=lambda *a, **k: bar.update(1))
                chunks.append(x.float().cpu())
        return torch.cat(chunks)

    def run(self, plan: SamplingPlan, *, progress: bool = True, start_index: int = 0) -> dict[str, torch.Tensor]:
        """Sample a validated plan: {stage: N×3×R×R float32 CPU images, "labels": N}.

        A truncated stage's entry is the z_k it handed over (not clamped to [-1, 1]). `start_index` makes
        this run the samples start_index.. of a longer one with the same seed.
        """
        _check_start_index(start_index)
        labels = plan.labels
        out: dict[str, torch.Tensor] = {}
        prev: torch.Tensor | None = None
        for stage, sp in zip(self.stages, plan.stages):
            out[sp.name] = prev = self._sample_stage(stage, sp, plan, labels, prev, start_index=start_index,
                                                     progress=progress)
        out[LABELS_KEY] = labels
        return out

    def sample_stage(self, name: str, labels: Sequence[int] | torch.Tensor, x_low: torch.Tensor | None = None, *,
                     w: float | Mapping = 0.0, steps: int | str | Mapping | None = None, sampler: str | Mapping = "ddpm",
                     eta: float = 0.0, aug_level: float | Mapping | None = None, seed: int = 0,
                     batch_size: int | None = None, start_index: int = 0, progress: bool = False) -> torch.Tensor:
        """Sample one stage alone: the base stage from noise, an SR stage from given clean low-resolution
        images `x_low` N×3×r×r (e.g. real ones: teacher forcing), re-noised to its level s exactly as `run`
        re-noises the previous stage's output. Settings as in `validate`; returns N×3×R×R float32 CPU images,
        equal to `run`'s images of that stage for the same labels, inputs, seed and start_index.
        """
        names = [s.name for s in self.stages]
        if name not in names:
            raise CascadeConfigError(f"stage {name}: not in the chain ({', '.join(names)}); add it to the stages")
        labels = torch.as_tensor(labels)
        if labels.ndim != 1 or labels.numel() == 0 or labels.is_floating_point():
            raise CascadeConfigError(f"stage {name}: labels must be a non-empty vector of class indices, "
                                     f"got shape {tuple(labels.shape)} {labels.dtype}")
        _check_start_index(start_index)
        stage = self.stages[names.index(name)]
        cfg = stage.config
        if cfg.kind == "sr":
            want = (len(labels), 3, cfg.low_resolution, cfg.low_resolution)
            if not isinstance(x_low, torch.Tensor) or tuple(x_low.shape) != want or not x_low.is_floating_point():
                got = f"{tuple(x_low.shape)} {x_low.dtype}" if isinstance(x_low, torch.Tensor) else repr(x_low)
                raise CascadeConfigError(f"stage {name}: x_low must be float images of shape {want} in [-1, 1], "
                                         f"got {got}")
        elif x_low is not None:
            raise CascadeConfigError(f"stage {name}: is a {cfg.kind} stage and takes no x_low; pass None")
        plan = self.validate(labels.tolist(), w=w, steps=steps, sampler=sampler, eta=eta, aug_level=aug_level,
                             batch_size=batch_size, seed=seed)
        return self._sample_stage(stage, plan.stages[names.index(name)], plan, plan.labels, x_low,
                                  start_index=start_index, progress=progress)

    def __call__(self, classes: Sequence[int], *, progress: bool = True, **settings: Any) -> dict[str, torch.Tensor]:
        """Validate then sample; settings as in `validate`. Returns {stage: images, "labels": labels}."""
        return self.run(self.validate(classes, **settings), progress=progress)


def class_label(label: int, class_names: Sequence[str] | None = None) -> str:
    """The class by name when known, else its index."""
    return class_names[label] if class_names and label < len(class_names) else str(label)


def sample_stem(label: int, index: int, class_names: Sequence[str] | None = None) -> str:
    """File name stem `<class>_<index>`."""
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', class_label(label, class_names))}_{index}"


def labelled_grid(outputs: Mapping[str, torch.Tensor], plan: SamplingPlan,
                  class_names: Sequence[str] | None = None) -> Image.Image:
    """One row per sample (grouped by class), one column per stage, each shown at the final size."""
    cell = plan.stages[-1].resolution
    font = ImageFont.load_default()
    labels, indices = plan.labels.tolist(), plan.indices
    row_labels = [f"{class_label(c, class_names)} #{i}" for c, i in zip(labels, indices)]
    margin, header = 8 + int(max(font.getlength(t) for t in row_labels)), 20
    grid = Image.new("RGB", (margin + cell * len(plan.stages), header + cell * len(labels)), "white")
    draw = ImageDraw.Draw(grid)
    for j, sp in enumerate(plan.stages):
        draw.text((margin + j * cell + 4, 4), f"{sp.name} ({sp.resolution}x{sp.resolution})", fill="black", font=font)
        images = float_to_uint8(outputs[sp.name]).numpy()
        for i, image in enumerate(images):
            tile = Image.fromarray(image).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (margin + j * cell, header + i * cell))
    for i, text in enumerate(row_labels):
        draw.text((4, header + i * cell + 4), text, fill="black", font=font)
    return grid


def write_outputs(outputs: Mapping[str, torch.Tensor], plan: SamplingPlan, out_dir: str | Path, *,
                  record: Mapping[str, Any], class_names: Sequence[str] | None = None) -> Path:
    """Final PNGs `<out>/<class>_<index>.png`, every stage in `<out>/<stage>/`, `grid.png`, `settings.json`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stems = [sample_stem(c, i, class_names) for c, i in zip(plan.labels.tolist(), plan.indices)]
    final = plan.stages[-1].name
    for sp in plan.stages:
        (out / sp.name).mkdir(exist_ok=True)
        for stem, image in zip(stems, float_to_uint8(outputs[sp.name]).numpy()):
            Image.fromarray(image).save(out / sp.name / f"{stem}.png")
            if sp.name == final:
                Image.fromarray(image).save(out / f"{stem}.png")
    labelled_grid(outputs, plan, class_names).save(out / "grid.png")
    tmp = out / ".settings.json.tmp"  # written last and atomically: its presence marks a complete folder
    tmp.write_text(json.dumps(dict(record), indent=2, sort_keys=True))
    tmp.replace(out / "settings.json")
    return out

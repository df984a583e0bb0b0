"""CascadePipeline: chain independently trained stages at sampling time.

base stage → (its output re-noised to level s, or, truncated, its reverse process stopped at the step
matching s and z_k handed over) → SR stage → … Each stage is rebuilt from its checkpoint alone.

Reproducibility: all noise of sample i (its x_T, its augmentation noise and the per-step noise of the
ancestral sampler or DDIM with eta > 0) comes from generators seeded by (seed, stage, purpose, i), so a
sample does not depend on the batch size or on the other samples: the same seed gives the same images
up to the rounding of batched convolutions.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cascade.checks import is_int, is_int_at_least
from cascade.config import SamplingSettings, StageKind
from cascade.device import SAMPLING_PRECISIONS, resolve_sampling_precision
from cascade.diffusion.gaussian import aug_alpha_bar, aug_level_from_alpha_bar
from cascade.pipeline.chain import (
    LoadedStage,
    check_chain,
    check_classifier,
    check_guide,
    load_loaded_stage,
    read_checkpoint,
)
from cascade.pipeline.plan import (
    CascadeConfigError,
    SamplingPlan,
    StagePlan,
    describe_stage_plan,
    resolve_settings,
    settings_for,
    stage_overrides,
    stage_timesteps,
)
from cascade.pipeline.stage_sampling import sample_stage

__all__ = ["DEFAULT_CHAIN", "LABELS_KEY", "PRECISIONS", "CascadeConfigError", "CascadePipeline", "LoadedStage",
           "NonFiniteSamplesError", "SamplingPlan", "StagePlan"]

DEFAULT_CHAIN = ("base32", "sr64", "sr128", "sr256")
PRECISIONS = SAMPLING_PRECISIONS  # auto: bf16 autocast where the device computes it natively, else fp32
LABELS_KEY = "labels"



def _check_start_index(start_index: Any) -> None:
    if not is_int_at_least(start_index, 0):
        raise CascadeConfigError(f"start_index must be an integer >= 0, got {start_index!r}")


def _check_device(device: str | torch.device, precision: str) -> tuple[torch.device, str]:
    """(device, resolved precision): "auto" becomes bf16 where the device computes it natively, else fp32."""
    if precision not in PRECISIONS:
        raise CascadeConfigError(f"precision {precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CascadeConfigError(f"device {device!r} is not a torch device; use e.g. cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CascadeConfigError(f"device {device} is not available on this machine; use cpu")
    return dev, resolve_sampling_precision(precision, dev)


class NonFiniteSamplesError(RuntimeError):
    """A stage's samples hold NaN or infinite values; the message is one line naming the stage."""


class CascadePipeline:
    """Samples classes through a chain of stages: base → sr64 → sr128 → sr256 (or a prefix of it).

    ``precision``: "fp32", "bf16" (autocast) or "auto" (bf16 where the device computes it natively,
    `cascade.device.native_bf16`, else fp32; the default here as in the command-line tools, so a library run
    and a tool run sample the same images); ``self.precision`` is the resolved one.
    """

    def __init__(self, stages: Sequence[LoadedStage], *, device: str | torch.device = "cpu",
                 precision: str = "auto"):
        check_chain([s.name for s in stages], [s.config for s in stages])
        self.device, self.precision = _check_device(device, precision)  # the resolved precision: fp32 or bf16
        self.stages = list(stages)
        self._classifiers: dict[str, LoadedStage] = {}
        self._guides: dict[tuple[str, str], LoadedStage] = {}  # (stage, guide_checkpoint) → its autoguidance guide
        for stage in self.stages:
            self._place(stage.model)

    def _place(self, model: torch.nn.Module) -> None:
        model.to(self.device)
        # channels_last: on CPU in both precisions (the faster layout for every tiny stage and chunk size in
        # `tools/bench.py --chunks`, docs/results/2026-12-07.md), on CUDA with bf16 (tensor cores)
        if self.device.type == "cpu" or self.precision == "bf16" and self.device.type == "cuda":
            model.to(memory_format=torch.channels_last)

    @classmethod
    def from_checkpoints(cls, checkpoints: Mapping[str, str | Path], *, device: str | torch.device = "cpu",
                         precision: str = "auto", weights: str = "ema") -> CascadePipeline:
        """Build from {stage: checkpoint path} in chain order (run dir, its checkpoints dir or a step dir).

        The chain is checked from the checkpoints' configs before any weights are loaded.
        """
        dev, _ = _check_device(device, precision)
        found = {name: read_checkpoint(name, path) for name, path in checkpoints.items()}
        check_chain(list(found), [cfg for _, _, cfg in found.values()])
        return cls([load_loaded_stage(name, *found[name], dev, weights) for name in found], device=dev, precision=precision)

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

    def describe(self, plan: SamplingPlan, overrides: Mapping[str, Any] | None = None, *,
                 labels: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
        """One (stage name, text) row per stage of ``plan``: its checkpoint and step, then `describe_stage_plan`,
        e.g. ``runs/base32/checkpoints/step-00002000 step 2000 · 32x32 · ddim 25 steps · eta=0 · w=3 (--w) · 50 NFE/image``
        (rows for `cascade.summary.print_summary`). ``overrides``: those passed to `settings` for the plan; each
        value a stage took from them is marked with ``labels[setting]`` (default "set"); unmarked values are the
        checkpoint's own."""
        taken = stage_overrides([s.config for s in self.stages], overrides or {})
        labels = labels or {}
        rows = []
        for stage, sp in zip(self.stages, plan.stages):
            marks = {key: labels.get(key, "set") for key in taken[stage.name]}
            rows.append((sp.name, f"{stage.checkpoint} step {stage.step} · {describe_stage_plan(sp, marks)}"))
        return rows

    def checkpoints(self) -> dict[str, dict[str, Any]]:
        """Where each stage came from, for the record of a run."""
        found = {s.name: {"path": str(s.checkpoint), "step": s.step} for s in self.stages}
        found.update({f"classifier:{p}": {"path": str(c.checkpoint), "step": c.step}
                      for p, c in self._classifiers.items()})
        found.update({f"guide:{name}:{p}": {"path": str(g.checkpoint), "step": g.step}
                      for (name, p), g in self._guides.items()})
        return found

    def _classifier(self, path: str | Path) -> LoadedStage:
        key = str(path)
        if key not in self._classifiers:
            ckpt, record, cfg = read_checkpoint("classifier", path)
            base = self.stages[0].config
            check_classifier(path, cfg)
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
            self._classifiers[key] = load_loaded_stage("classifier", ckpt, record, cfg, self.device)
            self._place(self._classifiers[key].model)
        return self._classifiers[key]

    def _guide(self, stage: LoadedStage, path: str | Path) -> LoadedStage:
        """The autoguidance guide of ``stage`` at ``path`` (`SamplingSettings.guide_checkpoint`): checked against the
        stage (`check_guide`; not the stage's own checkpoint), loaded once (EMA weights, eval mode), placed on the
        device like the stages. CascadeConfigError (one line) otherwise."""
        key = (stage.name, str(path))
        if key not in self._guides:
            ckpt, record, cfg = read_checkpoint(
                stage.name, path, advice=f"pass an existing checkpoint of {stage.name} as its guide "
                                         f"(--guide-ckpt {stage.name}=PATH)")
            check_guide(stage.config, path, cfg)
            if ckpt.resolve() == Path(stage.checkpoint).resolve():
                raise CascadeConfigError(f"stage {stage.name}: guide {path} is the stage's own checkpoint (step "
                                         f"{stage.step}), which would not guide; pass an earlier checkpoint of its "
                                         "run or a smaller run")
            self._guides[key] = load_loaded_stage(stage.name, ckpt, record, cfg, self.device)
            self._place(self._guides[key].model)
        return self._guides[key]

    def settings(self, **overrides: Any) -> dict[str, SamplingSettings]:
        """Each stage's own default `SamplingSettings` (from its checkpoint) with ``overrides``.

        An override is one value for every stage it applies to (``aug_level`` and ``truncate``: SR stages;
        ``classifier`` and ``classifier_scale``: the base stage; the rest: all) or a {stage: value} dict
        naming stages of the chain; a None value keeps the default. Raises CascadeConfigError (one line,
        naming the stage) on an unknown setting or a bad value.
        """
        return resolve_settings([s.config for s in self.stages], overrides)

    def validate(self, classes: Sequence[int], settings: Mapping[str, SamplingSettings] | None = None, *,
                 num_per_class: int = 1, batch_size: int | None = None, seed: int = 0) -> SamplingPlan:
        """Every check before any sampling; returns the resolved plan or raises CascadeConfigError.

        ``settings``: {stage: SamplingSettings} (see `settings`); a stage left out samples with its own
        defaults. The checks here are those that need the chain: classes against every stage's class count,
        steps against each stage's timesteps, the classifier checkpoint, each autoguidance guide checkpoint
        (`check_guide`: loaded here), truncation between stages.
        """
        names = [s.name for s in self.stages]
        if isinstance(classes, (int, str)) or not classes:
            raise CascadeConfigError(f"classes must be a non-empty list of class indices, got {classes!r}")
        for c in classes:
            if not (is_int(c) or isinstance(c, np.integer)):
                raise CascadeConfigError(f"classes must be integers, got {c!r}")
            for stage in self.stages:
                n = stage.config.num_classes
                if not 0 <= c < n:
                    raise CascadeConfigError(
                        f"stage {stage.name}: class {c} is out of range; its checkpoint knows {n} classes, "
                        f"choose classes in 0..{n - 1}"
                    )
        for option, value, low in (("num_per_class", num_per_class, 1), ("seed", seed, 0)):
            if not is_int_at_least(value, low):
                raise CascadeConfigError(f"{option} must be an integer >= {low}, got {value!r}")
        if batch_size is not None and not is_int_at_least(batch_size, 1):
            raise CascadeConfigError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        settings = dict(settings or {})
        for name, value in settings.items():
            if name not in names:
                raise CascadeConfigError(f"settings: stage {name!r} is not in the chain ({', '.join(names)}); "
                                         "drop it or add the stage")
            if not isinstance(value, SamplingSettings):
                raise CascadeConfigError(f"stage {name}: settings must be a SamplingSettings, got "
                                         f"{type(value).__name__}")
        plans = []
        for stage in self.stages:
            chosen = settings_for(stage.config, settings.get(stage.name, stage.config.sampling), {})
            if chosen.classifier:
                n = self._classifier(chosen.classifier).config.num_classes
                if max(classes) >= n or min(classes) < 0:
                    raise CascadeConfigError(f"classifier: knows {n} classes; choose classes in 0..{n - 1}")
            if chosen.guide == "auto":
                self._guide(stage, chosen.guide_checkpoint)
            timesteps = stage_timesteps(stage.config, chosen)
            plans.append(StagePlan(name=stage.name, resolution=stage.config.resolution, settings=chosen,
                                   timesteps=timesteps, aug_level=chosen.aug_level,
                                   diffusion=stage.diffusion.respace(timesteps),
                                   guidance_input=stage.config.distill.takes_w))
        for prev, nxt in itertools.pairwise(plans):
            if nxt.settings.truncate:
                self._truncate(prev, nxt)
        return SamplingPlan(classes=[int(c) for c in classes], num_per_class=num_per_class, seed=seed,
                            batch_size=batch_size, stages=plans)

    @staticmethod
    def _truncate(prev: StagePlan, nxt: StagePlan) -> None:
        """Stop `prev` at the index k whose ᾱ_k is nearest ᾱ(s) of `nxt` and tell `nxt` the level of z_k."""
        alphas_cumprod = torch.as_tensor(prev.diffusion.alphas_cumprod, dtype=torch.float64)
        target = aug_alpha_bar(torch.tensor(nxt.aug_level, dtype=torch.float64))  # ᾱ(s), contracts
        k = int(torch.argmin((alphas_cumprod - target).abs()))
        prev.stop_at_index = k
        nxt.aug_level = float(aug_level_from_alpha_bar(alphas_cumprod[k : k + 1])[0])

    def _sample_stage(self, stage: LoadedStage, sp: StagePlan, plan: SamplingPlan, labels: torch.Tensor,
                      x_low: torch.Tensor | None, *, start_index: int, progress: bool) -> torch.Tensor:
        """Sample one stage for `labels` (N) from `x_low` (SR stages: the previous stage's output, or z_k when
        the plan is truncated); sample i draws its noise as sample start_index + i of the run."""
        settings = sp.settings
        classifier = (self._classifier(settings.classifier).model
                      if settings.classifier and settings.classifier_scale > 0 else None)
        guide = self._guide(stage, settings.guide_checkpoint).model if settings.guide == "auto" else None
        images = sample_stage(stage.model, stage.diffusion, stage.config, settings, labels, x_low, seed=plan.seed,
                              start_index=start_index, batch_size=plan.batch_size, device=self.device,
                              precision=self.precision, classifier=classifier, guide=guide,
                              stop_at_index=sp.stop_at_index,
                              truncated_level=sp.aug_level if settings.truncate else None, progress=progress)
        if not torch.isfinite(images).all():  # a diverged model or sampler: never hand on or write such images
            raise NonFiniteSamplesError(f"stage {sp.name}: the {settings.sampler} sampler produced NaN or infinite "
                                        "values; check the checkpoint (was its training loss finite?) and the settings")
        return images

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

    def sample_stage(self, name: str, labels: Sequence[int] | torch.Tensor, x_low: torch.Tensor | None = None,
                     settings: SamplingSettings | None = None, *, seed: int = 0, batch_size: int | None = None,
                     start_index: int = 0, progress: bool = False) -> torch.Tensor:
        """Sample one stage alone: the base stage from noise, an SR stage from given clean low-resolution
        images `x_low` N×3×r×r (e.g. real ones: teacher forcing), re-noised to its level s exactly as `run`
        re-noises the previous stage's output. ``settings``: the stage's (default: its own; truncation does
        not apply to a stage alone). Returns N×3×R×R float32 CPU images, equal to `run`'s images of that stage
        for the same labels, inputs, settings, seed and start_index.
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
        if cfg.kind is StageKind.sr:
            want = (len(labels), 3, cfg.low_resolution, cfg.low_resolution)
            if not isinstance(x_low, torch.Tensor) or tuple(x_low.shape) != want or not x_low.is_floating_point():
                got = f"{tuple(x_low.shape)} {x_low.dtype}" if isinstance(x_low, torch.Tensor) else repr(x_low)
                raise CascadeConfigError(f"stage {name}: x_low must be float images of shape {want} in [-1, 1], "
                                         f"got {got}")
        elif x_low is not None:
            raise CascadeConfigError(f"stage {name}: is a {cfg.kind.value} stage and takes no x_low; pass None")
        chosen = settings if settings is not None else cfg.sampling
        if not isinstance(chosen, SamplingSettings):
            raise CascadeConfigError(f"stage {name}: settings must be a SamplingSettings, got {type(chosen).__name__}")
        plan = self.plan_alone(name, labels.tolist(), chosen, batch_size=batch_size, seed=seed)
        return self.run_stage(plan, name, x_low, start_index=start_index, progress=progress)

    def plan_alone(self, name: str, classes: Sequence[int], settings: SamplingSettings, *,
                   batch_size: int | None = None, seed: int = 0) -> SamplingPlan:
        """The validated plan that samples stage `name` alone at `settings` (`sample_stage`'s plan): no
        truncation, neither its own nor one a later stage's defaults would ask of it. Raises
        CascadeConfigError as `validate` does."""
        alone = {s.name: dataclasses.replace(s.config.sampling, truncate=False) for s in self.stages}
        alone[name] = dataclasses.replace(settings, truncate=False)
        return self.validate(classes, alone, batch_size=batch_size, seed=seed)

    def run_stage(self, plan: SamplingPlan, name: str, x_low: torch.Tensor | None = None, *, start_index: int = 0,
                  progress: bool = False) -> torch.Tensor:
        """Sample stage `name` of a validated plan (`plan_alone`, or its chunks) for the plan's labels from
        clean low-resolution images `x_low` N×3×r×r in [-1, 1] (SR stages; None for the base stage), trusted as
        given. Returns N×3×R×R float32 CPU images."""
        i = [s.name for s in self.stages].index(name)
        return self._sample_stage(self.stages[i], plan.stages[i], plan, plan.labels, x_low,
                                  start_index=start_index, progress=progress)

    def __call__(self, classes: Sequence[int], *, num_per_class: int = 1, batch_size: int | None = None,
                 seed: int = 0, progress: bool = True, **overrides: Any) -> dict[str, torch.Tensor]:
        """Sample ``classes`` with each stage's defaults changed by ``overrides`` (as in `settings`, e.g.
        ``w=3.0, steps={"base32": 50}``). Returns {stage: images, "labels": labels}."""
        plan = self.validate(classes, self.settings(**overrides), num_per_class=num_per_class,
                             batch_size=batch_size, seed=seed)
        return self.run(plan, progress=progress)

"""Declarative stage configuration: plain dataclasses with JSON round trips and checked overrides.

One dataclass per concern: `UNetConfig` (network shape), `DiffusionConfig` (forward process and loss),
`AugConfig` (conditioning augmentation in training), `SamplingSettings` (how the stage samples by default),
`DistillSpec` (what a distilled stage learned from its teacher) and `StageConfig` (one stage: all of the above
plus what it generates). Each default is defined here once; the
presets in `stages/` are keyword instances of these classes and hydra sees them as structured configs.

Every constructor checks each field's type (`cascade.checks.coerce_fields`: ints accepted for floats, bools never
for numbers) and range, so a config.json or an override is refused with one ValueError line naming the key path
(``unet.model_channels``). The upper bounds (`LIMITS`) are generous for real models yet keep a mistyped value from
exhausting the machine (T = 10⁹ would need tens of GB for the schedule tables alone).

One module of about 500 lines because it is one schema: the dataclasses nest into `StageConfig`, and a setting's
check often needs the whole stage (`SamplingSettings.check_for`), so they are read together.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cascade.checks import (
    check_choice,
    check_int_range,
    check_known_keys,
    check_number_range,
    coerce_fields,
    is_int,
    is_number,
)
from cascade.diffusion.gaussian import LOSS_TYPES, MODEL_VAR_TYPES
from cascade.diffusion.guidance import GUIDES
from cascade.diffusion.parameterization import LOSS_WEIGHTINGS, PREDICTIONS
from cascade.diffusion.samplers import SAMPLERS
from cascade.diffusion.schedules import SCHEDULES


class StageKind(str, enum.Enum):
    """What a stage does: ``base`` generates from class labels, ``sr`` super-resolves a lower-resolution image,
    ``classifier`` classifies noised images (for classifier guidance). A str enum: equal to its value and
    written to JSON as it."""

    base = "base"
    sr = "sr"
    classifier = "classifier"


STAGE_KINDS = tuple(k.value for k in StageKind)
# Uniform t, importance sampling by each term's loss second moment (Nichol & Dhariwal 2021 "Improved DDPM" §3.3),
# or the t whose σ_t is nearest in log space to a log-normal σ (Karras et al. 2022 "EDM" §5, Table 1:
# ln σ ~ N(P_mean, P_std²)); `cascade.training.timestep_sampler` implements them.
TIMESTEP_SAMPLERS = ("uniform", "loss-second-moment", "lognormal")
# How a stage was distilled from a teacher checkpoint (`DistillSpec`; `cascade.training.distill`): not at all,
# guidance only (Meng et al. 2023 "On Distillation of Guided Diffusion Models" §4.1: w as an input, one network
# evaluation per step), or guidance and steps together: one DDIM step of the student for k of the teacher (Salimans
# & Ho 2022 "Progressive Distillation" eq. 8; Meng et al. 2023 §4.2), or guided consistency distillation (Luo et al.
# 2023 "Latent Consistency Models" §4.2, sampled by `cascade.diffusion.samplers.sample_consistency`).
DISTILL_METHODS = ("none", "guidance", "step", "consistency")
# Upper bounds of the stage settings (lower bounds are in the checks): far above any preset, below what would
# exhaust a machine before the first step.
# resolution: pixels per side (also of attention resolutions); channel_mult: each entry, levels: its length;
# num_res_blocks: per level; weight: vlb_weight, min_snr_gamma, cond_skip_std; log_sigma: |p_mean| and p_std (ln σ
# of every practical schedule lies within ±15).
LIMITS = {"resolution": 4096, "num_classes": 100_000, "num_timesteps": 100_000, "model_channels": 2048,
          "channel_mult": 64, "levels": 10, "num_res_blocks": 32, "num_class_tokens": 256, "head_channels": 4096,
          "norm_groups": 1024, "blur_kernel": 99, "blur_sigma": 100.0, "weight": 1e6,
          "log_sigma": 20.0}


def blocks_per_level(num_res_blocks: int | Sequence[int], num_levels: int) -> tuple[int, ...]:
    """Residual blocks per level: one int for all levels, or one per level (Imagen's Efficient U-Net idea
    of fewer blocks at high resolution; 0 is allowed, the decoder always has ``n + 1`` blocks per level)."""
    counts = (num_res_blocks,) * num_levels if is_int(num_res_blocks) else tuple(num_res_blocks)
    if len(counts) != num_levels or not all(is_int(n) and 0 <= n <= LIMITS["num_res_blocks"] for n in counts) \
            or sum(counts) == 0:
        raise ValueError(
            f"num_res_blocks must be an int in [0, {LIMITS['num_res_blocks']}] or one per level ({num_levels}), "
            f"not all zero; got {num_res_blocks!r}"
        )
    return counts


@dataclass
class UNetConfig:
    """Network shape. Resolutions are spatial sizes (e.g. 16 means the 16×16 feature maps).

    Ranges (ValueError naming ``unet.<key>`` otherwise): model_channels in [1, 2048]; channel_mult 1 to 10
    entries in [1, 64]; num_res_blocks an int or one per level in [0, 32], not all 0; attention and
    cross-attention resolutions in [1, 4096]; num_class_tokens in [0, 256]; head_channels in [1, 4096];
    norm_groups in [1, 1024]; dropout in [0, 1); cond_skip_std in [0, 10⁶].

    ``magnitude_preserving`` (base and sr stages): the convolutions and linear layers keep unit-magnitude
    activations with forced weight normalisation, SiLU is MP-SiLU and residual sums and skip concatenations are
    MP-Sum and MP-Cat (Karras et al. 2024 "EDM2" §2, Configs C, D and F; `cascade.nets.mp_layers`)."""

    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: Any = 2  # int (every level) or tuple[int, ...] (one per level); Any: hydra has no unions
    attention_resolutions: tuple[int, ...] = (8,)
    cross_attention_resolutions: tuple[int, ...] = ()
    num_class_tokens: int = 4
    head_channels: int = 64
    dropout: float = 0.0
    norm_groups: int = 32
    use_checkpoint: bool = False
    # SR only: output = network + E[target | x_t] under x_0 ~ N(upsampled input, σ²); σ = this (0 = off)
    cond_skip_std: float = 0.0
    magnitude_preserving: bool = False  # EDM2's magnitude-preserving layers (cascade.nets.mp_layers)

    def __post_init__(self) -> None:
        coerce_fields(self, "unet")
        check_int_range("unet.model_channels", self.model_channels, 1, LIMITS["model_channels"])
        if not 1 <= len(self.channel_mult) <= LIMITS["levels"] \
                or not all(1 <= m <= LIMITS["channel_mult"] for m in self.channel_mult):
            raise ValueError(f"unet.channel_mult must be 1 to {LIMITS['levels']} integers in "
                             f"[1, {LIMITS['channel_mult']}], got {list(self.channel_mult)}")
        if not is_int(self.num_res_blocks):
            if isinstance(self.num_res_blocks, (str, bytes)) or not isinstance(self.num_res_blocks, Sequence):
                raise ValueError(f"unet.num_res_blocks must be an int or a list of ints, got {self.num_res_blocks!r}")
            self.num_res_blocks = tuple(self.num_res_blocks)
        try:
            blocks_per_level(self.num_res_blocks, len(self.channel_mult))
        except ValueError as err:
            raise ValueError(f"unet.{err}") from None
        for name in ("attention_resolutions", "cross_attention_resolutions"):
            if not all(1 <= r <= LIMITS["resolution"] for r in getattr(self, name)):
                raise ValueError(f"unet.{name} must be resolutions in [1, {LIMITS['resolution']}], got "
                                 f"{list(getattr(self, name))}")
        check_int_range("unet.num_class_tokens", self.num_class_tokens, 0, LIMITS["num_class_tokens"])
        check_int_range("unet.head_channels", self.head_channels, 1, LIMITS["head_channels"])
        check_int_range("unet.norm_groups", self.norm_groups, 1, LIMITS["norm_groups"])
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"unet.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.cond_skip_std <= LIMITS["weight"]:  # NaN fails too
            raise ValueError(f"unet.cond_skip_std must be >= 0 and <= {LIMITS['weight']:g}, got {self.cond_skip_std}")


@dataclass
class DiffusionConfig:
    """Forward process and loss: β schedule, T, variance type, loss (hybrid = simple + λ·L_vlb), what the
    network predicts (ε, v or x_0), the MSE's weighting over t (uniform or Min-SNR-γ) and how training draws t
    (``timestep_sampler``; "lognormal" draws ln σ ~ N(p_mean, p_std²), Karras et al. 2022 "EDM" Table 1).

    Ranges (ValueError naming ``diffusion.<key>`` otherwise): num_timesteps T in [1, 100000]; vlb_weight in
    [0, 10⁶]; min_snr_gamma in (0, 10⁶]; p_mean in [−20, 20]; p_std in (0, 20]; the names are those of their
    choice tuples."""

    schedule: str = "cosine"
    num_timesteps: int = 1000
    model_var_type: str = "learned_range"
    loss: str = "hybrid"
    vlb_weight: float = 0.001
    timestep_sampler: str = "uniform"
    prediction: str = "eps"  # eps | v (Salimans & Ho 2022) | x0
    loss_weighting: str = "uniform"  # uniform | min_snr (Hang et al. 2023)
    min_snr_gamma: float = 5.0  # γ of min_snr, > 0
    p_mean: float = -1.2  # lognormal sampler: mean of ln σ (EDM Table 1)
    p_std: float = 1.2  # lognormal sampler: standard deviation of ln σ, > 0 (EDM Table 1)

    def __post_init__(self) -> None:
        coerce_fields(self, "diffusion")
        check_choice("diffusion.schedule", self.schedule, SCHEDULES)
        check_choice("diffusion.model_var_type", self.model_var_type, MODEL_VAR_TYPES)
        check_choice("diffusion.loss", self.loss, LOSS_TYPES)
        check_choice("diffusion.timestep_sampler", self.timestep_sampler, TIMESTEP_SAMPLERS)
        check_choice("diffusion.prediction", self.prediction, PREDICTIONS)
        check_choice("diffusion.loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        if not is_number(self.min_snr_gamma) or not 0 < self.min_snr_gamma <= LIMITS["weight"]:
            raise ValueError(f"diffusion.min_snr_gamma must be a number > 0 and <= {LIMITS['weight']:g}, got "
                             f"{self.min_snr_gamma!r}")
        check_number_range("diffusion.vlb_weight", self.vlb_weight, 0.0, LIMITS["weight"])
        check_number_range("diffusion.p_mean", self.p_mean, -LIMITS["log_sigma"], LIMITS["log_sigma"])
        check_number_range("diffusion.p_std", self.p_std, 0.0, LIMITS["log_sigma"], low_open=True)
        check_int_range("diffusion.num_timesteps", self.num_timesteps, 1, LIMITS["num_timesteps"])
        if self.loss == "hybrid" and self.model_var_type != "learned_range":
            raise ValueError("diffusion.loss 'hybrid' needs model_var_type 'learned_range'")

    @property
    def learn_sigma(self) -> bool:
        return self.model_var_type == "learned_range"


@dataclass
class AugConfig:
    """Conditioning augmentation of the low-res input in training (Ho et al. 2021 "Cascaded Diffusion Models"
    §3.2): s ~ U[0, s_max], blur on a ``blur_prob`` fraction of examples with σ ~ U(blur_sigma), kernel
    ``blur_kernel``. The level s used at sampling time is `SamplingSettings.aug_level`.

    Ranges (ValueError naming ``aug.<key>`` otherwise): s_max and blur_prob in [0, 1]; blur_sigma (min, max) with
    0 < min <= max <= 100 pixels; blur_kernel an odd integer in [1, 99]."""

    s_max: float = 0.0
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.4, 0.6)
    blur_kernel: int = 3

    def __post_init__(self) -> None:
        coerce_fields(self, "aug")
        for name in ("s_max", "blur_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"aug.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1] <= LIMITS["blur_sigma"]:
            raise ValueError(f"aug.blur_sigma must be (min, max) with 0 < min <= max <= {LIMITS['blur_sigma']:g}, "
                             f"got {list(self.blur_sigma)}")
        if not 1 <= self.blur_kernel <= LIMITS["blur_kernel"] or self.blur_kernel % 2 == 0:
            raise ValueError(f"aug.blur_kernel must be an odd integer in [1, {LIMITS['blur_kernel']}], got "
                             f"{self.blur_kernel}")


@dataclass(frozen=True)
class DistillSpec:
    """What a distilled stage learned from its teacher (`tools/distill_stage.py`); ``method`` "none" for a stage
    trained from data.

    - ``method``: "guidance": the network takes the guidance weight w as an input and reproduces the teacher's
      classifier-free guided prediction in one evaluation (Meng et al. 2023 §4.1), sampled by the teacher's samplers;
      "step": also distilled to ``levels`` DDIM steps, each reproducing ``teacher_steps`` / ``levels`` guided DDIM
      steps of the teacher (Salimans & Ho 2022 eq. 8; Meng et al. 2023 §4.2), sampled by ``ddim`` in exactly
      ``levels`` steps; "consistency": also distilled to a consistency function on a grid of ``levels`` noise levels
      (Luo et al. 2023 "Latent Consistency Models" §4.2, from Song et al. 2023 "Consistency Models"), sampled by the
      ``consistency`` sampler in 1 to ``levels`` steps.
    - ``teacher``: the teacher's checkpoint folder (a record: the student's weights do not need it).
    - ``w_max``: the student was trained for guidance weights w in [0, w_max].
    - ``levels``: step and consistency: the N intervals of its grid (`cascade.diffusion.distillation`).
    - ``teacher_steps``: step only: the teacher's DDIM steps the student's ``levels`` steps reproduce.

    Ranges (ValueError naming ``distill.<key>`` otherwise): method one of `DISTILL_METHODS`; with method "none" the
    other fields keep their defaults; otherwise teacher non-empty and w_max in (0, 10⁶]; levels ≥ 1 for step and
    consistency (at most T, checked by `StageConfig`), 0 for guidance; teacher_steps a multiple of levels above it
    for step, 0 otherwise.
    """

    method: str = "none"
    teacher: str = ""
    w_max: float = 0.0
    levels: int = 0
    teacher_steps: int = 0

    def __post_init__(self) -> None:
        coerce_fields(self, "distill")
        check_choice("distill.method", self.method, DISTILL_METHODS)
        if self.method == "none":
            if self.teacher or self.w_max or self.levels or self.teacher_steps:
                raise ValueError("distill.teacher, w_max, levels and teacher_steps describe a distilled stage; with "
                                 "method none leave them unset")
            return
        if not self.teacher:
            raise ValueError(f"distill.teacher must name the teacher checkpoint of a {self.method}-distilled stage")
        if not 0 < self.w_max <= LIMITS["weight"]:  # NaN fails too
            raise ValueError(f"distill.w_max must be > 0 and <= {LIMITS['weight']:g}, got {self.w_max}")
        if self.method in ("step", "consistency") and self.levels < 1:
            raise ValueError(f"distill.levels must be >= 1 for {self.method} distillation, got {self.levels}")
        if self.method == "guidance" and self.levels:
            raise ValueError(f"distill.levels applies to step and consistency distillation only, got {self.levels}")
        if self.method == "step":
            if self.teacher_steps <= self.levels or self.teacher_steps % self.levels:
                raise ValueError(f"distill.teacher_steps must be a multiple of levels ({self.levels}) above it, got "
                                 f"{self.teacher_steps}")
        elif self.teacher_steps:
            raise ValueError(f"distill.teacher_steps applies to step distillation only, got {self.teacher_steps}")

    @property
    def takes_w(self) -> bool:
        """Whether the network takes the guidance weight w as an input (every distilled stage)."""
        return self.method != "none"


_SPACING = re.compile(r"^(ddim)?\d+(,\d+)*$")


@dataclass(frozen=True)
class SamplingSettings:
    """How one stage samples: a stage's config carries its best defaults, command lines and `evaluate` /
    `sweep` derive per-stage copies (`dataclasses.replace`) and hand them down whole.

    - ``sampler``: a name in `cascade.diffusion.samplers.SAMPLERS` ("ddpm": ancestral, Ho et al. 2020 "DDPM" Algorithm 2;
      "ddim": Song et al. 2021 "DDIM" eq. 12; "consistency": multistep consistency sampling, Song et al. 2023
      "Consistency Models" Algorithm 1, for consistency-distilled stages only).
    - ``steps``: respaced steps: a count (int ≥ 1), a spacing string ("50", "ddim25", sections "10,5"), or
      None for every training timestep (Nichol & Dhariwal 2021 "Improved DDPM" §4); for the consistency sampler
      the number of network evaluations, 1 to the student's ``distill.levels``.
    - ``eta``: DDIM's η in [0, 1] (0: deterministic; 1: DDPM-like variance); nonzero only with ``ddim``.
    - ``w``: guidance weight ≥ 0 (Ho & Salimans 2022 eq. 6: ε̃ = (1+w)·ε(c) − w·ε(∅) with guide "cfg"; the weaker
      model in place of ε(∅) with guide "auto"); a distilled stage takes it as its network's input (one evaluation
      per step), within its ``distill.w_max``.
    - ``aug_level``: SR stages only: the conditioning augmentation level s in [0, 1] the low-resolution input
      is re-noised to (CDM §3.2); None on base and classifier stages.
    - ``truncate``: SR stages only: truncated conditioning augmentation (CDM §3.2): the previous stage stops at
      the step whose ᾱ matches s and hands over its z_s instead of a clean image re-noised to s.
    - ``clip_denoised``: clamp x̂_0 to [−1, 1]; ``dynamic_threshold``: Imagen's percentile in (0, 1] (Saharia
      et al. 2022 §2.3) instead, or None.
    - ``classifier`` / ``classifier_scale``: base stage only: a noise-aware classifier checkpoint and its
      guidance scale > 0, given together (Dhariwal & Nichol 2021 "Diffusion Models Beat GANs" Algorithm 1).
    - ``guidance_interval``: (t_lo, t_hi) on the training timestep scale, 0 ≤ t_lo ≤ t_hi < T: guidance (either
      guide) only there, the plain conditional prediction elsewhere (Kynkäänniemi et al. 2024); None: every t.
    - ``guide``: what w guides away from, one of `cascade.diffusion.guidance.GUIDES`: "cfg", the stage's own
      null-class prediction (classifier-free), or "auto", autoguidance by a weaker model of the same stage
      (Karras et al. 2024 "Guiding a Diffusion Model with a Bad Version of Itself" eq. 1, §3). One strength
      convention for both: w = 0 does not guide and w > 0 gives (1 + w)·good − w·weak, so with "auto" the paper's
      weight is 1 + w (D_w = D_0 + (1 + w)·(D_1 − D_0)). Base and SR stages that are not distilled only.
    - ``guide_checkpoint``: with guide "auto" (required there, refused with "cfg"): the guide's checkpoint, a
      run, checkpoints or step folder of the same stage (an earlier checkpoint of the run, a post-hoc EMA
      snapshot, or a smaller or shorter run), with the same resolutions, classes, prediction type and schedule.

    Raises ValueError (one line naming the setting) on a bad value; checks that need the stage (SR-only
    settings, steps beyond T) are `check_for`'s.
    """

    sampler: str = "ddpm"
    steps: Any = None  # int | str | None (an Any field: hydra's structured configs have no unions)
    eta: float = 0.0
    w: float = 0.0
    aug_level: float | None = None
    truncate: bool = False
    clip_denoised: bool = True
    dynamic_threshold: float | None = None
    classifier: str | None = None
    classifier_scale: float = 0.0
    guidance_interval: tuple[float, float] | None = None
    guide: str = "cfg"
    guide_checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} is unknown; use one of {', '.join(SAMPLERS)}")
        steps = self.steps
        if isinstance(steps, str) and steps.strip().lstrip("+").isdigit():
            object.__setattr__(self, "steps", steps := int(steps))
        if steps is not None:
            if not (is_int(steps) or isinstance(steps, str)):
                raise ValueError(f"steps must be a count, a spacing string or None, got {steps!r}")
            if isinstance(steps, int) and steps < 1:
                raise ValueError(f"steps must be a positive number of steps, got {steps}")
            if isinstance(steps, str) and not _SPACING.match(steps.replace(" ", "")):
                raise ValueError(f"bad steps {steps!r}; use a count like 50, 'ddim25' or sections like '10,5'")
        for name, low, high in (("eta", 0.0, 1.0), ("w", 0.0, math.inf), ("classifier_scale", 0.0, math.inf),
                                ("aug_level", 0.0, 1.0), ("dynamic_threshold", 0.0, 1.0)):
            value = getattr(self, name)
            if value is None and name in ("aug_level", "dynamic_threshold"):
                continue
            if not is_number(value):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
            if not low <= value <= high:
                raise ValueError(f"{name} must be {f'in [{low}, {high}]' if high < math.inf else f'>= {low}'}, "
                                 f"got {value}")
            object.__setattr__(self, name, float(value))
        if self.dynamic_threshold == 0.0:
            raise ValueError("dynamic_threshold must be in (0, 1] or None, got 0")
        if self.guidance_interval is not None:
            interval = tuple(self.guidance_interval)
            if len(interval) != 2 or not all(is_number(v) for v in interval) \
                    or not 0 <= interval[0] <= interval[1]:
                raise ValueError(f"guidance_interval must be (t_lo, t_hi) with 0 <= t_lo <= t_hi, got "
                                 f"{self.guidance_interval!r}")
            object.__setattr__(self, "guidance_interval", (float(interval[0]), float(interval[1])))
        coerce_fields(self, "sampling")  # the rest: truncate, clip_denoised, classifier, guide, guide_checkpoint
        if self.eta and self.sampler != "ddim":
            raise ValueError(f"eta {self.eta:g} applies to the ddim sampler only; the {self.sampler} sampler would "
                             "ignore it (use sampler ddim or eta 0)")
        if self.classifier and not self.classifier_scale > 0:
            raise ValueError(f"classifier {self.classifier} is given with classifier_scale 0, which would not guide; "
                             "pass a scale > 0 (--classifier-scale S)")
        if self.classifier_scale > 0 and not self.classifier:
            raise ValueError(f"classifier_scale {self.classifier_scale:g} needs a classifier checkpoint; pass one "
                             "(--classifier PATH)")
        if self.guide not in GUIDES:
            raise ValueError(f"guide {self.guide!r} is unknown; use one of {', '.join(GUIDES)}")
        if self.guide == "auto" and not self.guide_checkpoint:
            raise ValueError("guide auto needs guide_checkpoint, a checkpoint of the same stage to guide with "
                             "(--guide-ckpt STAGE=PATH)")
        if self.guide == "cfg" and self.guide_checkpoint is not None:
            raise ValueError(f"guide_checkpoint {self.guide_checkpoint} applies to guide auto only; set guide auto "
                             "(--guide auto) or leave it unset")

    def check_for(self, stage: StageConfig) -> None:
        """Raise ValueError (naming the stage) when a setting does not apply to ``stage``'s kind or timesteps."""
        num_timesteps = stage.diffusion.num_timesteps
        if isinstance(self.steps, int) and self.steps > num_timesteps:
            raise ValueError(f"stage {stage.name}: sampling steps {self.steps} exceeds its {num_timesteps} training "
                             f"timesteps; use at most {num_timesteps}")
        if self.guidance_interval is not None and not self.guidance_interval[1] < stage.diffusion.num_timesteps:
            raise ValueError(f"stage {stage.name}: guidance_interval {list(self.guidance_interval)} must lie in "
                             f"[0, {stage.diffusion.num_timesteps}) (its training timesteps)")
        self._check_distilled(stage)
        if self.guide == "auto" and stage.kind is StageKind.classifier:
            raise ValueError(f"stage {stage.name}: guide auto applies to base and SR stages only; {stage.name} is a "
                             "classifier")
        if stage.kind is StageKind.sr:
            if self.aug_level is None:
                raise ValueError(f"stage {stage.name}: an SR stage needs sampling.aug_level in [0, 1]")
            if self.classifier or self.classifier_scale:
                raise ValueError(f"stage {stage.name}: classifier guidance applies to the base stage only")
        else:
            if self.aug_level is not None:
                which = "the base" if stage.kind is StageKind.base else f"a {stage.kind.value}"
                raise ValueError(f"aug_level: stage {stage.name} is {which} stage and takes no conditioning; "
                                 "name SR stages only")
            if self.truncate:
                raise ValueError(f"stage {stage.name}: truncate applies to SR stages only")

    def _check_distilled(self, stage: StageConfig) -> None:
        """What a distilled stage (``stage.distill``) can be sampled with: the consistency sampler only on a
        consistency student and in 1 to ``levels`` steps, w in its trained range, no guidance interval, no
        autoguidance."""
        spec, name = stage.distill, stage.name
        if spec.method == "step" and (self.sampler != "ddim" or self.eta or self.steps != spec.levels):
            raise ValueError(f"stage {name} is step-distilled to {spec.levels} DDIM steps: sample it with sampler "
                             f"ddim, eta 0 and steps {spec.levels}, not {self.sampler} {self.steps!r}"
                             + (f" eta {self.eta:g}" if self.eta else ""))
        if self.sampler == "consistency" and spec.method != "consistency":
            raise ValueError(f"stage {name}: the consistency sampler needs a consistency-distilled stage "
                             "(tools/distill_stage.py); use ddpm, ddim, dpmpp2m or heun")
        if spec.method == "consistency":
            if self.sampler != "consistency":
                raise ValueError(f"stage {name} is consistency-distilled: sample it with sampler consistency "
                                 f"(1 to {spec.levels} steps), not {self.sampler}")
            if not is_int(self.steps) or not 1 <= self.steps <= spec.levels:
                raise ValueError(f"stage {name}: its consistency student was trained on {spec.levels} levels; "
                                 f"steps must be a count in [1, {spec.levels}], got {self.steps!r}")
        if spec.takes_w:
            if self.w > spec.w_max:
                raise ValueError(f"stage {name}: its distilled student was trained for w in [0, {spec.w_max:g}], "
                                 f"got w={self.w:g}; use w <= {spec.w_max:g}")
            if self.guidance_interval is not None:
                raise ValueError(f"stage {name}: guidance_interval does not apply to a distilled stage (w is its "
                                 "network's input at every step); leave it unset")
            if self.guide == "auto":
                raise ValueError(f"stage {name} is {spec.method}-distilled: its w is classifier-free guidance "
                                 "learned from its teacher (its network's input), so guide auto cannot apply; use "
                                 "guide cfg, or autoguide the undistilled teacher")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (the interval as a list)."""
        d = dataclasses.asdict(self)
        if d["guidance_interval"] is not None:
            d["guidance_interval"] = list(d["guidance_interval"])
        return d


_NESTED = {"unet": UNetConfig, "diffusion": DiffusionConfig, "aug": AugConfig, "sampling": SamplingSettings,
           "distill": DistillSpec}


@dataclass
class StageConfig:
    """One stage of the cascade: what it generates (or classifies), its network, noising and augmentation.

    Ranges (ValueError naming the key otherwise): resolution in [1, 4096] pixels per side, divisible by
    2^(len(unet.channel_mult) − 1); low_resolution (sr only) in [1, resolution); num_classes in [1, 100000];
    ``distill`` (a base or sr stage only) with levels at most T; ``sampling`` as `SamplingSettings.check_for`."""

    name: str
    kind: str
    resolution: int
    low_resolution: int | None
    num_classes: int
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    distill: DistillSpec = field(default_factory=DistillSpec)

    def __post_init__(self) -> None:
        coerce_fields(self, "")
        for key, sub in _NESTED.items():
            if not isinstance(getattr(self, key), sub):
                raise ValueError(f"{key} must be a {sub.__name__}, got {getattr(self, key)!r}")  # noqa: TRY004 - bad input
        check_choice("kind", self.kind, STAGE_KINDS)
        self.kind = StageKind(self.kind)
        check_int_range("resolution", self.resolution, 1, LIMITS["resolution"])
        check_int_range("num_classes", self.num_classes, 1, LIMITS["num_classes"])
        if self.kind is StageKind.sr:
            if self.low_resolution is None or not 0 < self.low_resolution < self.resolution:
                raise ValueError(
                    f"an sr stage needs 0 < low_resolution < resolution, got {self.low_resolution}"
                )
        elif self.low_resolution is not None:
            raise ValueError(f"a {self.kind.value} stage has no low_resolution, got {self.low_resolution}")
        if self.unet.cond_skip_std and self.kind is not StageKind.sr:
            raise ValueError(f"unet.cond_skip_std applies to sr stages only; {self.name} is a {self.kind.value} stage")
        if self.unet.magnitude_preserving and self.kind is StageKind.classifier:
            raise ValueError(f"unet.magnitude_preserving applies to base and sr stages only; {self.name} is a "
                             "classifier stage")
        if self.resolution % 2 ** (len(self.unet.channel_mult) - 1) != 0:
            raise ValueError(f"resolution {self.resolution} is not divisible by 2^(len(channel_mult)-1)")
        if self.distill.method != "none" and self.kind is StageKind.classifier:
            raise ValueError(f"stage {self.name}: a classifier is not distilled (distill.method must be none)")
        if max(self.distill.levels, self.distill.teacher_steps) >= self.diffusion.num_timesteps:
            raise ValueError(f"distill.levels and teacher_steps must be below the {self.diffusion.num_timesteps} "
                             "training timesteps")
        self.sampling.check_for(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able nested dict (tuples become lists)."""
        return dataclasses.asdict(
            self, dict_factory=lambda items: {k: _plain(v) for k, v in items}
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError. A record written before sampling
        settings existed (its level s under ``aug.sample_aug_level``) is read with that level as
        ``sampling.aug_level``."""
        d = _upgrade_record(d)
        check_known_keys(cls, d, "")
        kwargs = dict(d)
        for key, sub in _NESTED.items():
            if key in kwargs:
                check_known_keys(sub, kwargs[key], f"{key}.")
                kwargs[key] = sub(**kwargs[key])
        return cls(**kwargs)

    def with_overrides(self, overrides: dict[str, Any]) -> StageConfig:
        """A copy with nested field overrides, e.g. ``{"unet": {"model_channels": 64}, "aug": {"s_max": 0.2}}``."""
        d = self.to_dict()
        check_known_keys(StageConfig, overrides, "")
        for key, value in overrides.items():
            if key in _NESTED:
                if not isinstance(value, dict):
                    raise ValueError(f"override {key!r} must be a dict of {_NESTED[key].__name__} fields")
                check_known_keys(_NESTED[key], value, f"{key}.")
                d[key] = {**d[key], **value}
            else:
                d[key] = value
        return StageConfig.from_dict(d)


def _plain(value: Any) -> Any:
    """JSON-able form of a dataclass field value: tuples become lists, a StageKind its string."""
    if isinstance(value, tuple):
        return list(value)
    return value.value if isinstance(value, enum.Enum) else value


def _upgrade_record(d: Any) -> Any:
    """A format-1 stage record from before `SamplingSettings` (aug.sample_aug_level) in today's form."""
    if not isinstance(d, dict) or "sampling" in d or not isinstance(d.get("aug"), dict):
        return d
    aug = dict(d["aug"])
    level = aug.pop("sample_aug_level", None)
    sampling = {"aug_level": level} if d.get("kind") == StageKind.sr.value else {}
    return {**d, "aug": aug, "sampling": sampling}


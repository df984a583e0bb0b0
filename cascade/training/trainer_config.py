"""Plain dataclasses for the stage trainer's settings: the one place their defaults are defined.

The defaults are those of a paper-scale GPU run; `configs/size/tiny.yaml` holds only what a CPU run changes,
`configs/stage_trainer/<stage>_<size>.yaml` what one stage at one size changes beyond its size.
`stages.hydra_store` registers these classes with hydra as the structured schema of `tools/train_stage.py`.
No torch import here: the command line validates its configuration before loading the heavy libraries.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from cascade.checks import check_known_keys, coerce_fields, is_auto_or_bool, is_int_at_least
from cascade.data.settings import DataConfig
from cascade.ema_profiles import check_sigma_rels

MIXED_PRECISION_CHOICES = ("auto", "no", "bf16", "fp16")
# The learning rate after the warm-up: constant, or α_ref/√max(s/t_ref, 1) (Karras et al. 2024 "EDM2" eq. 16).
LR_SCHEDULES = ("constant", "inv_sqrt")
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # trainer.report_to name → the package it needs


def parse_report_to(value: str) -> tuple[str, ...]:
    """The trackers named by ``trainer.report_to``: "none" → (), else `TRACKERS` names joined by "+" (on hydra's
    command line, where a bare comma makes a sweep: ``trainer.report_to=tensorboard+wandb``) or "," (in YAML or
    Python), in order, without repeats. ValueError (one line) for an unknown name or a tracker
    whose package is not installed (naming ``pip install -e ".[track]"``)."""
    import importlib.util

    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"trainer.report_to must be none, tensorboard, wandb or both (tensorboard+wandb), got {value!r}")
    names = [n.strip() for n in re.split(r"[+,]", value)]
    if names == ["none"]:
        return ()
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"trainer.report_to: unknown tracker {unknown[0]!r}; use none, tensorboard, wandb or both "
                         "(tensorboard+wandb)")
    for name in names:
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ValueError(f"trainer.report_to={name} needs the {TRACKERS[name]} package: "
                             'pip install -e ".[track]" (or set trainer.report_to=none)')
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class TrainerConfig:
    """Optimisation, checkpointing, logging and sampling settings of one training run.

    ``batch_size`` is per process and per micro-batch: one optimizer step sees
    batch_size × grad_accum × num_processes images. ``mixed_precision="auto"`` picks bf16 where the device
    computes it natively (CUDA with bf16 support, CPUs with AVX512-BF16/AMX), else full precision.
    ``channels_last="auto"`` uses the channels-last memory format on CUDA; on CPU it times both layouts at the
    start of a run of ≥ 200 steps (or with a time budget) and keeps the faster (`cascade.training.memory_format`; a
    resumed run keeps its layout). 0 disables ``grad_clip``; ``ckpt_every=0`` saves only the final checkpoint.
    ``max_seconds`` > 0 also ends the run (with its final checkpoint) after the first step that completes
    that many wall-clock seconds into this invocation's training loop (a time budget; 0 = no limit).
    ``lr_schedule``: after the linear warm-up over ``warmup_steps``, "constant" keeps ``lr``; "inv_sqrt" decays it
    as lr/√max(s/t_ref, 1) after s optimizer steps, t_ref = ``lr_ref_steps`` (Karras et al. 2024 "EDM2" eq. 16).

    Watching a run (`docs/watching.md`; rules in `cascade.training.cadence`):

    - ``progress``: a progress display at all. True: on a terminal (stderr a TTY) a tqdm bar with img/s and ETA;
      otherwise one plain line every ``log_seconds`` (and the first window's and the last step's).
      False: no bar, still the plain lines (a log file shows the run advancing). The start-up summary, the
      resume line and warnings are printed either way.
    - ``report_to``: trackers fed through accelerate: "none" (the default: a run writes only its own files,
      metrics.jsonl and the sample PNGs, whatever happens to be installed), "tensorboard"
      (``<run_dir>/tensorboard``), "wandb" (offline unless WANDB_MODE is set; ``<run_dir>/wandb``) or both
      ("tensorboard+wandb"). A tracker whose package is missing is a ValueError naming ``pip install -e ".[track]"``.
    - ``sample_every``: EMA sample grids to ``<run_dir>/samples/``. "auto": one at each quarter of the run (of
      max_steps, or of max_seconds, whichever is reached first) and one at the end; N: every N steps and at the
      end; 0: none. The end grid is at the final checkpoint's step (also of a time-budget or interrupted run).
    - ``eval_every``: the quality proxy (`cascade.evaluation.proxy`, ``eval_count`` samples, EMA weights) of a
      base or SR stage. "auto": as often as keeps its time at or under 10 % of the training time, and at the
      end; N: every N steps and at the end; 0: never.

    Post-hoc EMA (`docs/ema.md`, `cascade.training.posthoc_ema`): ``ema_sigma_rels`` are the relative widths of
    power-function EMAs tracked beside the classic one (EDM2 §3; each in (0, 0.3); () turns them off), saved as
    snapshots to ``<run_dir>/ema_snapshots/`` (all kept) every ``ema_snapshot_every`` steps and at the end. "auto":
    every max_steps/32 steps, and with a time budget also every max_seconds/32 seconds, whichever comes first, never
    closer than 50 steps (≈ 33 snapshots, at most ≈ 65; a run under 50 steps: the end one only). One snapshot holds every profile in float32: 17 MB for a tiny base32 (2.1M
    parameters, two profiles), ≈ 0.6 GB for its 33; 4 GB for a paper-size base32 (496M), ≈ 130 GB for 33.
    """

    max_steps: int = 500000
    max_seconds: float = 0.0  # > 0: also stop (with a final checkpoint) after this many seconds of training
    batch_size: int = 32  # per process and micro-batch
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int = 1000  # linear warmup, then lr_schedule
    lr_schedule: str = "constant"  # constant | inv_sqrt: lr/√max(s/lr_ref_steps, 1) (EDM2 eq. 16)
    # inv_sqrt's t_ref in optimizer steps, >= 1. 35000: EDM2's ImageNet-64 runs (batch 2048); a CPU run of a few
    # thousand steps sets it in configs/size/tiny.yaml (1000: the rate decays over the second half of a
    # 2000-step run, to lr/√2 at its end, instead of never within it).
    lr_ref_steps: int = 35000
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    grad_accum: int = 1
    mixed_precision: str = "auto"  # auto (bf16 where native) | no | bf16 | fp16
    channels_last: str | bool = "auto"  # auto (CUDA; CPU: measured per run) | true | false
    compile: bool = False  # torch.compile the model's forward (compile time vs steady-state gain: tools/bench.py --compile)
    ema_decay: float = 0.9999
    ema_warmup: float = 10.0  # decay_n = min(ema_decay, (1 + n) / (ema_warmup + n)); 1 disables
    ema_sigma_rels: tuple[float, ...] = (0.05, 0.10)  # power-function EMAs for post-hoc EMA (docs/ema.md); () off
    ema_snapshot_every: int | str = "auto"  # their snapshots: auto (max_steps/32, max_seconds/32) | N steps
    p_uncond: float = 0.1  # null-class dropout for classifier-free guidance
    ckpt_every: int = 5000  # 0: only the final checkpoint
    keep_last: int = 3
    log_every: int = 100
    log_seconds: float = 30.0  # without a progress bar: a plain log line every this many seconds
    report_to: str = "none"  # none | tensorboard | wandb | tensorboard+wandb (trackers through accelerate)
    sample_every: int | str = "auto"  # EMA sample grids to <run_dir>/samples/: auto (4 per run + end) | N | 0
    sample_steps: int | str = 25  # respaced sampling steps for the grid (N, ddimN or sections)
    sample_count: int = 8  # samples per class (base) or val inputs (SR)
    eval_every: int | str = "auto"  # quality proxy: auto (≤ 10 % of training time + end) | N steps | 0 (never)
    eval_count: int = 50  # the quality proxy's samples
    run_report: bool = True  # report.md / report.png of metrics.jsonl at the end of a run (tools/run_report.py redraws)
    max_nan_in_row: int = 5  # stop after this many NaN/inf steps in a row
    progress: bool = True  # a progress bar on a terminal (plain lines are printed either way)

    def __post_init__(self) -> None:
        coerce_fields(self, "trainer")
        object.__setattr__(self, "adam_betas", tuple(float(b) for b in self.adam_betas))
        positive = ("max_steps", "batch_size", "grad_accum", "keep_last", "log_every", "sample_count",
                    "max_nan_in_row")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("sample_every", "eval_every"):
            value = getattr(self, name)
            if value != "auto" and not is_int_at_least(value, 0):
                raise ValueError(f"trainer.{name} must be auto, 0 (off) or a number of steps >= 1, got {value!r}")
        if not is_int_at_least(self.eval_count, 2):
            raise ValueError(f"trainer.eval_count must be an integer >= 2 (FD and KID need two samples), "
                             f"got {self.eval_count!r}")
        if not 0 < self.log_seconds < math.inf:
            raise ValueError(f"trainer.log_seconds must be a finite number > 0, got {self.log_seconds}")
        parse_report_to(self.report_to)
        for name in ("warmup_steps", "ckpt_every", "weight_decay", "grad_clip", "max_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"trainer.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"trainer.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not is_int_at_least(self.lr_ref_steps, 1):
            raise ValueError(f"trainer.lr_ref_steps must be an integer >= 1, got {self.lr_ref_steps!r}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"trainer.lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.max_seconds < math.inf:
            raise ValueError(f"trainer.max_seconds must be a finite number >= 0 (0: no limit), got {self.max_seconds}")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ValueError(f"trainer.adam_betas must be two numbers in [0, 1), got {list(self.adam_betas)}")
        if self.mixed_precision not in MIXED_PRECISION_CHOICES:
            raise ValueError(f"trainer.mixed_precision must be one of {', '.join(MIXED_PRECISION_CHOICES)}, "
                             f"got {self.mixed_precision!r}")
        if not is_auto_or_bool(self.channels_last):
            raise ValueError(f"trainer.channels_last must be auto, true or false, got {self.channels_last!r}")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"trainer.p_uncond must be in [0, 1), got {self.p_uncond}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"trainer.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.ema_warmup < 1.0:
            raise ValueError(f"trainer.ema_warmup must be >= 1 (1 disables the warm-up), got {self.ema_warmup}")
        check_sigma_rels(self.ema_sigma_rels, "trainer.ema_sigma_rels")
        if self.ema_snapshot_every != "auto" and not is_int_at_least(self.ema_snapshot_every, 1):
            raise ValueError(f"trainer.ema_snapshot_every must be auto or a number of steps >= 1, "
                             f"got {self.ema_snapshot_every!r}")


# What a distillation run changes in the trainer settings of its size (`tools/distill_stage.py` through
# `stages.hydra_store`, the quality benchmark's --distill): the student starts from its teacher, so a smaller step
# than training from scratch and no warm-up (measured: docs/results/2026-12-06.md).
DISTILL_TRAINER: dict[str, Any] = {"lr": 5e-5, "warmup_steps": 0}


@dataclass(frozen=True)
class DistillSettings:
    """How `tools/distill_stage.py` distils a teacher (`cascade.training.distill`; docs/distillation.md).

    ``method``: "step" (guidance and steps: ``steps`` DDIM steps, each reproducing ``teacher_steps`` / ``steps``
    guided DDIM steps of the teacher; Salimans & Ho 2022 eq. 8, Meng et al. 2023 §4.2), "consistency" (guidance and
    steps: guided consistency distillation on ``levels`` levels, the consistency sampler in 1 to ``levels`` steps;
    Luo et al. 2023 §4.2) or "guidance" (w as an input only: the teacher's samplers at half the evaluations; Meng et
    al. 2023 §4.1). ``w_max``: the student learns every guidance weight in [0, w_max] (at least the teacher's
    default w). ``steps``: the student's sampling steps (0: 4 for a base stage, 2 for an SR stage; consistency: its
    default, 1 to ``levels``). ``teacher_steps``: step only, a multiple of the steps larger than them (0: four times the
    steps: the student copies a teacher that is better than twice its steps would be, at twice the teacher's cost
    per training step; measured better at equal minutes on base32 and sr64). ``levels``: consistency only, the N intervals of its grid (2 to 1000). ValueError (one line naming
    ``distill.<key>``) otherwise."""

    method: str = "step"
    w_max: float = 2.0
    steps: int = 0
    teacher_steps: int = 0
    levels: int = 16

    def __post_init__(self) -> None:
        coerce_fields(self, "distill")
        if self.method not in ("step", "consistency", "guidance"):
            raise ValueError(f"distill.method must be step, consistency or guidance, got {self.method!r}")
        if not 0 < self.w_max < math.inf:
            raise ValueError(f"distill.w_max must be a finite number > 0, got {self.w_max}")
        if not 2 <= self.levels <= 1000:
            raise ValueError(f"distill.levels must be an integer in [2, 1000], got {self.levels}")
        if not 0 <= self.steps <= (self.levels if self.method == "consistency" else 1000):
            bound = "distill.levels = " + str(self.levels) if self.method == "consistency" else "1000"
            raise ValueError(f"distill.steps must be 0 (the stage kind's default) or in [1, {bound}], got {self.steps}")
        if self.steps and self.method == "guidance":
            raise ValueError(f"distill.steps applies to methods step and consistency; a guidance student samples with "
                             f"its teacher's sampler and steps (got distill.steps={self.steps})")
        if self.teacher_steps and (self.method != "step" or self.teacher_steps < 0):
            raise ValueError(f"distill.teacher_steps applies to method step only (a multiple of its steps), got "
                             f"{self.teacher_steps}")

    def steps_for(self, kind: str) -> int:
        """The student's sampling steps for a stage of ``kind`` ("base" or "sr"); a consistency student's default
        at most its levels."""
        default = 2 if kind == "sr" else 4
        return self.steps or (min(default, self.levels) if self.method == "consistency" else default)

    def teacher_steps_for(self, kind: str) -> int:
        """The teacher's DDIM steps a step student of ``kind`` reproduces; ValueError unless a multiple of its
        steps larger than them."""
        steps = self.steps_for(kind)
        teacher = self.teacher_steps or 4 * steps  # measured: docs/results/2026-12-06.md
        if teacher <= steps or teacher % steps:
            raise ValueError(f"distill.teacher_steps must be a multiple of the student's {steps} steps larger than "
                             f"{steps} ({2 * steps}, {3 * steps}, ...), got {teacher}")
        return teacher


@dataclass(frozen=True)
class RunConfig:
    """One run: the trainer and data settings plus where it lives, how it resumes and its seed.

    ``resume`` is "auto" (continue from the newest checkpoint in ``run_dir`` if any), "never" (fail if
    ``run_dir`` already holds checkpoints) or a checkpoint path.
    """

    run_dir: str
    data: DataConfig
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    resume: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.run_dir:
            raise ValueError("run_dir must name the run's output folder")
        if not is_int_at_least(self.seed, 0):
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if not isinstance(self.resume, str) or not self.resume:
            raise ValueError(f"resume must be auto, never or a checkpoint path, got {self.resume!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Build from nested plain dicts; an unknown key is a ValueError naming it."""
        d = dict(d)
        check_known_keys(cls, d, "")
        if "data" not in d:
            raise ValueError("data.root is required: the shard folder written by tools/make_shards.py")
        data = dict(d.pop("data"))
        trainer = dict(d.pop("trainer", {}))
        check_known_keys(DataConfig, data, "data.")
        check_known_keys(TrainerConfig, trainer, "trainer.")
        return cls(data=DataConfig(**data), trainer=TrainerConfig(**trainer), **d)

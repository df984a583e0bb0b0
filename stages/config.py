"""Declarative stage configuration: plain dataclasses with JSON round trips and checked overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from cascade.unet import blocks_per_level

STAGE_KINDS = ("base", "sr", "classifier")
SCHEDULES = ("linear", "cosine")
MODEL_VAR_TYPES = ("fixed_small", "fixed_large", "learned_range")
LOSSES = ("simple", "hybrid")
TIMESTEP_SAMPLERS = ("uniform", "loss-second-moment")
PREDICTIONS = ("eps", "v", "x0")
LOSS_WEIGHTINGS = ("uniform", "min_snr")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclass
class UNetConfig:
    """Network shape. Resolutions are spatial sizes (e.g. 16 means the 16×16 feature maps)."""

    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int | tuple[int, ...] = 2  # one count for every level, or one per level
    attention_resolutions: tuple[int, ...] = (8,)
    cross_attention_resolutions: tuple[int, ...] = ()
    num_class_tokens: int = 4
    head_channels: int = 64
    dropout: float = 0.0
    norm_groups: int = 32
    use_checkpoint: bool = False
    # SR only: output = network + E[target | x_t] under x_0 ~ N(upsampled input, σ²); σ = this (0 = off)
    cond_skip_std: float = 0.0

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(self.attention_resolutions)
        self.cross_attention_resolutions = tuple(self.cross_attention_resolutions)
        if not isinstance(self.num_res_blocks, int):
            self.num_res_blocks = tuple(self.num_res_blocks)
        if self.model_channels < 1 or not self.channel_mult:
            raise ValueError(f"model_channels must be positive and channel_mult non-empty: {self}")
        blocks_per_level(self.num_res_blocks, len(self.channel_mult))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.cond_skip_std < 0:
            raise ValueError(f"cond_skip_std must be >= 0, got {self.cond_skip_std}")


@dataclass
class DiffusionConfig:
    """Forward process and loss: β schedule, T, variance type, loss (hybrid = simple + λ·L_vlb), what the
    network predicts (ε, v or x_0) and the MSE's weighting over t (uniform or Min-SNR-γ)."""

    schedule: str = "cosine"
    num_timesteps: int = 1000
    model_var_type: str = "learned_range"
    loss: str = "hybrid"
    vlb_weight: float = 0.001
    timestep_sampler: str = "uniform"
    prediction: str = "eps"  # eps | v (Salimans & Ho 2022) | x0
    loss_weighting: str = "uniform"  # uniform | min_snr (Hang et al. 2023)
    min_snr_gamma: float = 5.0  # γ of min_snr, > 0

    def __post_init__(self) -> None:
        _check_choice("diffusion.schedule", self.schedule, SCHEDULES)
        _check_choice("diffusion.model_var_type", self.model_var_type, MODEL_VAR_TYPES)
        _check_choice("diffusion.loss", self.loss, LOSSES)
        _check_choice("diffusion.timestep_sampler", self.timestep_sampler, TIMESTEP_SAMPLERS)
        _check_choice("diffusion.prediction", self.prediction, PREDICTIONS)
        _check_choice("diffusion.loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        if isinstance(self.min_snr_gamma, bool) or not isinstance(self.min_snr_gamma, (int, float)) \
                or not self.min_snr_gamma > 0:
            raise ValueError(f"diffusion.min_snr_gamma must be a number > 0, got {self.min_snr_gamma!r}")
        if self.num_timesteps < 1:
            raise ValueError(f"diffusion.num_timesteps must be positive, got {self.num_timesteps}")
        if self.loss == "hybrid" and self.model_var_type != "learned_range":
            raise ValueError("diffusion.loss 'hybrid' needs model_var_type 'learned_range'")

    @property
    def learn_sigma(self) -> bool:
        return self.model_var_type == "learned_range"


@dataclass
class AugConfig:
    """Conditioning augmentation of the low-res input (CDM): s ~ U[0, s_max] in training, blur on a
    ``blur_prob`` fraction of examples with σ ~ U(blur_sigma), kernel ``blur_kernel``; ``sample_aug_level``
    is the default s at sampling time."""

    s_max: float = 0.0
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.4, 0.6)
    blur_kernel: int = 3
    sample_aug_level: float = 0.0

    def __post_init__(self) -> None:
        self.blur_sigma = tuple(self.blur_sigma)
        for name in ("s_max", "blur_prob", "sample_aug_level"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"aug.{name} must be in [0, 1], got {getattr(self, name)}")
        if len(self.blur_sigma) != 2 or not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"aug.blur_sigma must be (min, max) with 0 < min <= max, got {self.blur_sigma}")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"aug.blur_kernel must be a positive odd integer, got {self.blur_kernel}")


_NESTED = {"unet": UNetConfig, "diffusion": DiffusionConfig, "aug": AugConfig}


@dataclass
class StageConfig:
    """One stage of the cascade: what it generates (or classifies), its network, noising and augmentation."""

    name: str
    kind: str
    resolution: int
    low_resolution: int | None
    num_classes: int
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    aug: AugConfig = field(default_factory=AugConfig)

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, STAGE_KINDS)
        if self.resolution < 1 or self.num_classes < 1:
            raise ValueError(
                f"resolution and num_classes must be positive, got {self.resolution}, {self.num_classes}"
            )
        if self.kind == "sr":
            if self.low_resolution is None or not 0 < self.low_resolution < self.resolution:
                raise ValueError(
                    f"an sr stage needs 0 < low_resolution < resolution, got {self.low_resolution}"
                )
        elif self.low_resolution is not None:
            raise ValueError(f"a {self.kind} stage has no low_resolution, got {self.low_resolution}")
        if self.unet.cond_skip_std and self.kind != "sr":
            raise ValueError(f"unet.cond_skip_std applies to sr stages only; {self.name} is a {self.kind} stage")
        if self.resolution % 2 ** (len(self.unet.channel_mult) - 1) != 0:
            raise ValueError(f"resolution {self.resolution} is not divisible by 2^(len(channel_mult)-1)")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able nested dict (tuples become lists)."""
        return dataclasses.asdict(
            self, dict_factory=lambda items: {k: list(v) if isinstance(v, tuple) else v for k, v in items}
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError."""
        _check_keys(cls, d, "")
        kwargs = dict(d)
        for key, sub in _NESTED.items():
            if key in kwargs:
                _check_keys(sub, kwargs[key], f"{key}.")
                kwargs[key] = sub(**kwargs[key])
        return cls(**kwargs)

    def with_overrides(self, overrides: dict[str, Any]) -> StageConfig:
        """A copy with nested field overrides, e.g. ``{"unet": {"model_channels": 64}, "aug": {"s_max": 0.2}}``."""
        d = self.to_dict()
        _check_keys(StageConfig, overrides, "")
        for key, value in overrides.items():
            if key in _NESTED:
                if not isinstance(value, dict):
                    raise ValueError(f"override {key!r} must be a dict of {_NESTED[key].__name__} fields")
                _check_keys(_NESTED[key], value, f"{key}.")
                d[key] = {**d[key], **value}
            else:
                d[key] = value
        return StageConfig.from_dict(d)


def _check_keys(cls: type, d: Any, prefix: str) -> None:
    if not isinstance(d, dict):
        raise TypeError(f"{prefix or 'stage config'} must be a dict, got {type(d).__name__}")
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - valid)
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} key(s) {[prefix + k for k in unknown]}; valid: {sorted(valid)}"
        )

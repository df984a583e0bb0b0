"""The cascade's stages at two sizes, ``tiny`` (CPU, minutes, < 3M parameters) and ``paper`` (CDM ImageNet scale).

Paper sizes follow the Cascaded Diffusion Models ImageNet models (Ho et al. 2021, appendix) as far as
recalled: base 32² width 256, multipliers (1,2,3,4), 3 residual blocks; 32→64 width 192, (1,2,3,4),
5 blocks; 64→128 width 128, (1,2,3,4,4), 3 blocks; 128→256 width 128, (1,1,2,2,4,4), 2 blocks; heads of
64 channels; self-attention at 16² and 8² (only 16² for 128/256 outputs, as CDM keeps attention at low
resolution); dropout 0.1 for the 32/64 models, 0 above; gradient checkpointing on. The classifier follows
ADM's noise-aware classifiers (encoder half, width 128, attention pooling). Diffusion everywhere: cosine
schedule, T = 1000 (CDM used up to 4000; sampling respaces anyway), learned-range variance, hybrid loss.

Conditioning augmentation (CDM §3/§4): every SR stage trains with Gaussian augmentation s ~ U[0, 0.3]
and samples with s = 0.1 by default; sr128 and sr256 also blur half of the training examples with
σ ~ U(0.4, 0.6), 3×3 kernel; sr64 has no blur (at 32² a blur erases most of the content).

Conditioning skip (tiny SR stages, `unet.cond_skip_std`): the network's ε is added to E[ε | x_t] under
x_0 ~ N(upsampled input, σ²) with σ the measured std of (image − upsampled low-res image) on the built-in
photographs (0.088 at 64², 0.084 at 128², 0.059 at 256²), so a fresh SR model already returns its input
plus fine noise and training only learns the detail. In the demo's 2–4-minute SR budgets this is the
difference between noise (7.9 dB PSNR to the real 128² image) and a usable stage (22 dB). Paper presets
keep CDM's plain ε-prediction; set `unet.cond_skip_std` there to use it.
"""

from __future__ import annotations

from collections.abc import Callable

from cascade.config import AugConfig, DiffusionConfig, StageConfig, UNetConfig

STAGE_NAMES = ("base32", "sr64", "sr128", "sr256", "classifier32")
SIZES = ("tiny", "paper")

_GAUSSIAN = AugConfig(s_max=0.3, blur_prob=0.0, sample_aug_level=0.1)
_GAUSSIAN_BLUR = AugConfig(
    s_max=0.3, blur_prob=0.5, blur_sigma=(0.4, 0.6), blur_kernel=3, sample_aug_level=0.1
)


def _tiny(
    model_channels: int, channel_mult: tuple[int, ...], num_res_blocks: int | tuple[int, ...], **kw
) -> UNetConfig:
    return UNetConfig(
        model_channels=model_channels,
        channel_mult=channel_mult,
        num_res_blocks=num_res_blocks,
        attention_resolutions=(8,),
        head_channels=32,
        norm_groups=8,
        dropout=0.0,
        **kw,
    )


def _paper(
    model_channels: int,
    channel_mult: tuple[int, ...],
    num_res_blocks: int,
    attention_resolutions: tuple[int, ...],
    dropout: float,
) -> UNetConfig:
    return UNetConfig(
        model_channels=model_channels,
        channel_mult=channel_mult,
        num_res_blocks=num_res_blocks,
        attention_resolutions=attention_resolutions,
        head_channels=64,
        norm_groups=32,
        dropout=dropout,
        use_checkpoint=True,
    )


# name → size → (kind, resolution, low_resolution, UNetConfig, AugConfig)
_STAGES: dict[str, dict[str, Callable[[], tuple]]] = {
    "base32": {
        # tiny: one cross-attention block to class tokens at 8² exercises eq. 15 at almost no cost
        "tiny": lambda: (
            "base",
            32,
            None,
            _tiny(32, (1, 1, 2, 2), (1, 1, 2, 2), cross_attention_resolutions=(8,)),
            AugConfig(),
        ),
        "paper": lambda: ("base", 32, None, _paper(256, (1, 2, 3, 4), 3, (16, 8), 0.1), AugConfig()),
    },
    "sr64": {
        "tiny": lambda: ("sr", 64, 32, _tiny(12, (1, 2, 4, 8), (0, 1, 1, 2), cond_skip_std=0.08), _GAUSSIAN),
        "paper": lambda: ("sr", 64, 32, _paper(192, (1, 2, 3, 4), 5, (16, 8), 0.1), _GAUSSIAN),
    },
    "sr128": {
        "tiny": lambda: (
            "sr", 128, 64, _tiny(8, (1, 2, 4, 4, 8), (0, 0, 1, 1, 2), cond_skip_std=0.08), _GAUSSIAN_BLUR
        ),
        "paper": lambda: ("sr", 128, 64, _paper(128, (1, 2, 3, 4, 4), 3, (16,), 0.0), _GAUSSIAN_BLUR),
    },
    "sr256": {
        "tiny": lambda: (
            "sr", 256, 128, _tiny(8, (1, 1, 2, 4, 4, 8), (0, 0, 0, 1, 1, 2), cond_skip_std=0.06), _GAUSSIAN_BLUR
        ),
        "paper": lambda: ("sr", 256, 128, _paper(128, (1, 1, 2, 2, 4, 4), 2, (16,), 0.0), _GAUSSIAN_BLUR),
    },
    "classifier32": {
        "tiny": lambda: ("classifier", 32, None, _tiny(32, (1, 2, 2, 2), 1), AugConfig()),
        "paper": lambda: ("classifier", 32, None, _paper(128, (1, 2, 3, 4), 2, (16, 8), 0.1), AugConfig()),
    },
}


def get_stage(name: str, size: str = "tiny", num_classes: int = 10) -> StageConfig:
    """The stage ``name`` at preset ``size`` for ``num_classes`` classes."""
    if name not in _STAGES:
        raise ValueError(f"unknown stage {name!r}; valid stages: {STAGE_NAMES}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid sizes: {SIZES}")
    kind, resolution, low_resolution, unet, aug = _STAGES[name][size]()
    return StageConfig(
        name=name,
        kind=kind,
        resolution=resolution,
        low_resolution=low_resolution,
        num_classes=num_classes,
        unet=unet,
        diffusion=DiffusionConfig(),
        aug=AugConfig(**vars(aug)),
    )

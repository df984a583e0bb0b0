"""The cascade's stages at two sizes, ``tiny`` (CPU, minutes, < 3M parameters) and ``paper`` (CDM ImageNet scale).

Paper sizes follow the Cascaded Diffusion Models ImageNet models (Ho et al. 2021, appendix) as far as
recalled: base 32² width 256, multipliers (1,2,3,4), 3 residual blocks; 32→64 width 192, (1,2,3,4),
5 blocks; 64→128 width 128, (1,2,3,4,4), 3 blocks; 128→256 width 128, (1,1,2,2,4,4), 2 blocks; heads of
64 channels; self-attention at 16² and 8² (only 16² for 128/256 outputs, as CDM keeps attention at low
resolution); dropout 0.1 for the 32/64 models, 0 above; gradient checkpointing on. The classifier follows
ADM's noise-aware classifiers (encoder half, width 128, attention pooling). Diffusion everywhere: cosine
schedule, T = 1000 (CDM used up to 4000; sampling respaces anyway), learned-range variance, hybrid loss;
the tiny diffusion stages train v-prediction with Min-SNR-5 weighting and fixed small variance instead
(measured: `_TINY_V_MINSNR`).

Conditioning augmentation (CDM §3/§4): every SR stage trains with Gaussian augmentation s ~ U[0, 0.3]
and samples with s = 0.1 by default (the paper presets; the tiny ones at 0.03, measured); sr128 and sr256
also blur half of the training examples with σ ~ U(0.4, 0.6), 3×3 kernel; sr64 has no blur (at 32² a blur
erases most of the content).

Conditioning skip (tiny SR stages, `unet.cond_skip_std`): the network's ε is added to E[ε | x_t] under
x_0 ~ N(upsampled input, σ²) with σ the measured std of (image − upsampled low-res image) on the built-in
photographs (0.088 at 64², 0.084 at 128², 0.059 at 256²), so a fresh SR model already returns its input
plus fine noise and training only learns the detail. In the demo's 2–4-minute SR budgets this is the
difference between noise and a usable stage (measured: docs/results/2026-11-29.md). Paper presets keep
CDM's plain ε-prediction; set `unet.cond_skip_std` there to use it.
"""

from __future__ import annotations

from cascade.config import AugConfig, DiffusionConfig, SamplingSettings, StageConfig, UNetConfig

STAGE_NAMES = ("base32", "sr64", "sr128", "sr256", "classifier32")
SIZES = ("tiny", "paper")

# Conditioning augmentation in training (CDM §3.2): Gaussian s ~ U[0, 0.3]; sr128/sr256 also blur half the inputs.
_GAUSSIAN = AugConfig(s_max=0.3)
_GAUSSIAN_BLUR = AugConfig(s_max=0.3, blur_prob=0.5, blur_sigma=(0.4, 0.6), blur_kernel=3)

# Tiny networks: 32-channel heads, 8 norm groups, attention at 8².
_TINY = {"attention_resolutions": (8,), "head_channels": 32, "norm_groups": 8, "dropout": 0.0}
# Paper networks: 64-channel heads, 32 norm groups, gradient checkpointing.
_PAPER = {"head_channels": 64, "norm_groups": 32, "use_checkpoint": True}

# Objective of the tiny base32, sr64, sr128 and sr256 stages: v-prediction (Salimans & Ho 2022) with
# Min-SNR-5 weighting (Hang et al. 2023), fixed small variance. The quality benchmark found it better per
# CPU-minute than ε + hybrid loss on base32 (photos) and on every SR stage
# (measured: docs/results/2026-12-01.md and 2026-12-02.md).
_TINY_V_MINSNR = DiffusionConfig(prediction="v", loss_weighting="min_snr", min_snr_gamma=5.0, loss="simple",
                                 model_var_type="fixed_small")

# Sampling defaults of the tiny stages: base32 guided DDIM (η = 0) at 25 steps, w = 1 (w = 1 better than 2 and 3
# on digits, level on photos: docs/results/2026-12-02.md; DDIM 25 against ancestral 40 at the same w: FD level
# or lower on patches, digits and photos at 50 instead of 80 network evaluations, class accuracy nearer the
# real images': docs/results/2026-12-07.md); the SR stages ancestral at 25 steps with their inputs re-noised at
# s = 0.03, each measured at its own budget (docs/results/2026-12-02.md).
# Paper stages: CDM's setting, ancestral sampling over every step, no guidance, s = 0.1 for SR stages.
_PAPER_SR_SAMPLING = SamplingSettings(aug_level=0.1)

_STAGES: dict[str, dict[str, StageConfig]] = {
    "base32": {
        # tiny: one cross-attention block to class tokens at 8² exercises eq. 15 at almost no cost
        "tiny": StageConfig(
            name="base32", kind="base", resolution=32, low_resolution=None, num_classes=10,
            unet=UNetConfig(model_channels=32, channel_mult=(1, 1, 2, 2), num_res_blocks=(1, 1, 2, 2),
                            cross_attention_resolutions=(8,), **_TINY),
            diffusion=_TINY_V_MINSNR, sampling=SamplingSettings(sampler="ddim", steps=25, w=1.0),
        ),
        "paper": StageConfig(
            name="base32", kind="base", resolution=32, low_resolution=None, num_classes=10,
            unet=UNetConfig(model_channels=256, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                            attention_resolutions=(16, 8), dropout=0.1, **_PAPER),
        ),
    },
    "sr64": {
        "tiny": StageConfig(
            name="sr64", kind="sr", resolution=64, low_resolution=32, num_classes=10,
            unet=UNetConfig(model_channels=12, channel_mult=(1, 2, 4, 8), num_res_blocks=(0, 1, 1, 2),
                            cond_skip_std=0.08, **_TINY),
            diffusion=_TINY_V_MINSNR, aug=_GAUSSIAN,
            # ancestral 25 steps adds more detail than DDIM 15 at the same consistency
            # (measured: docs/results/2026-12-01.md)
            sampling=SamplingSettings(sampler="ddpm", steps=25, w=1.0, aug_level=0.03),
        ),
        "paper": StageConfig(
            name="sr64", kind="sr", resolution=64, low_resolution=32, num_classes=10,
            unet=UNetConfig(model_channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=5,
                            attention_resolutions=(16, 8), dropout=0.1, **_PAPER),
            aug=_GAUSSIAN, sampling=_PAPER_SR_SAMPLING,
        ),
    },
    "sr128": {
        "tiny": StageConfig(
            name="sr128", kind="sr", resolution=128, low_resolution=64, num_classes=10,
            unet=UNetConfig(model_channels=8, channel_mult=(1, 2, 4, 4, 8), num_res_blocks=(0, 0, 1, 1, 2),
                            cond_skip_std=0.08, **_TINY),
            diffusion=_TINY_V_MINSNR, aug=_GAUSSIAN_BLUR,
            # ancestral 25 steps: about twice the detail of CDM's recipe with DDIM at ≥ 30 dB consistency
            # (measured: docs/results/2026-12-02.md)
            sampling=SamplingSettings(sampler="ddpm", steps=25, aug_level=0.03),
        ),
        "paper": StageConfig(
            name="sr128", kind="sr", resolution=128, low_resolution=64, num_classes=10,
            unet=UNetConfig(model_channels=128, channel_mult=(1, 2, 3, 4, 4), num_res_blocks=3,
                            attention_resolutions=(16,), dropout=0.0, **_PAPER),
            aug=_GAUSSIAN_BLUR, sampling=_PAPER_SR_SAMPLING,
        ),
    },
    "sr256": {
        "tiny": StageConfig(
            name="sr256", kind="sr", resolution=256, low_resolution=128, num_classes=10,
            unet=UNetConfig(model_channels=8, channel_mult=(1, 1, 2, 4, 4, 8), num_res_blocks=(0, 0, 0, 1, 1, 2),
                            cond_skip_std=0.06, **_TINY),
            diffusion=_TINY_V_MINSNR, aug=_GAUSSIAN_BLUR,
            # ancestral 25 steps: about twice the detail of CDM's recipe with DDIM, at higher consistency
            # (measured: docs/results/2026-12-02.md)
            sampling=SamplingSettings(sampler="ddpm", steps=25, aug_level=0.03),
        ),
        "paper": StageConfig(
            name="sr256", kind="sr", resolution=256, low_resolution=128, num_classes=10,
            unet=UNetConfig(model_channels=128, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                            attention_resolutions=(16,), dropout=0.0, **_PAPER),
            aug=_GAUSSIAN_BLUR, sampling=_PAPER_SR_SAMPLING,
        ),
    },
    "classifier32": {
        "tiny": StageConfig(
            name="classifier32", kind="classifier", resolution=32, low_resolution=None, num_classes=10,
            unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1, **_TINY),
        ),
        "paper": StageConfig(
            name="classifier32", kind="classifier", resolution=32, low_resolution=None, num_classes=10,
            unet=UNetConfig(model_channels=128, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                            attention_resolutions=(16, 8), dropout=0.1, **_PAPER),
        ),
    },
}


def get_stage(name: str, size: str = "tiny", num_classes: int = 10) -> StageConfig:
    """The stage ``name`` at preset ``size`` for ``num_classes`` classes (a fresh copy: safe to modify).

    Raises ValueError naming the valid choices for an unknown name or size.
    """
    if name not in _STAGES:
        raise ValueError(f"unknown stage {name!r}; valid stages: {STAGE_NAMES}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid sizes: {SIZES}")
    return StageConfig.from_dict({**_STAGES[name][size].to_dict(), "num_classes": num_classes})

"""Conditioning augmentation of the low-resolution input of super-resolution stages (CDM).

Gaussian augmentation noises x_low with the forward process to a continuous level s ∈ [0, 1]
(x_s = √ᾱ(s)·x + √(1−ᾱ(s))·ε, slides eq. 2 (Ho et al. 2020 'DDPM' eq. 4), with the continuous cosine ᾱ(s) of
``cascade.diffusion.schedules.aug_alpha_bar``); the level is an input of the network. Training draws s uniformly from
[0, s_max] per example and, for some stages, blurs a fraction of the examples first (kornia Gaussian
blur, σ drawn per example). Sampling uses one chosen level and no blur.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from kornia.filters import gaussian_blur2d

from cascade.diffusion.noise import draw_noise
from cascade.diffusion.schedules import aug_alpha_bar
from cascade.imageops import check_image_batch

if TYPE_CHECKING:
    from cascade.config import AugConfig


def _uniform(
    batch: int, low: float, high: float, generator: torch.Generator | None, device: torch.device | str | None
) -> torch.Tensor:
    u = torch.rand(batch, generator=generator, device=generator.device if generator is not None else device)
    return (low + (high - low) * u).to(device) if device is not None else low + (high - low) * u


def sample_aug_levels(
    batch: int,
    s_max: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training levels s ~ U[0, s_max], one per example: B float32 tensor."""
    if not 0.0 <= s_max <= 1.0:
        raise ValueError(f"s_max must be in [0, 1], got {s_max}")
    return _uniform(batch, 0.0, s_max, generator, device)


def gaussian_augment(
    x_low: torch.Tensor, aug_level: torch.Tensor, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """x_s = √ᾱ(s)·x_low + √(1−ᾱ(s))·ε per example (slides eq. 2 with the continuous cosine ᾱ(s); Ho et al. 2020 'DDPM' eq. 4)."""
    check_image_batch(x_low, "x_low", floating=True)
    if not isinstance(aug_level, torch.Tensor) or aug_level.shape != (x_low.shape[0],):
        got = tuple(aug_level.shape) if isinstance(aug_level, torch.Tensor) else type(aug_level).__name__
        raise ValueError(f"aug_level must be a tensor of shape ({x_low.shape[0]},), got {got}")
    if noise is None:
        noise = torch.randn_like(x_low)
    elif noise.shape != x_low.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from x_low shape {tuple(x_low.shape)}")
    alpha_bar = aug_alpha_bar(aug_level.to(device=x_low.device, dtype=torch.float32)).clamp(0.0, 1.0)
    alpha_bar = alpha_bar.to(x_low.dtype)[:, None, None, None]
    return alpha_bar.sqrt() * x_low + (1.0 - alpha_bar).sqrt() * noise  # x_s = √ᾱ x + √(1−ᾱ) ε (slides eq. 2; Ho et al. 2020 'DDPM' eq. 4)


def random_blur(
    x: torch.Tensor,
    prob: float,
    sigma_range: tuple[float, float],
    kernel_size: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Blur each example with probability ``prob`` by a kornia Gaussian of σ ~ U(sigma_range) (per example)."""
    check_image_batch(x, "x", floating=True)
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"blur prob must be in [0, 1], got {prob}")
    lo, hi = sigma_range
    if not 0.0 < lo <= hi:
        raise ValueError(f"blur sigma range must satisfy 0 < min <= max, got {sigma_range}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"blur kernel size must be a positive odd integer, got {kernel_size}")
    if prob == 0.0:
        return x
    batch = x.shape[0]
    apply = _uniform(batch, 0.0, 1.0, generator, x.device) < prob
    sigma = _uniform(batch, lo, hi, generator, x.device).to(torch.float32)
    blurred = gaussian_blur2d(
        x.float(), (kernel_size, kernel_size), torch.stack([sigma, sigma], dim=1), border_type="reflect"
    ).to(x.dtype)
    return torch.where(apply[:, None, None, None], blurred, x)


def augment_low_res(
    x_low: torch.Tensor, aug: AugConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-time augmentation: optional random blur, then Gaussian noise to s ~ U[0, aug.s_max].

    Returns (augmented x_low, aug_level: B float32 tensor to feed the network).
    """
    check_image_batch(x_low, "x_low", floating=True)
    x = random_blur(x_low, aug.blur_prob, tuple(aug.blur_sigma), aug.blur_kernel, generator)
    aug_level = sample_aug_levels(x.shape[0], aug.s_max, generator, x.device)
    noise = draw_noise(x.shape, generator, x.device, x.dtype)
    return gaussian_augment(x, aug_level, noise), aug_level


def condition_low_res(
    x_low: torch.Tensor, aug_level: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling-time conditioning: Gaussian noise to one level s for the whole batch, no blur.

    Returns (noised x_low, aug_level as a B float32 tensor to feed the network).
    """
    check_image_batch(x_low, "x_low", floating=True)
    if not 0.0 <= float(aug_level) <= 1.0:
        raise ValueError(f"aug_level must be in [0, 1], got {aug_level}")
    levels = torch.full((x_low.shape[0],), float(aug_level), device=x_low.device, dtype=torch.float32)
    return gaussian_augment(x_low, levels, noise), levels

"""Conditioning augmentation: closed forms at s = 0 and s = 1, blur fraction, clear errors."""

import pytest
import torch

from cascade.diffusion.augment import (
    augment_low_res,
    condition_low_res,
    gaussian_augment,
    random_blur,
    sample_aug_levels,
)
from cascade.diffusion.gaussian import aug_alpha_bar
from stages import AugConfig


def _images(b=4, r=8, seed=0):
    return torch.rand(b, 3, r, r, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_level_zero_without_blur_leaves_input_unchanged():
    x = _images()
    out, levels = augment_low_res(x, AugConfig(s_max=0.0, blur_prob=0.0))
    assert torch.equal(out, x) and torch.equal(levels, torch.zeros(4))
    out, levels = condition_low_res(x, 0.0)
    assert torch.equal(out, x) and levels.shape == (4,)


def test_level_one_is_pure_noise():
    x, noise = _images(), torch.randn(4, 3, 8, 8)
    out, levels = condition_low_res(x, 1.0, noise=noise)
    torch.testing.assert_close(out, noise)
    assert torch.equal(levels, torch.ones(4))


def test_gaussian_augment_closed_form_per_example():
    x, noise = _images(), torch.randn(4, 3, 8, 8)
    s = torch.tensor([0.0, 0.2, 0.5, 0.9])
    a = aug_alpha_bar(s)[:, None, None, None]
    torch.testing.assert_close(gaussian_augment(x, s, noise), a.sqrt() * x + (1 - a).sqrt() * noise)


def test_sample_aug_levels_in_range_and_reproducible():
    s = sample_aug_levels(1000, 0.3, generator=torch.Generator().manual_seed(1))
    assert s.min() >= 0 and s.max() <= 0.3 and abs(s.mean().item() - 0.15) < 0.02
    torch.testing.assert_close(s, sample_aug_levels(1000, 0.3, generator=torch.Generator().manual_seed(1)))


def test_augment_low_res_levels_follow_config():
    x = _images(b=64)
    out, levels = augment_low_res(x, AugConfig(s_max=0.3), generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and levels.shape == (64,) and levels.max() <= 0.3
    assert not torch.equal(out, x)


def test_blur_fraction_is_respected():
    x = _images(b=2000, r=6, seed=2)
    out = random_blur(x, 0.5, (0.4, 0.6), 3, generator=torch.Generator().manual_seed(0))
    changed = (out - x).flatten(1).abs().amax(dim=1) > 1e-6
    assert abs(changed.float().mean().item() - 0.5) < 0.05
    assert torch.equal(random_blur(x, 0.0, (0.4, 0.6), 3), x)
    assert ((random_blur(x[:50], 1.0, (0.4, 0.6), 3) - x[:50]).flatten(1).abs().amax(dim=1) > 1e-6).all()


def test_blur_sigma_is_per_example():
    x = _images(b=1, r=8).expand(64, -1, -1, -1).contiguous()
    out = random_blur(x, 1.0, (0.3, 2.0), 5, generator=torch.Generator().manual_seed(0))
    distinct = {round(v, 4) for v in (out - x).flatten(1).norm(dim=1).tolist()}
    assert len(distinct) > 32


def test_bad_inputs_raise():
    x = _images()
    with pytest.raises(ValueError, match="s_max"):
        sample_aug_levels(4, 1.5)
    with pytest.raises(ValueError, match="aug_level"):
        condition_low_res(x, 1.2)
    with pytest.raises(ValueError, match="aug_level must be a tensor"):
        gaussian_augment(x, torch.zeros(3))
    with pytest.raises(ValueError, match="kernel"):
        random_blur(x, 0.5, (0.4, 0.6), 4)
    with pytest.raises(ValueError, match="sigma"):
        random_blur(x, 0.5, (0.6, 0.4), 3)
    with pytest.raises(ValueError, match="B×C×H×W"):
        condition_low_res(x[0], 0.1)

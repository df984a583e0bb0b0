"""Tests of the noise draws: one generator or one per sample, and per-sample seeding that does not depend on
the batching."""

import pytest
import torch

from cascade.diffusion.noise import (
    AUG_NOISE,
    STEP_NOISE,
    X_T,
    check_generator,
    draw_noise,
    per_sample_generators,
    per_sample_noise,
)


def test_one_generator_draws_what_torch_draws():
    expected = torch.randn((3, 2, 4, 4), generator=torch.Generator().manual_seed(7))
    got = draw_noise((3, 2, 4, 4), torch.Generator().manual_seed(7), "cpu")
    assert torch.equal(got, expected)
    assert draw_noise((2, 1), None, "cpu", torch.float64).dtype == torch.float64


def test_per_sample_noise_does_not_depend_on_the_batching():
    whole = per_sample_noise(3, "base32", X_T, range(6), (2, 4, 4))
    halves = torch.cat([per_sample_noise(3, "base32", X_T, range(2), (2, 4, 4)),
                        per_sample_noise(3, "base32", X_T, range(2, 6), (2, 4, 4))])
    assert whole.shape == (6, 2, 4, 4) and torch.equal(whole, halves)
    again = draw_noise((4, 2, 4, 4), per_sample_generators(3, "base32", X_T, range(2, 6)), "cpu")
    assert torch.equal(again, whole[2:])


def test_per_sample_noise_differs_by_seed_stage_purpose_and_index():
    draws = [per_sample_noise(seed, stage, purpose, range(4), (8,))
             for seed, stage, purpose in ((0, "sr64", STEP_NOISE), (1, "sr64", STEP_NOISE),
                                          (0, "sr128", STEP_NOISE), (0, "sr64", AUG_NOISE))]
    for i, a in enumerate(draws):
        assert len({tuple(row.tolist()) for row in a}) == 4  # every sample its own noise
        for b in draws[i + 1:]:
            assert not torch.equal(a, b)


def test_generators_are_checked_against_the_batch():
    check_generator(None, 3)
    check_generator(torch.Generator(), 3)
    check_generator([torch.Generator() for _ in range(3)], 3)
    with pytest.raises(ValueError, match="got 2 generators for a batch of 3"):
        check_generator([torch.Generator(), torch.Generator()], 3)
    with pytest.raises(ValueError, match="must be a torch.Generator or a sequence of them, got str"):
        check_generator("seed", 3)

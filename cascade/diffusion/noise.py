"""Per-sample noise for reproducible sampling: every noise of sample i (its x_T, its augmentation noise and its
per-step noise) comes from a CPU generator seeded by (seed, stage, purpose, i), so a sample does not depend on
the batch size, the device or the other samples."""

from __future__ import annotations

import zlib

import numpy as np
import torch

from cascade.diffusion.samplers import draw_noise


def _sample_seed(*parts: int) -> int:
    """A 63-bit seed derived from non-negative integers (numpy SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _stage_key(name: str) -> int:
    return zlib.crc32(name.encode())


X_T, AUG_NOISE, STEP_NOISE = 0, 1, 2  # the purposes noise is drawn for


def per_sample_generators(seed: int, stage: str, purpose: int, indices: range) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by (seed, stage, purpose, sample index): the same noise on every
    device and for every batching."""
    return [torch.Generator().manual_seed(_sample_seed(seed, _stage_key(stage), purpose, i)) for i in indices]


def per_sample_noise(seed: int, stage: str, purpose: int, indices: range, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise of each sample from its own CPU generator: independent of the batching."""
    return draw_noise((len(indices), *shape), per_sample_generators(seed, stage, purpose, indices), "cpu")

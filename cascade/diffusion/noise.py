"""Every random normal draw of sampling and of the generator-driven training draws: N(0, I) noise from no
generator, one generator for the batch, or one generator per sample.

Per-sample noise makes sampling reproducible: every noise of sample i (its x_T, its augmentation noise and its
per-step noise) comes from a CPU generator seeded by (seed, stage, purpose, i), so a sample does not depend on
the batch size, the device or the other samples.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

NoiseGenerator = torch.Generator | Sequence[torch.Generator] | None  # one for the batch, or one per sample

X_T, AUG_NOISE, STEP_NOISE = 0, 1, 2  # the purposes noise is drawn for

__all__ = ["AUG_NOISE", "STEP_NOISE", "X_T", "NoiseGenerator", "check_generator", "draw_noise",
           "per_sample_generators", "per_sample_noise"]


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (reproducible for a seed), moved to device."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def check_generator(generator: NoiseGenerator, batch: int) -> None:
    """Raise a one-line ValueError unless `generator` is None, one torch.Generator, or `batch` of them."""
    if generator is None or isinstance(generator, torch.Generator):
        return
    if isinstance(generator, (str, bytes)) or not isinstance(generator, Sequence) or not all(
            isinstance(g, torch.Generator) for g in generator):
        raise ValueError(f"generator must be a torch.Generator or a sequence of them, got {type(generator).__name__}")
    if len(generator) != batch:
        raise ValueError(f"got {len(generator)} generators for a batch of {batch}: give one per sample")


def draw_noise(shape: tuple[int, ...], generator: NoiseGenerator, device, dtype=torch.float32) -> torch.Tensor:
    """N(0, I) noise of `shape` on `device`: from the default generator (None), from one generator (drawn on
    that generator's device, then moved), or row i from generator[i] (independent of the batching; then
    shape[0] must equal the number of generators, which `check_generator` verifies at the edge)."""
    if generator is None or isinstance(generator, torch.Generator):
        return _randn(tuple(shape), generator, device, dtype)
    return torch.stack([_randn(tuple(shape[1:]), g, device, dtype) for g in generator])


def _sample_seed(*parts: int) -> int:
    """A 63-bit seed derived from non-negative integers (numpy SeedSequence hashing)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def _stage_key(name: str) -> int:
    return zlib.crc32(name.encode())


def per_sample_generators(seed: int, stage: str, purpose: int, indices: range) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by (seed ≥ 0, stage name, purpose ∈ {X_T, AUG_NOISE, STEP_NOISE},
    sample index ≥ 0): the same noise on every device and for every batching."""
    return [torch.Generator().manual_seed(_sample_seed(seed, _stage_key(stage), purpose, i)) for i in indices]


def per_sample_noise(seed: int, stage: str, purpose: int, indices: range, shape: tuple[int, ...],
                     dtype=torch.float32) -> torch.Tensor:
    """len(indices)×shape standard normal noise on the CPU, row i from sample indices[i]'s own generator
    (`per_sample_generators`): independent of the batching."""
    return draw_noise((len(indices), *shape), per_sample_generators(seed, stage, purpose, indices), "cpu", dtype)

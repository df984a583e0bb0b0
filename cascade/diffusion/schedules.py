"""β schedules, the conditioning-augmentation level ↔ ᾱ map, and timestep respacing: the tables every stage's
diffusion is built from. Pure math (numpy / torch), no networks.

Linear schedule: Ho et al. 2020 "DDPM" §4; cosine: Nichol & Dhariwal 2021 "Improved DDPM" eq. 17 (slides
"cosine schedule"); respacing: Nichol & Dhariwal 2021 §4; conditioning augmentation level s: Ho et al. 2021
"Cascaded Diffusion Models" §3.2.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np
import torch

from cascade.checks import is_int

SCHEDULES = ("linear", "cosine")

_COSINE_S = 0.008  # offset s of the cosine schedule (Improved DDPM)
_MAX_BETA = 0.999  # cosine schedule clip


# ----------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------


def make_betas(kind: str, num_timesteps: int) -> np.ndarray:
    """β_1..β_T (float64, length `num_timesteps`) of the 'linear' or 'cosine' schedule."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown beta schedule {kind!r}; expected one of {SCHEDULES}")
    given = num_timesteps
    try:
        num_timesteps = operator.index(num_timesteps)
    except TypeError:
        raise ValueError(f"num_timesteps must be an int, got {num_timesteps!r}") from None
    if num_timesteps < 1 or isinstance(given, bool):  # True is an index to Python, not a count
        raise ValueError(f"num_timesteps must be an integer >= 1, got {given!r}")
    if kind == "linear":
        # DDPM's 1e-4 → 0.02 over 1000 steps, scaled by 1000/T so any T gives the same total noise.
        scale = 1000.0 / num_timesteps
        beta_start, beta_end = scale * 1e-4, scale * 0.02
        if beta_end >= 1.0:
            raise ValueError(
                f"linear schedule with num_timesteps={num_timesteps} gives β_T={beta_end:g} >= 1; "
                "use num_timesteps > 20 or the cosine schedule"
            )
        return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    # Cosine: ᾱ_t = f(t)/f(0), f(t) = cos²(((t/T + s)/(1 + s))·π/2), β_t = min(1 − ᾱ_t/ᾱ_{t−1}, 0.999).
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((steps + _COSINE_S) / (1 + _COSINE_S) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], _MAX_BETA)


def aug_alpha_bar(s: torch.Tensor | float, *, check: bool = True) -> torch.Tensor:
    """ᾱ(s) of the continuous cosine schedule for conditioning-augmentation level s ∈ [0, 1].

    ᾱ(s) = f(s)/f(0), f(s) = cos²(((s + 0.008)/1.008)·π/2), written as sin²((1 − s)/1.008·π/2) so that
    ᾱ(0) = 1 and ᾱ(1) = 0 exactly. check=False skips the range check (a host sync for CUDA tensors).
    """
    s_t = torch.as_tensor(s)
    dtype = s_t.dtype if s_t.is_floating_point() else torch.get_default_dtype()
    s64 = s_t.to(torch.float64)
    if check and bool(((s64 < 0) | (s64 > 1) | torch.isnan(s64)).any()):
        raise ValueError("aug level s must lie in [0, 1]")
    half_pi = math.pi / (2 * (1 + _COSINE_S))
    # Continuous cosine schedule ᾱ(s) = f(s)/f(0) (Improved DDPM, slides "variance scheduling").
    alpha_bar = torch.sin((1 - s64) * half_pi) ** 2 / math.sin(half_pi) ** 2
    return alpha_bar.to(dtype)


def aug_level_from_alpha_bar(alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """Inverse of `aug_alpha_bar`: the level s ∈ [0, 1] whose ᾱ(s) equals `alpha_bar` ∈ [0, 1]."""
    a_t = torch.as_tensor(alpha_bar)
    dtype = a_t.dtype if a_t.is_floating_point() else torch.get_default_dtype()
    a64 = a_t.to(torch.float64)
    if bool(((a64 < 0) | (a64 > 1) | torch.isnan(a64)).any()):
        raise ValueError("alpha_bar must lie in [0, 1]")
    half_pi = math.pi / (2 * (1 + _COSINE_S))
    # s = 1 − asin(√(ᾱ·f(0)))/half_pi, inverting ᾱ(s) = sin²((1 − s)·half_pi)/f(0).
    s = 1 - torch.asin((a64 * math.sin(half_pi) ** 2).sqrt().clamp(max=1.0)) / half_pi
    return s.clamp(0.0, 1.0).to(dtype)


# ----------------------------------------------------------------------------------------------------
# Respacing
# ----------------------------------------------------------------------------------------------------


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """Timesteps (sorted, 0-indexed) to keep when sampling with fewer steps.

    `section_counts`: "50" (50 evenly spaced steps, first and last included), "10,10,5" (the T steps split
    into equal sections with 10, 10 and 5 evenly spaced steps each), "ddim25" (the constant stride
    range(0, T, stride) with exactly 25 steps, as in DDIM), or an int / list of ints.
    """
    if not (is_int(num_timesteps) or isinstance(num_timesteps, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be an integer >= 1, got {num_timesteps!r}")
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            try:
                desired = int(spec[len("ddim"):])
            except ValueError:
                raise ValueError(f"bad respacing {section_counts!r}: expected 'ddimN'") from None
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {desired} steps of constant stride from {num_timesteps}")
        try:
            counts = [int(part) for part in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"bad respacing {section_counts!r}: expected e.g. '50', '10,10,5' or 'ddim25'"
            ) from None
    elif is_int(section_counts) or isinstance(section_counts, np.integer):
        counts = [int(section_counts)]
    else:
        counts = [int(c) for c in section_counts]
    if not counts or len(counts) > num_timesteps:
        raise ValueError(f"bad respacing {section_counts!r} for {num_timesteps} timesteps")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1 or count > size:
            raise ValueError(f"cannot take {count} steps from a section of {size} timesteps")
        stride = (size - 1) / (count - 1) if count > 1 else 0.0
        kept += [start + round(j * stride) for j in range(count)]
        start += size
    return sorted(set(kept))

"""Closed forms of EMA averaging profiles: power-function EMAs (σ_rel ↔ γ, their inner product) and the
*warm-up weight* of an EMA, the share of its average still carried by the weights of the learning-rate warm-up.

Power-function EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
EDM2 §3.1 and Appendix C): after t updates the average weighs the parameters θ_τ by the profile
p_t(τ) = (γ + 1) / t · (τ / t)^γ on 0 ≤ τ ≤ t, whose width relative to t is σ_rel (EDM2 eq. 123). Tracked with
β_t = (1 − 1/t)^(γ+1) (EDM2 eq. 127 with one step per update), it weighs θ_1 … θ_t exactly by
(k^(γ+1) − (k − 1)^(γ+1)) / t^(γ+1), so θ_0 (the initialisation) carries none of it.

The warm-up weight of an EMA whose updates 1 … N average θ_1 … θ_N (θ_0 the starting copy), W being the
learning-rate warm-up's length in steps (``trainer.warmup_steps``), is the share of θ_0 … θ_W:

- classic EMA with decays d_n (`cascade.training.ema.EMA`, d_n = min(decay, (1 + n) / (warmup + n)) for the update
  after n earlier ones): ∏_{n=W}^{N−1} d_n, 1 while N ≤ W;
- power-function EMA: (W / t)^(γ+1) for t ≥ W updates, 1 before;
- a post-hoc reconstruction Σ_i x_i · EMA_i: Σ_i x_i · (the weight of EMA_i).

An EMA is *ready* once its warm-up weight is at most `WARMUP_WEIGHT_LIMIT` (0.25); `checkpoint.load_stage` warns
when it loads EMA weights that are not. Counts assume one update per step (a skipped non-finite step shifts
them by one).
"""

from __future__ import annotations

import math

__all__ = [
    "SIGMA_REL_MAX",
    "WARMUP_WEIGHT_LIMIT",
    "check_sigma_rels",
    "classic_ema_record",
    "classic_ready_step",
    "classic_warmup_weight",
    "gamma_from_sigma_rel",
    "power_profile_dot",
    "power_ready_step",
    "power_warmup_weight",
    "sigma_rel_from_gamma",
]

WARMUP_WEIGHT_LIMIT = 0.25  # an EMA is ready once at most this share of its average sits on the warm-up's weights
# σ_rel of a power-function profile peaks at 0.3003 (γ = −0.382, EDM2 eq. 123); below 0.3 every value has exactly one
# γ on the branch γ > −0.382 that the averaging uses.
SIGMA_REL_MAX = 0.3
_DIRECT_PRODUCT_MAX = 4096  # longer warm-up ramps of the classic decay are summed in closed form (lgamma)
_GAMMA_PEAK = (math.sqrt(5.0) - 3.0) / 2.0  # −0.382: where dσ_rel/dγ = 0


def sigma_rel_from_gamma(gamma: float) -> float:
    """Relative standard deviation σ_rel of the power-function profile with exponent ``gamma`` (> −1)."""
    if not gamma > -1.0:
        raise ValueError(f"a power-function exponent must be > -1, got {gamma}")
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))  # EDM2 eq. 123


def check_sigma_rels(sigma_rels: tuple[float, ...], option: str) -> None:
    """ValueError (one line naming ``option``) unless every σ_rel is a number in (0, `SIGMA_REL_MAX`), none repeated."""
    for value in sigma_rels:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < SIGMA_REL_MAX:
            raise ValueError(f"{option}: {value!r} is out of range; each σ_rel must be in (0, {SIGMA_REL_MAX}): a "
                             "power-function EMA's relative width peaks at 0.3003 (EDM2 eq. 123), e.g. 0.05 or 0.10")
    if len(set(sigma_rels)) != len(sigma_rels):
        raise ValueError(f"{option}: a value is repeated in {list(sigma_rels)}; give each σ_rel once")


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The exponent γ (> −0.382) of the power-function profile with relative standard deviation ``sigma_rel`` in
    (0, `SIGMA_REL_MAX`): the largest real root of γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) = 0 (EDM2 eq. 126,
    Algorithm 2), found by bisection (σ_rel falls monotonically in γ there); exact to float64 rounding.
    ValueError outside the range."""
    check_sigma_rels((sigma_rel,), "sigma_rel")
    s = sigma_rel ** -2.0

    def cubic(g: float) -> float:
        return ((g + 7.0) * g + 16.0 - s) * g + 12.0 - s  # EDM2 eq. 126: (γ+2)²(γ+3) − σ_rel⁻²(γ+1)

    lo, hi = _GAMMA_PEAK, 2.0 / sigma_rel + 10.0  # cubic(lo) < 0 < cubic(hi): σ_rel ≈ 1/γ for large γ
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if cubic(mid) < 0.0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def power_profile_dot(t_a: float, gamma_a: float, t_b: float, gamma_b: float) -> float:
    """∫ p_a(τ) p_b(τ) dτ of the power-function profiles p_x(τ) = (γ_x + 1)/t_x · (τ/t_x)^γ_x on [0, t_x] (t in
    updates, > 0): (γ_a + 1)(γ_b + 1) / ((γ_a + γ_b + 1) · max(t_a, t_b)) · (t_a/t_b)^(γ_b if t_a < t_b else −γ_a)
    (EDM2 eq. 151, Algorithm 3)."""
    ratio_exp = gamma_b if t_a < t_b else -gamma_a
    # EDM2 eq. 151: inner product of two truncated power functions
    return ((gamma_a + 1.0) * (gamma_b + 1.0) * (t_a / t_b) ** ratio_exp
            / ((gamma_a + gamma_b + 1.0) * max(t_a, t_b)))


def power_warmup_weight(num_updates: int, gamma: float, warmup_steps: int) -> float:
    """Warm-up weight of a power-function EMA after ``num_updates`` updates: (W / t)^(γ+1) for t ≥ W, 1 before
    (W = ``warmup_steps``; W = 0: 0 once it has an update)."""
    t, w = int(num_updates), int(warmup_steps)
    if t <= w:
        return 1.0 if t == 0 or w > 0 else 0.0
    return (w / t) ** (gamma + 1.0)  # Σ_{k≤W} (k^(γ+1) − (k−1)^(γ+1)) / t^(γ+1)


def power_ready_step(gamma: float, warmup_steps: int) -> int:
    """The first update count at which `power_warmup_weight` is ≤ `WARMUP_WEIGHT_LIMIT`: ⌈W · 4^(1/(γ+1))⌉."""
    w = int(warmup_steps)
    step = max(1, math.ceil(w * WARMUP_WEIGHT_LIMIT ** (-1.0 / (gamma + 1.0))))
    while step > 1 and power_warmup_weight(step - 1, gamma, w) <= WARMUP_WEIGHT_LIMIT:  # float rounding at the edge
        step -= 1
    while power_warmup_weight(step, gamma, w) > WARMUP_WEIGHT_LIMIT:
        step += 1
    return step


def _log_classic_weight(num_updates: int, decay: float, warmup: float, warmup_steps: int) -> float:
    """log ∏_{n=W}^{N−1} min(decay, (1 + n)/(warmup + n)); −inf for a zero weight."""
    n_end, w = int(num_updates), int(warmup_steps)
    if n_end <= w:
        return 0.0
    # from n* on, (1 + n)/(warmup + n) ≥ decay and the decay is constant
    n_star = max(0, math.ceil((decay * warmup - 1.0) / (1.0 - decay)))
    ramp_end = min(n_end, max(w, n_star))
    if ramp_end - w <= _DIRECT_PRODUCT_MAX:  # exact where it is short: 3/12 is 0.25, not 0.25 + 7e-16
        log_w = sum(math.log((1.0 + n) / (warmup + n)) for n in range(w, ramp_end))
    else:  # ∏_{n=a}^{b−1} (1 + n)/(warmup + n) = Γ(b + 1)Γ(warmup + a) / (Γ(a + 1)Γ(warmup + b))
        log_w = ((math.lgamma(ramp_end + 1) - math.lgamma(w + 1))
                 - (math.lgamma(warmup + ramp_end) - math.lgamma(warmup + w)))
    flat = n_end - max(w, n_star)
    if flat > 0:
        if decay == 0.0:
            return -math.inf
        log_w += flat * math.log(decay)
    return log_w


def classic_warmup_weight(num_updates: int, decay: float, warmup: float, warmup_steps: int) -> float:
    """Warm-up weight of the classic EMA (`cascade.training.ema.EMA` with ``decay`` and ``warmup``) after
    ``num_updates`` updates: ∏_{n=W}^{N−1} d_n with d_n = min(decay, (1 + n)/(warmup + n)), 1 while N ≤ W."""
    return math.exp(_log_classic_weight(num_updates, decay, warmup, warmup_steps))


def classic_ready_step(decay: float, warmup: float, warmup_steps: int) -> int:
    """The first update count at which `classic_warmup_weight` is ≤ `WARMUP_WEIGHT_LIMIT` (it falls monotonically
    once past W: found by doubling, then bisection)."""
    w = int(warmup_steps)
    limit = math.log(WARMUP_WEIGHT_LIMIT)
    lo, hi = w, w + 1  # weight(lo) > limit (N ≤ W gives 1)
    while _log_classic_weight(hi, decay, warmup, w) > limit:
        lo, hi = hi, w + 2 * (hi - w)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _log_classic_weight(mid, decay, warmup, w) > limit:
            lo = mid
        else:
            hi = mid
    return hi


def classic_ema_record(decay: float, warmup: float, num_updates: int, warmup_steps: int) -> dict:
    """The checkpoint config's ``ema`` record of a classic EMA (what `checkpoint.load_stage`'s warm-up guard
    reads): kind, decay, warmup, num_updates, warmup_steps, warmup_weight, the threshold and ready_step."""
    return {"kind": "classic", "decay": float(decay), "warmup": float(warmup), "num_updates": int(num_updates),
            "warmup_steps": int(warmup_steps),
            "warmup_weight": classic_warmup_weight(num_updates, decay, warmup, warmup_steps),
            "threshold": WARMUP_WEIGHT_LIMIT, "ready_step": classic_ready_step(decay, warmup, warmup_steps)}

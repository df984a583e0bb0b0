"""What a network predicts: ε, v or x_0, and the conversions between them given x_t (a = √ᾱ_t, s = √(1 − ᾱ_t)):
x_t = a·x_0 + s·ε (slides eq. 2; Ho et al. 2020 eq. 4) and v = a·ε − s·x_0 (Salimans & Ho 2022 "Progressive
Distillation" §4). Also the Min-SNR-γ loss weight per prediction type (Hang et al. 2023). Pure torch math.
"""

from __future__ import annotations

import torch

from cascade.checks import is_number

PREDICTIONS = ("eps", "v", "x0")
LOSS_WEIGHTINGS = ("uniform", "min_snr")


def check_prediction(prediction: str) -> str:
    """`prediction` if it is one of PREDICTIONS, else a one-line ValueError."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")
    return prediction


def _scales(alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def v_from_xstart_eps(x_start: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """v = √ᾱ·ε − √(1−ᾱ)·x_0 (Salimans & Ho 2022 'Progressive Distillation', sec. 4).

    alpha_bar: ᾱ_t broadcastable against the images (e.g. B×1×1×1), in (0, 1]."""
    a, s = _scales(alpha_bar)
    # v ≡ α_t·ε − σ_t·x (Salimans & Ho 2022, sec. 4 / appendix D).
    return a * eps - s * x_start


def xstart_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_0 = (x_t − √(1−ᾱ)·ε)/√ᾱ, slides eq. 2 (Ho et al. 2020 'DDPM' eq. 4) solved for x_0 (ᾱ > 0)."""
    a, s = _scales(alpha_bar)
    # x_0 = (x_t − √(1 − ᾱ_t)·ε)/√ᾱ_t (slides eq. 2 inverted; Ho et al. 2020 'DDPM' eq. 4).
    return (x_t - s * eps) / a


def eps_from_xstart(x_t: torch.Tensor, x_start: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """ε = (x_t − √ᾱ·x_0)/√(1−ᾱ), slides eq. 2 (Ho et al. 2020 'DDPM' eq. 4) solved for ε (ᾱ < 1)."""
    a, s = _scales(alpha_bar)
    # ε = (x_t − √ᾱ_t·x_0)/√(1 − ᾱ_t) (slides eq. 2 inverted; Ho et al. 2020 'DDPM' eq. 4).
    return (x_t - a * x_start) / s


def xstart_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_0 = √ᾱ·x_t − √(1−ᾱ)·v (Salimans & Ho 2022, sec. 4); exact for every ᾱ ∈ [0, 1]."""
    a, s = _scales(alpha_bar)
    # x̂ = α_t·z_t − σ_t·v̂ (Salimans & Ho 2022, sec. 4, with α² + σ² = 1).
    return a * x_t - s * v


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """ε = √(1−ᾱ)·x_t + √ᾱ·v (Salimans & Ho 2022, sec. 4); exact for every ᾱ ∈ [0, 1]."""
    a, s = _scales(alpha_bar)
    # ε̂ = σ_t·z_t + α_t·v̂ (Salimans & Ho 2022, appendix D).
    return s * x_t + a * v


def prediction_to_xstart_eps(output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor,
                             prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0, ε) implied by a network's mean output in `prediction` space ("eps", "v" or "x0") at x_t."""
    if check_prediction(prediction) == "eps":
        return xstart_from_eps(x_t, output, alpha_bar), output
    if prediction == "v":
        return xstart_from_v(x_t, output, alpha_bar), eps_from_v(x_t, output, alpha_bar)
    return output, eps_from_xstart(x_t, output, alpha_bar)


def prediction_from_xstart_eps(x_start: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor,
                               prediction: str) -> torch.Tensor:
    """The network output in `prediction` space for a consistent pair (x_0, ε) at level ᾱ."""
    if check_prediction(prediction) == "eps":
        return eps
    if prediction == "v":
        return v_from_xstart_eps(x_start, eps, alpha_bar)
    return x_start


def eps_shift_in_prediction(delta_eps: torch.Tensor, alpha_bar: torch.Tensor, prediction: str) -> torch.Tensor:
    """The change of a `prediction`-space output at fixed x_t when its implied ε changes by `delta_eps`.

    ∂ε/∂ε = 1; x_0 = (x_t − √(1−ᾱ)·ε)/√ᾱ gives ∂x_0/∂ε = −√(1−ᾱ)/√ᾱ; v = (ε − √(1−ᾱ)·x_t)/√ᾱ (from
    ε = √(1−ᾱ)·x_t + √ᾱ·v) gives ∂v/∂ε = 1/√ᾱ. Used by classifier guidance (slides eq. 16; Dhariwal & Nichol 2021 §4.2), which shifts ε̂."""
    a, s = _scales(alpha_bar)
    if check_prediction(prediction) == "eps":
        return delta_eps
    if prediction == "v":
        return delta_eps / a
    return -s / a * delta_eps


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-γ loss weight on the MSE in `prediction` space (Hang et al. 2023, "Efficient Diffusion
    Training via Min-SNR Weighting Strategy").

    Min-SNR-γ weights the x_0-space error by min(SNR_t, γ), SNR_t = ᾱ_t/(1 − ᾱ_t). At fixed x_t the
    errors are proportional: ε − ε̂ = (√ᾱ/√(1−ᾱ))·(x̂_0 − x_0), so ‖ε − ε̂‖² = SNR·‖x_0 − x̂_0‖²; and
    v − v̂ = √ᾱ(ε − ε̂) − √(1−ᾱ)(x_0 − x̂_0) = (x̂_0 − x_0)/√(1−ᾱ), so ‖v − v̂‖² = (SNR + 1)·‖x_0 − x̂_0‖²
    (1/(1−ᾱ) = 1 + SNR). Dividing min(SNR, γ) by those factors gives the weight on each MSE:
    ε: min(SNR, γ)/SNR, v: min(SNR, γ)/(SNR + 1), x_0: min(SNR, γ). Raises ValueError unless γ > 0.
    """
    if not is_number(gamma) or not gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {gamma!r}")
    clipped = torch.clamp(snr, max=gamma)  # min(SNR_t, γ) on the x_0-space MSE (Hang et al. 2023, Min-SNR-γ)
    if check_prediction(prediction) == "eps":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1)
    return clipped

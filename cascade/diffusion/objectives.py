"""The variational bound and the training losses of a `GaussianDiffusion`, per sample: the Gaussian KL and
the discretized decoder likelihood (Ho et al. 2020 'DDPM' eq. 5 / slides eq. 7), the bound in bits per
dimension, and the simple / hybrid / Min-SNR-weighted training loss (Ho et al. 2020 Algorithm 1; Nichol &
Dhariwal 2021 'Improved DDPM'; Hang et al. 2023).

Free functions of (diffusion, ...); `GaussianDiffusion`'s methods of the same names call them. A model is any
callable `model(x_t, t, **model_kwargs)` as in `cascade.diffusion.gaussian`. Equation numbers refer to the
lecture slides (not in the repository); each also names the paper's equation.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from cascade.diffusion.noise import draw_noise

if TYPE_CHECKING:
    from cascade.diffusion.gaussian import GaussianDiffusion

__all__ = ["calc_bpd_loop", "discretized_gaussian_log_likelihood", "mean_flat", "normal_kl", "prior_bpd",
           "training_losses", "vb_terms_bpd"]


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) per element, in nats."""
    # KL of two Gaussians, the terms L_{t−1} of slides eq. 7 / eq. 10 (Ho et al. 2020 'DDPM' eqs. 5, 8).
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor,
                                        log_scales: torch.Tensor) -> torch.Tensor:
    """Per-element log-likelihood (nats) of 8-bit data rescaled to [-1, 1] under a Gaussian discretized
    into 256 bins of width 2/255 (the edge bins extend to ±∞)."""
    if x.shape != means.shape:
        raise ValueError(f"x {tuple(x.shape)} and means {tuple(means.shape)} must have the same shape")
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered + 1.0 / 255.0)
    min_in = inv_stdv * (centered - 1.0 / 255.0)
    # L_0 = −log p_θ(x_0|x_1) of slides eq. 7 (Ho et al. 2020 'DDPM' eq. 5, §3.3) as the mass of x_0's bin (log_ndtr keeps the tails exact).
    log_cdf_plus = torch.special.log_ndtr(plus_in)
    log_one_minus_cdf_min = torch.special.log_ndtr(-min_in)
    cdf_delta = torch.special.ndtr(plus_in) - torch.special.ndtr(min_in)
    log_mid = torch.log(cdf_delta.clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_mid))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def prior_bpd(diffusion: GaussianDiffusion, x_start: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) ‖ N(0, I)) per sample, in bits per dimension (slides eq. 7; Ho et al. 2020 'DDPM' eq. 5)."""
    t = torch.full((x_start.shape[0],), diffusion.num_timesteps - 1, dtype=torch.long, device=x_start.device)
    mean, _, log_variance = diffusion.q_mean_variance(x_start, t)
    # L_T of slides eq. 7 (Ho et al. 2020 'DDPM' eq. 5).
    kl = normal_kl(mean, log_variance, torch.zeros_like(mean), torch.zeros_like(log_variance))
    return mean_flat(kl) / math.log(2.0)


def vb_terms_bpd(diffusion: GaussianDiffusion, model_output: torch.Tensor, x_start: torch.Tensor,
                 x_t: torch.Tensor, t, clip_denoised: bool = False) -> dict[str, torch.Tensor]:
    """One term of the bound per sample, in bits/dim: L_{t−1} = KL(q(x_{t−1}|x_t,x_0) ‖ p_θ(x_{t−1}|x_t))
    for t > 0 and L_0 = −log p_θ(x_0|x_1) (discretized 8-bit likelihood) for t = 0 (slides eq. 7; Ho et al. 2020 'DDPM' eq. 5).

    Returns `output` (B) and `pred_xstart`.
    """
    t = diffusion.check_timesteps(t, x_t)
    true_mean, _, true_log_variance = diffusion.q_posterior_mean_variance(x_start, x_t, t)
    out = diffusion.p_mean_variance(model_output, x_t, t, clip_denoised=clip_denoised)
    # L_{t−1} (slides eq. 7 / eq. 10; Ho et al. 2020 'DDPM' eqs. 5, 8).
    kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
    # L_0 (slides eq. 7; Ho et al. 2020 'DDPM' eq. 5): discretized Gaussian decoder.
    decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
        x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])) / math.log(2.0)
    return {"output": torch.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}


def training_losses(diffusion: GaussianDiffusion, model, x_start: torch.Tensor, t,
                    noise: torch.Tensor | None = None, model_kwargs: dict | None = None) -> dict[str, torch.Tensor]:
    """Per-sample training losses at timesteps t (indices of this diffusion).

    Returns `loss`, `mse` (mean over dimensions of ‖target − output‖² in the prediction's space: ε as in
    Algorithm 1, v or x_0; unweighted), `weight` (the loss weighting's per-sample weight, 1 for
    'uniform') and `vb` (the VLB term in bits/dim with a stop-gradient mean, so it only trains the
    variance; zeros for the simple loss). loss = weight·mse, plus λ·T·vb for the hybrid loss
    (λ = 0.001 reproduces improved-diffusion's vb·T/1000). Importance weights from a timestep sampler
    are applied by the caller.
    """
    t = diffusion.check_timesteps(t, x_start)
    if noise is None:
        noise = torch.randn_like(x_start)
    x_t = diffusion.q_sample(x_start, t, noise=noise)
    model_output = model(x_t, diffusion.model_timesteps(t), **(model_kwargs or {}))
    model_mean, v = diffusion.split_output(model_output, x_t)
    # L_simple = ‖ε − ε_θ(√ᾱ_t x_0 + √(1−ᾱ_t) ε, t)‖² (slides Algorithm 1; Ho et al. 2020 'DDPM' Algorithm 1), or its v / x_0 analogue, per dimension.
    mse = mean_flat((diffusion.training_target(x_start, t, noise) - model_mean) ** 2)
    weight = diffusion.extract("loss_weights", t, mse.view(-1, 1)).view(-1)
    # Weighted MSE: w_t·‖target − output‖², w_t = 1 (uniform) or the Min-SNR-γ weight (Hang et al. 2023).
    loss = weight * mse
    if diffusion.loss_type == "hybrid":
        frozen = torch.cat([model_mean.detach(), v], dim=1)
        vb = vb_terms_bpd(diffusion, frozen, x_start, x_t, t, clip_denoised=False)["output"]
        # L_hybrid = L_simple + λ·L_vlb with L_vlb = T·vb_t (Improved DDPM).
        loss = loss + diffusion.vlb_weight * diffusion.num_timesteps * vb
    else:
        vb = torch.zeros_like(mse)
    return {"loss": loss, "mse": mse, "weight": weight, "vb": vb}


@torch.no_grad()
def calc_bpd_loop(diffusion: GaussianDiffusion, model, x_start: torch.Tensor, clip_denoised: bool = True,
                  model_kwargs: dict | None = None, generator: torch.Generator | None = None,
                  progress: bool = False) -> dict[str, torch.Tensor]:
    """The full bound of slides eq. 7 (Ho et al. 2020 'DDPM' eq. 5) per image, in bits/dim, evaluating every term t = T−1..0.

    Returns `total_bpd` (B) = `prior_bpd` (B) + sum over t of `vb` (B×T), plus `xstart_mse` (B×T) and
    `mse` (B×T, of the ε prediction).
    """
    batch = x_start.shape[0]
    vb, xstart_mse, mse = [], [], []
    steps = range(diffusion.num_timesteps - 1, -1, -1)
    for step in tqdm(steps, disable=not progress, desc="bpd"):
        t = torch.full((batch,), step, dtype=torch.long, device=x_start.device)
        noise = draw_noise(x_start.shape, generator, x_start.device, x_start.dtype)
        x_t = diffusion.q_sample(x_start, t, noise=noise)
        model_output = model(x_t, diffusion.model_timesteps(t), **(model_kwargs or {}))
        terms = vb_terms_bpd(diffusion, model_output, x_start, x_t, t, clip_denoised=clip_denoised)
        eps = diffusion.predict_eps_from_xstart(x_t, t, terms["pred_xstart"])
        vb.append(terms["output"])
        xstart_mse.append(mean_flat((terms["pred_xstart"] - x_start) ** 2))
        mse.append(mean_flat((eps - noise) ** 2))
    vb_t = torch.stack(vb[::-1], dim=1)
    prior = prior_bpd(diffusion, x_start)
    return {"total_bpd": vb_t.sum(dim=1) + prior, "prior_bpd": prior, "vb": vb_t,
            "xstart_mse": torch.stack(xstart_mse[::-1], dim=1), "mse": torch.stack(mse[::-1], dim=1)}

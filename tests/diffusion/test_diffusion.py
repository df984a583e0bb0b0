"""Tests of the diffusion math: schedules, forward process, posterior, parametrizations, losses, the
bound, respacing, conditioning-augmentation levels and the timestep samplers."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from cascade.diffusion.gaussian import (
    GaussianDiffusion,
    apply_dynamic_threshold,
    aug_alpha_bar,
    aug_level_from_alpha_bar,
    eps_from_v,
    eps_from_xstart,
    eps_shift_in_prediction,
    make_betas,
    min_snr_weight,
    prediction_from_xstart_eps,
    prediction_to_xstart_eps,
    space_timesteps,
    v_from_xstart_eps,
    xstart_from_eps,
    xstart_from_v,
)
from cascade.training.timestep_sampler import LossSecondMomentResampler, UniformSampler, make_timestep_sampler

pytestmark = pytest.mark.usefixtures("one_thread")


class GaussianOracle(nn.Module):
    """Exact reverse process for data x_0 ~ N(mu, sigma²I): the optimal ε and (learned_range) the v that
    gives the true variance of q(x_{t−1}|x_t). Called with original-scale timesteps."""

    def __init__(self, diffusion: GaussianDiffusion, mu: float, sigma: float, learned: bool = False):
        super().__init__()
        self.d, self.mu, self.sigma, self.learned = diffusion, mu, sigma, learned
        self.index = torch.full((int(diffusion.timestep_map.max()) + 1,), -1, dtype=torch.long)
        self.index[diffusion.timestep_map] = torch.arange(diffusion.num_timesteps)

    def forward(self, x, t, **kwargs):
        i = self.index[t.long()]
        assert bool((i >= 0).all()), "model called with a timestep outside the respaced set"

        def tab(name):
            return getattr(self.d, name)[i].view(-1, *([1] * (x.ndim - 1)))

        a, s2, x64 = tab("alphas_cumprod"), self.sigma**2, x.double()
        marginal_var = a * s2 + 1 - a
        ex0 = self.mu + a.sqrt() * s2 / marginal_var * (x64 - a.sqrt() * self.mu)  # E[x_0 | x_t]
        eps = (x64 - a.sqrt() * ex0) / (1 - a).sqrt()
        if not self.learned:
            return eps.to(x.dtype)
        var_x0 = s2 * (1 - a) / marginal_var  # Var[x_0 | x_t]
        true_var = tab("posterior_variance") + tab("posterior_mean_coef1") ** 2 * var_x0
        min_log, max_log = tab("posterior_log_variance_clipped"), tab("log_betas")
        v = 2 * (true_var.log() - min_log) / (max_log - min_log) - 1
        return torch.cat([eps, v.expand_as(x64)], dim=1).to(x.dtype)


# ---------------------------------------------------------------------------------------------------


def test_schedule_endpoints_and_shapes():
    for T in (1000, 250):
        betas = make_betas("linear", T)
        assert betas.shape == (T,) and betas.dtype == np.float64
        assert betas[0] == pytest.approx(1e-4 * 1000 / T) and betas[-1] == pytest.approx(0.02 * 1000 / T)
        assert np.all(np.diff(betas) > 0)
    betas = make_betas("cosine", 1000)
    assert betas.shape == (1000,) and betas.max() == pytest.approx(0.999) and betas[-1] == pytest.approx(0.999)
    f = np.cos((np.arange(1001) / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    alpha_bar = np.cumprod(1 - betas)
    np.testing.assert_allclose(alpha_bar[:-1], (f / f[0])[1:-1], rtol=1e-10)  # ᾱ_t = f(t)/f(0) below the clip
    d = GaussianDiffusion(betas)
    assert d.num_timesteps == 1000 and d.alphas_cumprod.dtype == torch.float64
    assert d.alphas_cumprod_prev[0] == 1.0 and d.posterior_variance[0] == 0.0
    assert torch.all(d.posterior_variance[1:] < d.betas[1:])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        make_betas("quadratic", 10)
    for T in (0, -3):
        with pytest.raises(ValueError, match="num_timesteps"):
            make_betas("cosine", T)
    with pytest.raises(ValueError, match="β_T"):
        make_betas("linear", 10)
    with pytest.raises(ValueError, match="model_var_type"):
        GaussianDiffusion(make_betas("cosine", 10), model_var_type="learned")
    with pytest.raises(ValueError, match="loss"):
        GaussianDiffusion(make_betas("cosine", 10), loss_type="l1")
    with pytest.raises(ValueError, match="learned_range"):
        GaussianDiffusion(make_betas("cosine", 10), loss_type="hybrid")
    with pytest.raises(ValueError, match="beta"):
        GaussianDiffusion([0.1, 1.0])
    for spec in ("", "abc", "ddim7", "ddimx", "20", "0", "5,5,5,5,5,5,5,5,5,5,5"):
        with pytest.raises(ValueError):
            space_timesteps(10, spec)
    d = GaussianDiffusion(make_betas("cosine", 10))
    for kept in ([-1, 3], [0, 10], []):
        with pytest.raises(ValueError):
            d.respace(kept)
    x = torch.zeros(2, 3, 4, 4)
    for t in (torch.tensor([0, 10]), torch.tensor([-1, 0]), torch.tensor([0.5, 1.0]), torch.tensor([1, 2, 3])):
        with pytest.raises(ValueError, match="timesteps"):
            d.q_sample(x, t)
    with pytest.raises(ValueError, match="6 channels"):
        GaussianDiffusion(make_betas("cosine", 10), "learned_range").p_mean_variance(
            torch.zeros(2, 3, 4, 4), x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="3 channels"):
        d.training_losses(lambda x_t, t: torch.zeros(2, 6, 4, 4), x, torch.tensor([1, 2]))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_closed_form_matches_one_step_chain(schedule):
    d = GaussianDiffusion(make_betas(schedule, 100))
    x0 = torch.tensor([0.7, -0.3, 0.0], dtype=torch.float64).view(3, 1, 1, 1)
    # Exact moments of the one-step process (eq. 1) applied t+1 times vs. the closed form (eq. 2).
    mean, var = x0.clone(), torch.zeros_like(x0)
    for t in range(d.num_timesteps):
        mean = d.alphas[t].sqrt() * mean
        var = d.alphas[t] * var + d.betas[t]
        q_mean, q_var, q_log_var = d.q_mean_variance(x0, torch.full((3,), t))
        torch.testing.assert_close(q_mean, mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(q_var, var, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(q_log_var, var.log(), rtol=1e-10, atol=1e-10)
    # Monte Carlo: simulate the chain and compare with q_sample at a few t.
    n, gen = 20000, torch.Generator().manual_seed(0)
    x_start = torch.full((n, 1, 1, 1), 0.7, dtype=torch.float64)
    x = x_start.clone()
    checkpoints = {0, 9, 49, 99}
    for t in range(d.num_timesteps):
        x = d.alphas[t].sqrt() * x + d.betas[t].sqrt() * torch.randn(x.shape, generator=gen, dtype=x.dtype)
        if t in checkpoints:
            direct = d.q_sample(x_start, torch.full((n,), t),
                                noise=torch.randn(x.shape, generator=gen, dtype=x.dtype))
            sd = math.sqrt(1 - d.alphas_cumprod[t])
            assert abs(x.mean() - direct.mean()) < 5 * sd * math.sqrt(2 / n)
            assert abs(x.std() / direct.std() - 1) < 5 * math.sqrt(1 / n)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_mean_eq9_equals_eq13(schedule):
    d = GaussianDiffusion(make_betas(schedule, 1000))
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 3, 4, 4, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 500, 998, 999])
    x_t = d.q_sample(x0, t, eps)
    x0_hat = d.predict_xstart_from_eps(x_t, t, eps)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(d.predict_eps_from_xstart(x_t, t, x0_hat), eps)
    mean9, var9, _ = d.q_posterior_mean_variance(x0_hat, x_t, t)
    alpha = d.alphas[t].view(-1, 1, 1, 1)
    beta = d.betas[t].view(-1, 1, 1, 1)
    alpha_bar = d.alphas_cumprod[t].view(-1, 1, 1, 1)
    mean13 = (x_t - beta / (1 - alpha_bar).sqrt() * eps) / alpha.sqrt()  # eq. 13
    torch.testing.assert_close(mean9, mean13)
    out = d.p_mean_variance(eps, x_t, t, clip_denoised=False)
    torch.testing.assert_close(out["mean"], mean13)
    torch.testing.assert_close(out["variance"], var9)


def test_learned_variance_endpoints_also_after_respacing():
    base = GaussianDiffusion(make_betas("cosine", 1000), "learned_range")
    respaced = base.respace("50")
    kept = space_timesteps(1000, "50")
    ab = base.alphas_cumprod[kept]
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    new_betas = 1 - ab / ab_prev
    torch.testing.assert_close(respaced.betas, new_betas)
    torch.testing.assert_close(respaced.alphas_cumprod, ab)
    torch.testing.assert_close(respaced.posterior_variance, (1 - ab_prev) / (1 - ab) * new_betas)
    assert respaced.timestep_map.tolist() == kept
    for d in (base, respaced):
        T = d.num_timesteps
        t = torch.arange(1, T)
        x = torch.randn(T - 1, 3, 2, 2, dtype=torch.float64)
        for v, expected in ((1.0, d.betas[1:]), (0.0, d.posterior_variance[1:])):
            out = torch.cat([torch.randn_like(x), torch.full_like(x, 2 * v - 1)], dim=1)
            got = d.p_mean_variance(out, x, t)["variance"]
            torch.testing.assert_close(got, expected.view(-1, 1, 1, 1).expand_as(x))
    small = GaussianDiffusion(make_betas("cosine", 100), "fixed_small")
    large = GaussianDiffusion(make_betas("cosine", 100), "fixed_large")
    x, t = torch.randn(2, 3, 2, 2, dtype=torch.float64), torch.tensor([5, 50])
    torch.testing.assert_close(small.p_mean_variance(x, x, t)["variance"][:, 0, 0, 0], small.posterior_variance[t])
    torch.testing.assert_close(large.p_mean_variance(x, x, t)["variance"][:, 0, 0, 0], large.betas[t])
    # fixed_large at t = 0 takes β̃ at t = 1, as DDPM / Improved DDPM do (log-variance likewise).
    out = large.p_mean_variance(x, x, torch.tensor([0, 1]))
    torch.testing.assert_close(out["variance"][:, 0, 0, 0], torch.stack([large.posterior_variance[1], large.betas[1]]))
    torch.testing.assert_close(out["log_variance"], out["variance"].log())
    respaced = large.respace("10")
    out = respaced.p_mean_variance(x, x, torch.tensor([0, 0]))
    torch.testing.assert_close(out["variance"][:, 0, 0, 0], respaced.posterior_variance[1].expand(2))


def test_vlb_equals_data_nll_for_gaussian_data():
    mu, sigma, n = 0.2, 0.4, 12000
    d = GaussianDiffusion(make_betas("cosine", 100), "learned_range")
    oracle = GaussianOracle(d, mu, sigma, learned=True)
    gen = torch.Generator().manual_seed(2)
    x0 = mu + sigma * torch.randn(n, 1, 2, 2, generator=gen, dtype=torch.float64)
    dims = x0[0].numel()
    nats_per_bpd = dims * math.log(2.0)
    vlb = d.prior_bpd(x0) * nats_per_bpd  # L_T
    for step in range(d.num_timesteps):
        t = torch.full((n,), step)
        x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=gen, dtype=x0.dtype))
        out = oracle(x_t, t)
        if step > 0:  # L_{t−1}
            vlb = vlb + d.vb_terms_bpd(out, x0, x_t, t)["output"] * nats_per_bpd
        else:  # continuous L_0 = −log N(x_0; μ_θ(x_1), Σ_θ(x_1))
            p = d.p_mean_variance(out, x_t, t, clip_denoised=False)
            nll0 = 0.5 * (math.log(2 * math.pi) + p["log_variance"] + (x0 - p["mean"]) ** 2 / p["variance"])
            vlb = vlb + nll0.sum(dim=(1, 2, 3))
    nll = (0.5 * math.log(2 * math.pi * sigma**2) + (x0 - mu) ** 2 / (2 * sigma**2)).sum(dim=(1, 2, 3))
    diff = vlb - nll  # unbiased estimate of 0 for every x_0
    standard_error = diff.std() / math.sqrt(n)
    assert standard_error < 0.025
    assert abs(diff.mean()) < 4 * standard_error
    # The same ε with the fixed small variance gives a strictly looser bound.
    d_small = GaussianDiffusion(make_betas("cosine", 100), "fixed_small")
    t = torch.full((n,), 3)
    x_t = d.q_sample(x0, t)
    out = oracle(x_t, t)
    exact = d.vb_terms_bpd(out, x0, x_t, t)["output"].mean()
    loose = d_small.vb_terms_bpd(out[:, :1], x0, x_t, t)["output"].mean()
    assert loose > exact


def test_training_losses_simple_and_hybrid():
    gen = torch.Generator().manual_seed(3)
    x0 = torch.rand(4, 3, 4, 4, generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([0, 3, 7, 9])
    simple = GaussianDiffusion(make_betas("cosine", 10))
    seen = []

    def zero_model(x_t, t_model, y=None):
        seen.append((t_model.clone(), y))
        return torch.zeros_like(x_t)

    losses = simple.training_losses(zero_model, x0, t, noise, model_kwargs={"y": torch.arange(4)})
    torch.testing.assert_close(losses["mse"], (noise**2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(losses["loss"], losses["mse"])
    assert torch.all(losses["vb"] == 0)
    assert seen[0][1].tolist() == [0, 1, 2, 3]
    # A respaced diffusion calls the model with original-scale timesteps.
    respaced = simple.respace([0, 5, 9])
    respaced.training_losses(zero_model, x0[:3], torch.tensor([0, 1, 2]), noise[:3])
    assert seen[-1][0].tolist() == [0, 5, 9]

    hybrid = GaussianDiffusion(make_betas("cosine", 10), "learned_range", "hybrid", vlb_weight=0.001)
    output = torch.randn(4, 6, 4, 4, generator=gen, requires_grad=True)
    losses = hybrid.training_losses(lambda x_t, t_model: output * 1.0, x0, t, noise)
    torch.testing.assert_close(losses["loss"], losses["mse"] + 0.001 * 10 * losses["vb"])
    (grad,) = torch.autograd.grad(losses["vb"].sum(), output, retain_graph=True)
    assert torch.all(grad[:, :3] == 0), "the VLB term must not train the ε output"
    assert grad[:, 3:].abs().sum() > 0, "the VLB term trains the variance output"
    (grad_mse,) = torch.autograd.grad(losses["mse"].sum(), output)
    assert torch.all(grad_mse[:, 3:] == 0) and grad_mse[:, :3].abs().sum() > 0


def test_calc_bpd_loop_on_tiny_model():
    torch.manual_seed(0)
    model_net = nn.Conv2d(3, 6, 3, padding=1)
    d = GaussianDiffusion(make_betas("cosine", 8), "learned_range")
    x0 = (torch.randint(0, 256, (2, 3, 4, 4)).float() / 127.5 - 1)
    out = d.calc_bpd_loop(lambda x, t: model_net(x), x0, generator=torch.Generator().manual_seed(0))
    assert out["vb"].shape == (2, 8) and out["mse"].shape == (2, 8) and out["xstart_mse"].shape == (2, 8)
    assert out["prior_bpd"].shape == (2,) and torch.all(out["prior_bpd"] >= 0)
    torch.testing.assert_close(out["total_bpd"], out["prior_bpd"] + out["vb"].sum(dim=1))
    assert torch.isfinite(out["total_bpd"]).all() and torch.all(out["vb"][:, 1:] >= 0)
    # The t = 0 term is the discretized decoder NLL: a proper likelihood of 8-bit data, so ≥ 0 bits.
    assert torch.all(out["vb"][:, 0] >= 0)


def test_discretized_decoder_is_a_distribution():
    from cascade.diffusion.objectives import discretized_gaussian_log_likelihood

    values = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    for mean, log_scale in ((0.1, -3.0), (-0.9, -1.0), (0.999, -6.0)):
        logp = discretized_gaussian_log_likelihood(values, torch.full_like(values, mean),
                                                   torch.full_like(values, log_scale))
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_dynamic_threshold():
    x = torch.stack([torch.linspace(-0.5, 0.5, 100), torch.linspace(-3.0, 3.0, 100)]).view(2, 1, 10, 10)
    out = apply_dynamic_threshold(x, 0.9)
    torch.testing.assert_close(out[0], x[0])  # percentile below 1: unchanged
    s = torch.quantile(x[1].abs().flatten(), 0.9)
    torch.testing.assert_close(out[1], x[1].clamp(-s, s) / s)
    assert out[1].abs().max() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="percentile"):
        apply_dynamic_threshold(x, 1.5)
    d = GaussianDiffusion(make_betas("cosine", 10))
    t = torch.tensor([9, 9])
    res = d.p_mean_variance(torch.randn(2, 1, 10, 10) * 5, x, t, dynamic_threshold=0.95)
    assert res["pred_xstart"].abs().max() <= 1.0 + 1e-6


def test_aug_levels():
    assert aug_alpha_bar(torch.tensor(0.0)).item() == 1.0
    assert aug_alpha_bar(torch.tensor(1.0)).item() == 0.0
    s = torch.linspace(0, 1, 101, dtype=torch.float64)
    ab = aug_alpha_bar(s)
    f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    torch.testing.assert_close(ab, f / f[0], rtol=0, atol=1e-12)
    assert torch.all(ab[1:] < ab[:-1])
    torch.testing.assert_close(aug_level_from_alpha_bar(ab), s, rtol=0, atol=1e-7)
    assert aug_alpha_bar(torch.tensor([0.25, 0.5])).dtype == torch.float32
    levels = torch.rand(50, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(aug_level_from_alpha_bar(aug_alpha_bar(levels)), levels, rtol=0, atol=1e-4)
    with pytest.raises(ValueError):
        aug_alpha_bar(torch.tensor([1.5]))
    with pytest.raises(ValueError):
        aug_level_from_alpha_bar(torch.tensor([-0.1]))


def test_space_timesteps():
    kept = space_timesteps(1000, "50")
    assert len(kept) == 50 and kept[0] == 0 and kept[-1] == 999
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    kept = space_timesteps(300, "10,10,5")
    assert len(kept) == 25 and kept[:10] == sorted(kept[:10]) and kept[9] == 99 and kept[10] == 100
    assert space_timesteps(10, "10") == list(range(10)) and space_timesteps(10, [1]) == [0]
    d = GaussianDiffusion(make_betas("cosine", 1000)).respace("ddim25")
    assert d.num_timesteps == 25 and d.timestep_map.tolist() == list(range(0, 1000, 40))
    twice = GaussianDiffusion(make_betas("cosine", 1000)).respace("100").respace("10")
    torch.testing.assert_close(twice.alphas_cumprod,
                               GaussianDiffusion(make_betas("cosine", 1000)).alphas_cumprod[twice.timestep_map])


def test_timestep_samplers():
    gen = torch.Generator().manual_seed(0)
    uniform = make_timestep_sampler("uniform", 10)
    assert isinstance(uniform, UniformSampler)
    t, w = uniform.sample(64, "cpu", generator=gen)
    assert t.dtype == torch.long and t.min() >= 0 and t.max() < 10 and torch.all(w == 1)
    with pytest.raises(ValueError, match="unknown timestep sampler"):
        make_timestep_sampler("importance", 10)

    sampler = make_timestep_sampler("loss-second-moment", 4)
    assert isinstance(sampler, LossSecondMomentResampler)
    np.testing.assert_allclose(sampler.weights(), np.ones(4))  # not warmed up yet
    for _ in range(sampler.history_per_term):
        sampler.update_with_all_losses(torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    p = sampler.weights() / sampler.weights().sum()
    expected = np.array([1, 2, 3, 4]) / 10 * (1 - 0.001) + 0.001 / 4
    np.testing.assert_allclose(p, expected)
    t, w = sampler.sample(100, "cpu", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(w, torch.tensor(1 / (4 * expected[t.numpy()]), dtype=torch.float32))
    # Resuming from a state dict reproduces the sampler exactly.
    resumed = LossSecondMomentResampler(4)
    resumed.load_state_dict(sampler.state_dict())
    np.testing.assert_allclose(resumed.weights(), sampler.weights())
    a = sampler.sample(16, "cpu", generator=torch.Generator().manual_seed(5))
    b = resumed.sample(16, "cpu", generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError):
        LossSecondMomentResampler(5).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError):
        sampler.update_with_all_losses([7], [1.0])


# ---------------------------------------------------------------------------------------------------
# Prediction types and loss weighting


PREDICTIONS = ("eps", "v", "x0")


def _pair(shape=(5, 3, 2, 2), seed=4):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=gen, dtype=torch.float64)
    eps = torch.randn(shape, generator=gen, dtype=torch.float64)
    alpha_bar = torch.tensor([1e-4, 0.1, 0.5, 0.9, 0.9999], dtype=torch.float64).view(-1, 1, 1, 1)
    return x0, eps, alpha_bar, alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps


def test_eps_v_x0_conversions_round_trip():
    x0, eps, ab, x_t = _pair()
    v = v_from_xstart_eps(x0, eps, ab)
    torch.testing.assert_close(v, ab.sqrt() * eps - (1 - ab).sqrt() * x0)  # Salimans & Ho 2022
    torch.testing.assert_close(xstart_from_v(x_t, v, ab), x0)
    torch.testing.assert_close(eps_from_v(x_t, v, ab), eps)
    torch.testing.assert_close(xstart_from_eps(x_t, eps, ab), x0)
    torch.testing.assert_close(eps_from_xstart(x_t, x0, ab), eps)
    # (x_t, v) is (x_0, ε) rotated by the angle φ with cos φ = √ᾱ (Salimans & Ho 2022, appendix D): norms agree
    torch.testing.assert_close(v**2 + x_t**2, eps**2 + x0**2)
    for prediction in PREDICTIONS:
        out = prediction_from_xstart_eps(x0, eps, ab, prediction)
        torch.testing.assert_close(out, {"eps": eps, "v": v, "x0": x0}[prediction])
        back_x0, back_eps = prediction_to_xstart_eps(out, x_t, ab, prediction)
        torch.testing.assert_close(back_x0, x0)
        torch.testing.assert_close(back_eps, eps)
        # an ε shift at fixed x_t maps to the output shift that implies it
        delta = 0.01 * torch.ones_like(eps)
        shifted = out + eps_shift_in_prediction(delta, ab, prediction)
        torch.testing.assert_close(prediction_to_xstart_eps(shifted, x_t, ab, prediction)[1], eps + delta)
    with pytest.raises(ValueError, match="unknown prediction type 'score'"):
        prediction_to_xstart_eps(eps, x_t, ab, "score")


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_diffusion_predictions_match_the_closed_forms(prediction):
    base = GaussianDiffusion(make_betas("cosine", 100), prediction=prediction)
    d = base.respace("20")
    assert (d.prediction, d.loss_weighting) == (prediction, "uniform") and "prediction" in repr(d)
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 5, 12, 19])
    x_t = d.q_sample(x0, t, eps)
    ab = d.alphas_cumprod[t].view(-1, 1, 1, 1)
    target = d.training_target(x0, t, eps)
    torch.testing.assert_close(target, prediction_from_xstart_eps(x0, eps, ab, prediction))
    got_x0, got_eps = d.predict_xstart_eps(x_t, t, target)
    torch.testing.assert_close(got_x0, x0)
    torch.testing.assert_close(got_eps, eps)


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large", "learned_range"])
def test_p_mean_variance_and_vlb_agree_across_prediction_types(var_type):
    """The same underlying x̂_0, expressed as ε, v or x_0, gives the same reverse step and bound terms; the
    learned-variance channels act the same whatever the mean's parametrization."""
    gen = torch.Generator().manual_seed(6)
    x_start = torch.rand(6, 3, 2, 2, generator=gen, dtype=torch.float64) * 2 - 1
    pred_x0 = (x_start + 0.3 * torch.randn(x_start.shape, generator=gen, dtype=torch.float64)).clamp(-1.3, 1.3)
    var_channels = torch.rand(x_start.shape, generator=gen, dtype=torch.float64) * 2 - 1
    t = torch.tensor([0, 1, 10, 30, 60, 99])
    results = {}
    for prediction in PREDICTIONS:
        d = GaussianDiffusion(make_betas("cosine", 100), var_type, prediction=prediction)
        x_t = d.q_sample(x_start, t, torch.randn(x_start.shape, generator=torch.Generator().manual_seed(7),
                                                 dtype=torch.float64))
        ab = d.alphas_cumprod[t].view(-1, 1, 1, 1)
        out = prediction_from_xstart_eps(pred_x0, eps_from_xstart(x_t, pred_x0, ab), ab, prediction)
        if var_type == "learned_range":
            out = torch.cat([out, var_channels], dim=1)
        results[prediction] = (d.p_mean_variance(out, x_t, t, clip_denoised=False),
                               d.p_mean_variance(out, x_t, t, clip_denoised=True),
                               d.vb_terms_bpd(out, x_start, x_t, t)["output"])
    ref = results["eps"]
    torch.testing.assert_close(ref[0]["pred_xstart"], pred_x0)
    for prediction in ("v", "x0"):
        for got, want in zip(results[prediction][:2], ref[:2]):
            for key in ("mean", "variance", "log_variance", "pred_xstart", "eps"):
                torch.testing.assert_close(got[key], want[key], rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(results[prediction][2], ref[2], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("gamma", [0.5, 5.0])
def test_min_snr_weights_per_prediction_type(gamma):
    d = {p: GaussianDiffusion(make_betas("cosine", 50), prediction=p, loss_weighting="min_snr",
                                          min_snr_gamma=gamma) for p in PREDICTIONS}
    ab = d["eps"].alphas_cumprod
    snr = ab / (1 - ab)
    torch.testing.assert_close(d["eps"].snr, snr)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    # Hang et al. 2023: min(SNR, γ) on the x_0-space MSE, i.e. /SNR on the ε-MSE and /(SNR + 1) on the v-MSE.
    torch.testing.assert_close(d["eps"].loss_weights, clipped / snr)
    torch.testing.assert_close(d["v"].loss_weights, clipped / (snr + 1))
    torch.testing.assert_close(d["x0"].loss_weights, clipped)
    assert (snr > gamma).any() and (snr < gamma).any()  # both branches of the min are exercised
    torch.testing.assert_close(min_snr_weight(snr, gamma, "v"), d["v"].loss_weights)

    # The same x̂_0 error costs the same weighted loss whatever the prediction type: min(SNR, γ)·‖x_0 − x̂_0‖².
    gen = torch.Generator().manual_seed(8)
    x0 = torch.rand(5, 3, 2, 2, generator=gen, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    pred_x0 = x0 + 0.2 * torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 10, 25, 40, 49])
    x0_mse = ((x0 - pred_x0) ** 2).mean(dim=(1, 2, 3))
    for prediction, diffusion in d.items():
        def model(x_t, t_model, diffusion=diffusion, prediction=prediction):
            a = diffusion.alphas_cumprod[t_model].view(-1, 1, 1, 1)
            return prediction_from_xstart_eps(pred_x0, eps_from_xstart(x_t, pred_x0, a), a, prediction)

        losses = diffusion.training_losses(model, x0, t, noise)
        torch.testing.assert_close(losses["loss"], clipped[t] * x0_mse, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(losses["loss"], losses["weight"] * losses["mse"])
        uniform = GaussianDiffusion(make_betas("cosine", 50), prediction=prediction)
        plain = uniform.training_losses(model, x0, t, noise)
        # uniform weighting is the plain MSE in the output space: SNR·, (SNR + 1)· and 1· the x_0-space MSE
        factor = {"eps": snr[t], "v": snr[t] + 1, "x0": torch.ones_like(snr[t])}[prediction]
        torch.testing.assert_close(plain["loss"], factor * x0_mse, rtol=1e-6, atol=1e-12)
        assert torch.all(plain["weight"] == 1)


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_hybrid_loss_trains_only_the_variance_for_every_prediction(prediction):
    gen = torch.Generator().manual_seed(9)
    x0 = torch.rand(4, 3, 4, 4, generator=gen) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.tensor([0, 3, 7, 9])
    hybrid = GaussianDiffusion(make_betas("cosine", 10), "learned_range", "hybrid", prediction=prediction,
                                           loss_weighting="min_snr", min_snr_gamma=5.0)
    output = torch.randn(4, 6, 4, 4, generator=gen, requires_grad=True)
    losses = hybrid.training_losses(lambda x_t, t_model: output * 1.0, x0, t, noise)
    target = hybrid.training_target(x0, t, noise)
    torch.testing.assert_close(losses["mse"], ((target - output[:, :3]) ** 2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(losses["loss"], losses["weight"] * losses["mse"] + 0.001 * 10 * losses["vb"])
    (grad,) = torch.autograd.grad(losses["vb"].sum(), output)
    assert torch.all(grad[:, :3] == 0) and grad[:, 3:].abs().sum() > 0


def test_bad_prediction_and_weighting_settings_raise():
    import stages

    betas = make_betas("cosine", 10)
    with pytest.raises(ValueError, match="unknown prediction type 'score'"):
        GaussianDiffusion(betas, prediction="score")
    with pytest.raises(ValueError, match="unknown loss_weighting 'snr'"):
        GaussianDiffusion(betas, loss_weighting="snr")
    for gamma in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="min_snr_gamma must be > 0"):
            GaussianDiffusion(betas, loss_weighting="min_snr", min_snr_gamma=gamma)
    base = stages.get_stage("base32", "tiny")
    for override, message in (({"prediction": "score"}, "diffusion.prediction must be one of"),
                              ({"loss_weighting": "snr"}, "diffusion.loss_weighting must be one of"),
                              ({"min_snr_gamma": 0}, "diffusion.min_snr_gamma must be a number > 0")):
        with pytest.raises(ValueError, match=message) as info:
            base.with_overrides({"diffusion": override})
        assert "\n" not in str(info.value)
    cfg = base.with_overrides({"diffusion": {"prediction": "v", "loss_weighting": "min_snr", "min_snr_gamma": 2.0}})
    d = stages.build_diffusion(cfg)
    assert (d.prediction, d.loss_weighting, d.min_snr_gamma) == ("v", "min_snr", 2.0)
    assert stages.build_diffusion(stages.get_stage("base32", "paper")).prediction == "eps"  # CDM's recipe

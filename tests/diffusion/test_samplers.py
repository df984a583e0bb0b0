"""Tests of the samplers (known answers for Gaussian data) and the guidance wrappers."""

import math

import pytest
import torch
from torch import nn

from cascade.diffusion.gaussian import (
    GaussianDiffusion,
    eps_from_xstart,
    make_betas,
    prediction_from_xstart_eps,
    prediction_to_xstart_eps,
)
from cascade.diffusion.guidance import classifier_free_guidance, classifier_guidance
from cascade.diffusion.samplers import (
    sample_ddim,
    sample_ddpm,
    sample_dpmpp2m,
    sample_heun,
)

MU, SIGMA = 0.3, 0.5
N, SHAPE = 4000, (1, 2, 2)  # 16000 independent scalars per run


pytestmark = pytest.mark.usefixtures("one_thread")


def _respaced_index(diffusion: GaussianDiffusion) -> torch.Tensor:
    """Original-scale timestep → index of the respaced diffusion (−1 where a timestep was not kept)."""
    index = torch.full((int(diffusion.timestep_map.max()) + 1,), -1, dtype=torch.long)
    index[diffusion.timestep_map] = torch.arange(diffusion.num_timesteps)
    return index


class GaussianOracle(nn.Module):
    """Exact reverse process for data x_0 ~ N(MU, SIGMA²I): the optimal ε and (learned_range) the v that
    gives the true variance of q(x_{t−1}|x_t). Called with original-scale timesteps."""

    def __init__(self, diffusion: GaussianDiffusion, learned: bool = False):
        super().__init__()
        self.d, self.learned = diffusion, learned
        self.index, self.calls = _respaced_index(diffusion), []

    def forward(self, x, t, **kwargs):
        self.calls.append(t.clone())
        i = self.index[t.long()]
        assert bool((i >= 0).all()), "model called with a timestep outside the respaced set"

        def tab(name):
            return getattr(self.d, name)[i].view(-1, *([1] * (x.ndim - 1)))

        a, s2, x64 = tab("alphas_cumprod"), SIGMA**2, x.double()
        marginal_var = a * s2 + 1 - a
        ex0 = MU + a.sqrt() * s2 / marginal_var * (x64 - a.sqrt() * MU)  # E[x_0 | x_t]
        eps = (x64 - a.sqrt() * ex0) / (1 - a).sqrt()
        if not self.learned:
            return eps.to(x.dtype)
        true_var = tab("posterior_variance") + tab("posterior_mean_coef1") ** 2 * s2 * (1 - a) / marginal_var
        min_log, max_log = tab("posterior_log_variance_clipped"), tab("log_betas")
        v = 2 * (true_var.log() - min_log) / (max_log - min_log) - 1
        return torch.cat([eps, v.expand_as(x64)], dim=1).to(x.dtype)


def marginal_sample(alpha_bar: float, gen: torch.Generator) -> torch.Tensor:
    """x_t ~ q(x_t) = N(√ᾱ·MU, ᾱ·SIGMA² + 1 − ᾱ) exactly (removes the N(0, I) prior mismatch)."""
    return math.sqrt(alpha_bar) * MU + math.sqrt(alpha_bar * SIGMA**2 + 1 - alpha_bar) * torch.randn(
        (N, *SHAPE), generator=gen)


def assert_moments(x: torch.Tensor, mean: float, std: float):
    count = x.numel()
    assert abs(x.mean().item() - mean) < 5 * std / math.sqrt(count), (x.mean().item(), mean)
    assert abs(x.std().item() / std - 1) < 5 / math.sqrt(2 * count), (x.std().item(), std)


def ddim_chain_std(alpha_bars, eta: float) -> float:
    """Exact output std of DDIM on Gaussian data started from the exact marginal: every step is affine in
    x_t (x̂_0 − MU = k·z, ε̂ = e·z for the centred z), so the variance propagates in closed form."""
    a = [1.0] + [float(v) for v in alpha_bars]
    var = a[-1] * SIGMA**2 + 1 - a[-1]
    for i in range(len(a) - 1, 0, -1):
        at, ap = a[i], a[i - 1]
        k = math.sqrt(at) * SIGMA**2 / (at * SIGMA**2 + 1 - at)
        e = (1 - math.sqrt(at) * k) / math.sqrt(1 - at)
        sigma2 = eta**2 * (1 - ap) / (1 - at) * (1 - at / ap)
        c = math.sqrt(ap) * k + math.sqrt(1 - ap - sigma2) * e
        var = c**2 * var + sigma2
    return math.sqrt(var)


# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule,var_type", [("linear", "fixed_small"), ("cosine", "learned_range")])
def test_ancestral_1000_steps_known_answer(schedule, var_type):
    d = GaussianDiffusion(make_betas(schedule, 1000), var_type)
    oracle = GaussianOracle(d, learned=var_type == "learned_range")
    x = sample_ddpm(oracle, d, (N, *SHAPE), clip_denoised=False, generator=torch.Generator().manual_seed(0))
    assert len(oracle.calls) == 1000
    assert_moments(x, MU, SIGMA)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_respaced_50_known_answer(schedule):
    d = GaussianDiffusion(make_betas(schedule, 1000), "learned_range").respace("50")
    oracle = GaussianOracle(d, learned=True)
    gen = torch.Generator().manual_seed(1)
    x = sample_ddpm(oracle, d, x_T=marginal_sample(float(d.alphas_cumprod[-1]), gen), clip_denoised=False,
                    generator=gen)
    assert_moments(x, MU, SIGMA)
    # The model saw the original-scale timesteps, from the last kept one down to 0.
    assert [int(t[0]) for t in oracle.calls] == d.timestep_map.flip(0).tolist()
    assert int(d.timestep_map[-1]) == 999


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_50_known_answer(schedule, eta):
    d = GaussianDiffusion(make_betas(schedule, 1000)).respace("ddim50")
    oracle = GaussianOracle(d)
    gen = torch.Generator().manual_seed(2)
    x = sample_ddim(oracle, d, x_T=marginal_sample(float(d.alphas_cumprod[-1]), gen), eta=eta,
                    clip_denoised=False, generator=gen)
    # DDIM is exact in the mean; its 50-step discretization shrinks the std by a known few percent.
    expected_std = ddim_chain_std(d.alphas_cumprod, eta)
    assert abs(expected_std / SIGMA - 1) < 0.12
    assert_moments(x, MU, expected_std)


def test_stop_at_index_returns_the_right_noise_level():
    d = GaussianDiffusion(make_betas("cosine", 1000), "learned_range").respace("50")
    oracle = GaussianOracle(d, learned=True)
    gen = torch.Generator().manual_seed(3)
    x_T = marginal_sample(float(d.alphas_cumprod[-1]), gen)
    seen = []
    k = 20
    x = sample_ddpm(oracle, d, x_T=x_T, clip_denoised=False, stop_at_index=k, generator=gen,
                    callback=lambda info: seen.append(info))
    assert [info["t"] for info in seen] == list(range(49, k, -1))
    assert [info["step"] for info in seen] == list(range(49 - k))
    assert set(seen[0]) == {"step", "t", "x", "pred_xstart"} and seen[-1]["x"] is x
    alpha_bar = float(d.alphas_cumprod[k])
    assert_moments(x, math.sqrt(alpha_bar) * MU, math.sqrt(alpha_bar * SIGMA**2 + 1 - alpha_bar))
    x_ddim = sample_ddim(oracle, d, x_T=x_T, eta=0.0, clip_denoised=False, stop_at_index=k)
    assert abs(x_ddim.mean().item() - math.sqrt(alpha_bar) * MU) < 0.02
    # Stopping at the last index returns x_T untouched without calling the model.
    calls = len(oracle.calls)
    assert torch.equal(sample_ddpm(oracle, d, x_T=x_T, stop_at_index=49), x_T) and len(oracle.calls) == calls
    for bad in (-1, 50):
        with pytest.raises(ValueError, match="stop_at_index"):
            sample_ddpm(oracle, d, x_T=x_T, stop_at_index=bad)


def test_seeded_sampling_is_reproducible_and_runs_without_grad():
    net = nn.Conv2d(3, 6, 3, padding=1)
    d = GaussianDiffusion(make_betas("cosine", 20), "learned_range").respace("5")

    def model(x, t, y=None):
        return net(x) * 0.1

    def draw(sampler, seed, **kw):
        return sampler(model, d, (2, 3, 4, 4), generator=torch.Generator().manual_seed(seed), **kw)

    for sampler, kw in ((sample_ddpm, {}), (sample_ddim, {"eta": 1.0}), (sample_ddim, {})):
        a, b = draw(sampler, 7, **kw), draw(sampler, 7, **kw)
        assert torch.equal(a, b) and not a.requires_grad and a.shape == (2, 3, 4, 4)
        assert not torch.equal(a, draw(sampler, 8, **kw))
    x = sample_ddpm(model, d, (2, 3, 4, 4), dynamic_threshold=0.9, progress=True)
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(model, d, (2, 3, 4, 4), eta=-0.5)
    with pytest.raises(ValueError, match="shape or x_T"):
        sample_ddpm(model, d)
    with pytest.raises(ValueError, match="disagrees"):
        sample_ddpm(model, d, (1, 3, 4, 4), x_T=torch.zeros(2, 3, 4, 4))


@pytest.mark.parametrize("sampler,kw", [(sample_ddpm, {}), (sample_ddim, {"eta": 1.0})])
def test_one_generator_per_sample_makes_samples_independent_of_the_batch(sampler, kw):
    d = GaussianDiffusion(make_betas("cosine", 20), "learned_range").respace("5")

    def model(x, t, y=None):  # per-sample: a sample's output depends on that sample alone
        return torch.cat([0.3 * x, torch.tanh(x)], dim=1)

    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    together = sampler(model, d, (3, 3, 4, 4), generator=gens([10, 11, 12]), **kw)
    alone = torch.cat([sampler(model, d, (1, 3, 4, 4), generator=gens([s]), **kw) for s in (10, 11, 12)])
    assert torch.equal(together, alone)
    reordered = sampler(model, d, (2, 3, 4, 4), generator=gens([12, 10]), **kw)
    assert torch.equal(reordered, together[[2, 0]])
    with pytest.raises(ValueError, match="got 2 generators for a batch of 3: give one per sample"):
        sampler(model, d, (3, 3, 4, 4), generator=gens([1, 2]), **kw)
    with pytest.raises(ValueError, match="generator must be a torch.Generator or a sequence"):
        sampler(model, d, (1, 3, 4, 4), generator=[3], **kw)


class ToyConditionalModel(nn.Module):
    """ε = x·(1 + y) + x_low-dependent shift, v = y (learned-variance layout); records its calls."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y=None, x_low=None, aug_level=None):
        self.calls.append({"x": x, "t": t, "y": y, "x_low": x_low, "aug_level": aug_level})
        scale = (1 + y.float()).view(-1, 1, 1, 1)
        eps = x * scale + x_low.mean() + aug_level.view(-1, 1, 1, 1)
        return torch.cat([eps, torch.ones_like(x) * y.float().view(-1, 1, 1, 1)], dim=1)


def test_classifier_free_guidance():
    model = ToyConditionalModel()
    x = torch.randn(3, 3, 4, 4)
    t = torch.tensor([5, 6, 7])
    kwargs = {"y": torch.tensor([0, 1, 2]), "x_low": torch.randn(3, 3, 2, 2), "aug_level": torch.rand(3)}
    conditional = model(x, t, **kwargs)
    null = dict(kwargs, y=torch.full((3,), 10))
    unconditional = model(x, t, **null)
    model.calls.clear()

    guided = classifier_free_guidance(model, 0.0, null_class=10)
    torch.testing.assert_close(guided(x, t, **kwargs), conditional)  # w = 0: the conditional prediction
    assert len(model.calls) == 1, "both halves in one batched forward pass"
    call = model.calls[0]
    assert call["x"].shape[0] == 6 and call["y"].tolist() == [0, 1, 2, 10, 10, 10]
    assert torch.equal(call["x_low"], torch.cat([kwargs["x_low"]] * 2))
    assert torch.equal(call["t"], torch.cat([t, t]))

    out = classifier_free_guidance(model, 2.0, null_class=10)(x, t, **kwargs)
    torch.testing.assert_close(out[:, :3], 3.0 * conditional[:, :3] - 2.0 * unconditional[:, :3])  # eq. 17
    torch.testing.assert_close(out[:, 3:], conditional[:, 3:])  # the conditional variance is kept
    with pytest.raises(ValueError, match="w"):
        classifier_free_guidance(model, -1.0, null_class=10)
    # Works inside a sampler and with y=None (all-null).
    d = GaussianDiffusion(make_betas("cosine", 10), "learned_range")
    sample = sample_ddpm(classifier_free_guidance(model, 1.5, 10), d, (3, 3, 4, 4),
                         model_kwargs=kwargs, generator=torch.Generator().manual_seed(0))
    assert sample.shape == (3, 3, 4, 4)
    eps_only = classifier_free_guidance(lambda x, t, y=None: x * 0.5, 1.0, 10)
    torch.testing.assert_close(eps_only(x, t, y=None), x * 0.5)


def test_classifier_guidance_moves_mean_along_gradient():
    torch.manual_seed(0)
    base = GaussianDiffusion(make_betas("cosine", 100))
    d = base.respace("10")
    classes, dims = 4, 3 * 4 * 4
    weight = torch.randn(classes, dims)

    def classifier(x, t):
        return x.flatten(1) @ weight.T

    def model(x, t, y=None):
        return x * 0.3

    x = torch.randn(2, 3, 4, 4)
    y = torch.tensor([1, 3])
    index = torch.tensor([4, 7])
    t = d.model_timesteps(index)
    scale = 2.0
    guided = classifier_guidance(model, classifier, d.original_alphas_cumprod, scale)
    with torch.no_grad():  # the wrapper takes its own gradients even under no_grad
        eps_guided = guided(x, t, y=y)
    probs = torch.softmax(classifier(x, t), dim=-1)
    grad = (weight[y] - probs @ weight).view_as(x)  # ∇_x log softmax(Wx)_y
    alpha_bar = base.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(eps_guided, model(x, t) - (1 - alpha_bar).sqrt() * scale * grad)  # eq. 16
    mean = d.p_mean_variance(model(x, t), x, index, clip_denoised=False)["mean"]
    mean_guided = d.p_mean_variance(eps_guided, x, index, clip_denoised=False)["mean"]
    shift = (mean_guided - mean).flatten(1)
    cosine = nn.functional.cosine_similarity(shift, grad.flatten(1), dim=1)
    assert torch.all(cosine > 0.999)
    # μ̃ is linear in ε: Δμ = coef1·√(1/ᾱ − 1)·√(1 − ᾱ)·s·∇ log f.
    gain = (d.posterior_mean_coef1[index] * d.sqrt_recipm1_alphas_cumprod[index]).float().view(-1, 1, 1, 1)
    torch.testing.assert_close(mean_guided - mean, gain * (1 - alpha_bar).sqrt() * scale * grad)
    with pytest.raises(ValueError, match="y"):
        guided(x, t)
    with pytest.raises(ValueError, match="scale"):
        classifier_guidance(model, classifier, base.alphas_cumprod, -1.0)
    sample = sample_ddim(guided, d, (2, 3, 4, 4), model_kwargs={"y": y}, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(sample).all()


# ---------------------------------------------------------------------------------------------------
# Probability-flow ODE samplers: known answers with the exact denoiser for Gaussian data


class GaussianDenoiser(nn.Module):
    """The exact E[x_0 | x_t] for x_0 ~ N(MU, SIGMA²I), returned as ε, v or x_0 (`prediction`) in float64."""

    def __init__(self, diffusion: GaussianDiffusion, prediction: str = "eps"):
        super().__init__()
        self.d, self.prediction = diffusion, prediction
        self.index, self.calls = _respaced_index(diffusion), []

    def forward(self, x, t, **kwargs):
        self.calls.append(t.clone())
        i = self.index[t.long()]
        assert bool((i >= 0).all()), "model called with a timestep outside the respaced set"
        a = self.d.alphas_cumprod[i].view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        ex0 = MU + a.sqrt() * SIGMA**2 / (a * SIGMA**2 + 1 - a) * (x - a.sqrt() * MU)  # E[x_0 | x_t]
        return prediction_from_xstart_eps(ex0, eps_from_xstart(x, ex0, a), a, self.prediction)


def ode_solution(x_T: torch.Tensor, alpha_bar_T: float, alpha_bar: float | None) -> torch.Tensor:
    """The probability-flow ODE carried from level ᾱ_T to ᾱ, exactly: for Gaussian data the flow is affine and
    increasing, so it keeps the standardized value (x − √ᾱ·MU)/√(ᾱ·SIGMA² + 1 − ᾱ). alpha_bar=None: clean."""
    z = (x_T - math.sqrt(alpha_bar_T) * MU) / math.sqrt(alpha_bar_T * SIGMA**2 + 1 - alpha_bar_T)
    if alpha_bar is None:
        return MU + SIGMA * z
    return math.sqrt(alpha_bar) * MU + math.sqrt(alpha_bar * SIGMA**2 + 1 - alpha_bar) * z


def exact_sample(d: GaussianDiffusion, x_T: torch.Tensor) -> torch.Tensor:
    """What every sampler here converges to: the ODE from the top level to level 0, then x̂_0 there (the
    final step to σ = 0 of DDIM, DPM-Solver++ and Heun alike)."""
    a0 = float(d.alphas_cumprod[0])
    x = ode_solution(x_T, float(d.alphas_cumprod[-1]), a0)
    return MU + math.sqrt(a0) * SIGMA**2 / (a0 * SIGMA**2 + 1 - a0) * (x - math.sqrt(a0) * MU)


def lambda_uniform_diffusion(levels: int, lam_min: float = -5.0, lam_max: float = 5.0) -> GaussianDiffusion:
    """A diffusion whose levels are evenly spaced in λ = log(√ᾱ/√(1−ᾱ)): a smooth step-size sequence on
    which each solver shows its asymptotic order."""
    lam = torch.linspace(lam_max, lam_min, levels, dtype=torch.float64)
    alpha_bar = torch.sigmoid(2 * lam)  # ᾱ = α²/(α² + σ²) with λ = log(α/σ)
    return GaussianDiffusion(1 - alpha_bar / torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]]))


X_T = torch.linspace(-3, 3, 64, dtype=torch.float64).view(16, 1, 2, 2)
ODE_SAMPLERS = {"ddim": (sample_ddim, 1), "dpmpp2m": (sample_dpmpp2m, 2), "heun": (sample_heun, 2)}


@pytest.mark.parametrize("name", ODE_SAMPLERS)
def test_ode_samplers_converge_at_their_order(name):
    sampler, order = ODE_SAMPLERS[name]
    errors = []
    for levels in (40, 80, 160):
        d = lambda_uniform_diffusion(levels)
        x = sampler(GaussianDenoiser(d), d, x_T=X_T, clip_denoised=False)
        errors.append((x - exact_sample(d, X_T)).abs().max().item())
    ratios = [errors[i] / errors[i + 1] for i in range(len(errors) - 1)]
    # doubling the steps divides the error by 2^order (≈2 for DDIM, ≈4 for the second-order solvers)
    assert all(abs(r / 2**order - 1) < 0.15 for r in ratios), (errors, ratios)
    assert errors[-1] < (0.03 if order == 1 else 1e-3), errors


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_second_order_samplers_beat_ddim_on_respaced_steps(schedule, prediction):
    """On the evenly respaced steps the pipeline uses (and whatever the model predicts), DPM-Solver++(2M)
    and Heun land far closer to the exact answer than DDIM with the same steps. (Their error need not
    fall monotonically here: errors of both signs from the uneven λ steps partly cancel at 25 steps.)"""
    errors = {}
    for steps in ("25", "50"):
        d = GaussianDiffusion(make_betas(schedule, 1000), prediction=prediction).respace(steps)
        exact = exact_sample(d, X_T)
        for name, (sampler, _) in ODE_SAMPLERS.items():
            x = sampler(GaussianDenoiser(d, prediction), d, x_T=X_T, clip_denoised=False)
            errors[name, steps] = (x - exact).abs().max().item()
    for steps in ("25", "50"):
        assert errors["dpmpp2m", steps] < errors["ddim", steps] / 4, errors
        assert errors["heun", steps] < errors["ddim", steps] / 4, errors
    assert errors["heun", "50"] < 0.01 and errors["dpmpp2m", "50"] < 0.01 < errors["ddim", "50"], errors


@pytest.mark.parametrize("sampler", [sample_dpmpp2m, sample_heun])
def test_ode_samplers_truncate_at_the_right_level(sampler):
    d = GaussianDiffusion(make_betas("cosine", 1000), prediction="v").respace("50")
    model = GaussianDenoiser(d, "v")
    seen = []
    k = 20
    x = sampler(model, d, x_T=X_T, clip_denoised=False, stop_at_index=k, callback=seen.append)
    assert [info["t"] for info in seen] == list(range(49, k, -1)) and seen[-1]["x"] is x
    assert set(seen[0]) == {"step", "t", "x", "pred_xstart"}
    exact = ode_solution(X_T, float(d.alphas_cumprod[-1]), float(d.alphas_cumprod[k]))
    assert (x - exact).abs().max().item() < 2e-3
    # the model saw the kept timesteps above level k on the training scale (Heun's last correction also
    # level k itself); stopping at the top returns x_T untouched
    first = k if sampler is sample_heun else k + 1
    assert {int(t[0]) for t in model.calls} == set(d.timestep_map[first:].tolist())
    calls = len(model.calls)
    assert torch.equal(sampler(model, d, x_T=X_T, stop_at_index=49), X_T) and len(model.calls) == calls
    for bad in (-1, 50):
        with pytest.raises(ValueError, match="stop_at_index"):
            sampler(model, d, x_T=X_T, stop_at_index=bad)


def test_every_pipeline_sampler_can_truncate():
    from cascade.diffusion.samplers import SAMPLERS

    assert {"ddpm", "ddim", "dpmpp2m", "heun"} <= set(SAMPLERS)
    d = GaussianDiffusion(make_betas("cosine", 100), "learned_range").respace("10")
    model = GaussianOracle(d, learned=True)
    gen = torch.Generator().manual_seed(4)
    x_T = marginal_sample(float(d.alphas_cumprod[-1]), gen)[:64]
    for name, sampler in SAMPLERS.items():
        seen = []
        x = sampler(model, d, x_T=x_T, stop_at_index=3, clip_denoised=False, generator=gen, callback=seen.append)
        assert [info["t"] for info in seen] == [9, 8, 7, 6, 5, 4], name
        assert x.shape == x_T.shape and torch.isfinite(x).all(), name


def test_ode_samplers_with_classifier_free_guidance_and_seeds():
    model = ToyConditionalModel()
    d = GaussianDiffusion(make_betas("cosine", 20), "learned_range").respace("6")
    kwargs = {"y": torch.tensor([0, 1]), "x_low": torch.randn(2, 3, 2, 2), "aug_level": torch.rand(2)}
    for sampler in (sample_dpmpp2m, sample_heun):
        guided = classifier_free_guidance(model, 1.5, null_class=10)
        a = sampler(guided, d, (2, 3, 4, 4), model_kwargs=kwargs, generator=torch.Generator().manual_seed(3))
        b = sampler(guided, d, (2, 3, 4, 4), model_kwargs=kwargs, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b) and torch.isfinite(a).all() and not a.requires_grad
        model.calls.clear()
        # w = 0 gives the conditional model's sample; the guided one differs
        plain = sampler(model, d, (2, 3, 4, 4), model_kwargs=kwargs, generator=torch.Generator().manual_seed(3))
        unguided = sampler(classifier_free_guidance(model, 0.0, null_class=10), d, (2, 3, 4, 4),
                           model_kwargs=kwargs, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(unguided, plain)
        assert not torch.allclose(a, plain)
    with pytest.raises(ValueError, match="got 2 generators for a batch of 3"):
        sample_heun(model, d, (3, 3, 4, 4), generator=[torch.Generator(), torch.Generator()])


# ---------------------------------------------------------------------------------------------------
# Guidance interval and guidance for every prediction type


def test_guidance_interval_edges():
    model = ToyConditionalModel()
    x = torch.randn(4, 3, 4, 4)
    kwargs = {"y": torch.tensor([0, 1, 2, 3]), "x_low": torch.randn(4, 3, 2, 2), "aug_level": torch.rand(4)}
    t = torch.tensor([100, 199, 200, 400])
    full = classifier_free_guidance(model, 2.0, null_class=10)(x, t, **kwargs)
    conditional = model(x, t, **kwargs)
    # inside [t_lo, t_hi] (both ends included): guided; outside: the conditional prediction
    inside = classifier_free_guidance(model, 2.0, 10, interval=(199, 400), num_timesteps=1000)(x, t, **kwargs)
    torch.testing.assert_close(inside[0], conditional[0])
    torch.testing.assert_close(inside[1:], full[1:])
    torch.testing.assert_close(inside[:, 3:], conditional[:, 3:])  # variance channels: the conditional ones
    everywhere = classifier_free_guidance(model, 2.0, 10, interval=(0, 999), num_timesteps=1000)(x, t, **kwargs)
    torch.testing.assert_close(everywhere, full)
    point = classifier_free_guidance(model, 2.0, 10, interval=(200, 200), num_timesteps=1000)(x, t, **kwargs)
    torch.testing.assert_close(point[2], full[2])
    torch.testing.assert_close(point[[0, 1, 3]], conditional[[0, 1, 3]])
    # no sample inside: one un-doubled conditional call
    model.calls.clear()
    outside = classifier_free_guidance(model, 2.0, 10, interval=(500, 999), num_timesteps=1000)
    torch.testing.assert_close(outside(x, t, **kwargs), conditional)
    assert len(model.calls) == 1 and model.calls[0]["x"].shape[0] == 4
    # in a sampler, guidance switches on and off with t
    d = GaussianDiffusion(make_betas("cosine", 20), "learned_range").respace("5")
    model.calls.clear()
    sample_ddim(classifier_free_guidance(model, 1.0, 10, interval=(5, 14), num_timesteps=20), d, (2, 3, 4, 4),
                model_kwargs={k: v[:2] for k, v in kwargs.items()}, generator=torch.Generator().manual_seed(0))
    doubled = {int(c["t"][0]): c["x"].shape[0] == 4 for c in model.calls}
    assert doubled == {int(t): 5 <= int(t) <= 14 for t in d.timestep_map}, doubled
    for bad, message in (((300, 200), "t_lo <= t_hi"), ((-1, 10), "0 <= t_lo"), ((0, 1000), "< T = 1000"),
                         ((5,), "a pair"), ("ab", "a pair"), ((0, float("nan")), "0 <= t_lo")):
        with pytest.raises(ValueError, match=message) as info:
            classifier_free_guidance(model, 1.0, 10, interval=bad, num_timesteps=1000)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="needs num_timesteps"):
        classifier_free_guidance(model, 1.0, 10, interval=(0, 10))


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_guidance_is_the_same_in_every_output_space(prediction):
    """Classifier-free guidance combines outputs linearly, classifier guidance shifts ε̂: in v or x_0 space
    both must imply exactly the ε̂ the ε-space guidance gives."""
    base = GaussianDiffusion(make_betas("cosine", 100))
    torch.manual_seed(0)
    weight = torch.randn(4, 3 * 4 * 4, dtype=torch.float64)
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([10, 50, 90])
    y = torch.tensor([0, 2, 3])
    ab = base.alphas_cumprod[t].view(-1, 1, 1, 1)

    def eps_model(x, t, y=None):  # a class-dependent ε, as ε, v or x_0 below
        shift = torch.zeros(x.shape[0], dtype=x.dtype) if y is None else y.to(x.dtype)
        return 0.5 * x + 0.1 * shift.view(-1, 1, 1, 1)

    def in_space(x, t, y=None):
        a = base.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = eps_model(x, t, y)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return prediction_from_xstart_eps(x0, eps, a, prediction)

    cfg_eps = classifier_free_guidance(eps_model, 3.0, null_class=4)(x, t, y=y)
    cfg_other = classifier_free_guidance(in_space, 3.0, null_class=4)(x, t, y=y)
    torch.testing.assert_close(prediction_to_xstart_eps(cfg_other, x, ab, prediction)[1], cfg_eps)

    def classifier(x, t):
        return x.flatten(1) @ weight.T

    cg_eps = classifier_guidance(eps_model, classifier, base.alphas_cumprod, 2.0)(x, t, y=y)
    cg_other = classifier_guidance(in_space, classifier, base.alphas_cumprod, 2.0, prediction)(x, t, y=y)
    torch.testing.assert_close(prediction_to_xstart_eps(cg_other, x, ab, prediction)[1], cg_eps)
    assert not torch.allclose(cg_eps, eps_model(x, t, y))
    with pytest.raises(ValueError, match="unknown prediction type"):
        classifier_guidance(eps_model, classifier, base.alphas_cumprod, 2.0, "score")


# ---------------------------------------------------------------------------------------------------
# A checkpoint remembers its prediction type


def test_checkpoint_trained_with_v_prediction_samples_from_the_checkpoint_alone(tmp_path, synthetic_shards):
    from conftest import SHARD_CLASSES, tiny_run_config

    import stages
    from cascade.checkpoint import latest_checkpoint, load_stage
    from cascade.training.trainer import train_stage

    small = {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [],
             "norm_groups": 4, "head_channels": 8}
    stage = stages.get_stage("base32", "tiny", num_classes=SHARD_CLASSES).with_overrides(
        {"unet": small, "diffusion": {"prediction": "v", "loss_weighting": "min_snr", "min_snr_gamma": 5.0,
                                      "model_var_type": "fixed_small", "loss": "simple", "num_timesteps": 50}})
    train_stage(stage, tiny_run_config(tmp_path / "run", synthetic_shards, max_steps=2, ckpt_every=2))
    cfg, model, diffusion = load_stage(latest_checkpoint(tmp_path / "run"))
    assert cfg.diffusion.prediction == "v"
    assert (diffusion.prediction, diffusion.loss_weighting, diffusion.min_snr_gamma) == ("v", "min_snr", 5.0)
    respaced = diffusion.respace("5")
    assert respaced.prediction == "v"
    y = torch.arange(2) % SHARD_CLASSES
    x_T = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = sample_dpmpp2m(model, respaced, x_T=x_T, model_kwargs={"y": y})
    # the sample is the v-interpretation of the network: one more step by hand agrees with the sampler's x̂_0
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all() and x.abs().max() <= 1
    with torch.no_grad():
        t = torch.zeros(2, dtype=torch.long)
        out = model(x_T, respaced.model_timesteps(t + 4), y=y)
    a = respaced.alphas_cumprod[4].float()
    x0_v = (a.sqrt() * x_T - (1 - a).sqrt() * out).clamp(-1, 1)
    first = []
    sample_dpmpp2m(model, respaced, x_T=x_T, model_kwargs={"y": y}, callback=first.append)
    torch.testing.assert_close(first[0]["pred_xstart"], x0_v)


def test_samplers_and_guidance_are_exported_by_the_package():
    import cascade
    import cascade.diffusion
    from cascade.diffusion import guidance, samplers

    for package in (cascade, cascade.diffusion):
        assert package.classifier_free_guidance is guidance.classifier_free_guidance
        assert package.classifier_guidance is guidance.classifier_guidance
        assert package.sample_ddim is samplers.sample_ddim and package.sample_ddpm is samplers.sample_ddpm
    assert set(cascade.diffusion.SAMPLERS) == {"ddpm", "ddim", "dpmpp2m", "heun", "consistency"}

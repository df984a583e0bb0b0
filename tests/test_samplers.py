"""Tests of the samplers (known answers for Gaussian data) and the guidance wrappers."""

import math

import pytest
import torch
from torch import nn

from cascade.diffusion import GaussianDiffusion
from cascade.samplers import classifier_free_guidance, classifier_guidance, sample_ddim, sample_ddpm

MU, SIGMA = 0.3, 0.5
N, SHAPE = 4000, (1, 2, 2)  # 16000 independent scalars per run


pytestmark = pytest.mark.usefixtures("one_thread")


class GaussianOracle(nn.Module):
    """Exact reverse process for data x_0 ~ N(MU, SIGMA²I): the optimal ε and (learned_range) the v that
    gives the true variance of q(x_{t−1}|x_t). Called with original-scale timesteps."""

    def __init__(self, diffusion: GaussianDiffusion, learned: bool = False):
        super().__init__()
        self.d, self.learned = diffusion, learned
        self.index = torch.full((int(diffusion.timestep_map.max()) + 1,), -1, dtype=torch.long)
        self.index[diffusion.timestep_map] = torch.arange(diffusion.num_timesteps)
        self.calls = []

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
    d = GaussianDiffusion.from_config(schedule, 1000, var_type)
    oracle = GaussianOracle(d, learned=var_type == "learned_range")
    x = sample_ddpm(oracle, d, (N, *SHAPE), clip_denoised=False, generator=torch.Generator().manual_seed(0))
    assert len(oracle.calls) == 1000
    assert_moments(x, MU, SIGMA)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_respaced_50_known_answer(schedule):
    d = GaussianDiffusion.from_config(schedule, 1000, "learned_range").respace("50")
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
    d = GaussianDiffusion.from_config(schedule, 1000).respace("ddim50")
    oracle = GaussianOracle(d)
    gen = torch.Generator().manual_seed(2)
    x = sample_ddim(oracle, d, x_T=marginal_sample(float(d.alphas_cumprod[-1]), gen), eta=eta,
                    clip_denoised=False, generator=gen)
    # DDIM is exact in the mean; its 50-step discretization shrinks the std by a known few percent.
    expected_std = ddim_chain_std(d.alphas_cumprod, eta)
    assert abs(expected_std / SIGMA - 1) < 0.12
    assert_moments(x, MU, expected_std)


def test_stop_at_index_returns_the_right_noise_level():
    d = GaussianDiffusion.from_config("cosine", 1000, "learned_range").respace("50")
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
    d = GaussianDiffusion.from_config("cosine", 20, "learned_range").respace("5")

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
    d = GaussianDiffusion.from_config("cosine", 20, "learned_range").respace("5")

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
    d = GaussianDiffusion.from_config("cosine", 10, "learned_range")
    sample = sample_ddpm(classifier_free_guidance(model, 1.5, 10), d, (3, 3, 4, 4),
                         model_kwargs=kwargs, generator=torch.Generator().manual_seed(0))
    assert sample.shape == (3, 3, 4, 4)
    eps_only = classifier_free_guidance(lambda x, t, y=None: x * 0.5, 1.0, 10)
    torch.testing.assert_close(eps_only(x, t, y=None), x * 0.5)


def test_classifier_guidance_moves_mean_along_gradient():
    torch.manual_seed(0)
    base = GaussianDiffusion.from_config("cosine", 100)
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

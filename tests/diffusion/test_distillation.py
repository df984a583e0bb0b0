"""The distillation mathematics (cascade.diffusion.distillation) and the consistency sampler, on stub models."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from cascade.config import DistillSpec, SamplingSettings
from cascade.diffusion.distillation import (
    consistency_distillation_loss,
    distillation_grid,
    distillation_timesteps,
    guidance_distillation_loss,
    guided_output,
    pseudo_huber,
    step_distillation_loss,
)
from cascade.diffusion.gaussian import GaussianDiffusion
from cascade.diffusion.samplers import sample_consistency
from cascade.diffusion.schedules import make_betas

NULL = 3  # the stubs' null class


def _diffusion(prediction: str = "eps", T: int = 1000) -> GaussianDiffusion:
    return GaussianDiffusion(make_betas("cosine", T), model_var_type="fixed_small", loss_type="simple",
                             prediction=prediction)


def _teacher(x, t, y=None, **kwargs):
    """A stub network: an output that depends on x, t and the class (the null class differs from the others)."""
    scale = (1 + t.float() / 1000).view(-1, 1, 1, 1)
    shift = (y.float() - 1.5).view(-1, 1, 1, 1)
    return 0.3 * x * scale + 0.2 * shift + 0.01 * x.pow(2)


def test_guidance_distillation_loss_is_zero_for_the_guided_teacher_and_positive_otherwise():
    diffusion = _diffusion("v")
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1
    t = torch.tensor([0, 10, 500, 999])
    w = torch.tensor([0.0, 0.5, 1.0, 3.0])
    noise = torch.randn(4, 3, 8, 8, generator=gen)
    y = torch.tensor([0, 1, 2, 1])

    def wrapped(x, t, w, y, **kwargs):  # the teacher wrapped: classifier-free guidance with w as an input
        return guided_output(_teacher(x, t, y), _teacher(x, t, torch.full_like(y, NULL)), w, 3)

    zero = guidance_distillation_loss(wrapped, _teacher, diffusion, x0, t, w, noise, null_class=NULL,
                                      model_kwargs={"y": y})
    assert zero.shape == (4,) and torch.equal(zero, torch.zeros(4))

    def unguided(x, t, w, y, **kwargs):  # ignores w: exact only where w = 0
        return _teacher(x, t, y)

    loss = guidance_distillation_loss(unguided, _teacher, diffusion, x0, t, w, noise, null_class=NULL,
                                      model_kwargs={"y": y})
    assert loss[0] == 0 and bool((loss[1:] > 0).all())


def test_guided_output_is_classifier_free_guidance_and_keeps_variance_channels():
    cond, uncond = torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 4)
    w = torch.tensor([0.0, 2.0])
    out = guided_output(cond, uncond, w, 3)
    torch.testing.assert_close(out[0, :3], cond[0, :3])
    torch.testing.assert_close(out[1, :3], 3 * cond[1, :3] - 2 * uncond[1, :3])  # (1 + w)·c − w·u
    torch.testing.assert_close(out[:, 3:], cond[:, 3:])


def test_consistency_distillation_loss_against_its_formula():
    diffusion = _diffusion("eps")
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 3, 4, 4, generator=gen) * 2 - 1
    noise = torch.randn(3, 3, 4, 4, generator=gen)
    y = torch.tensor([0, 1, 2])
    w = torch.tensor([0.0, 1.0, 2.5])
    t_next, t_prev = torch.tensor([999, 400, 62]), torch.tensor([937, 337, 0])

    def student(x, t, w, y, **kwargs):
        return 0.5 * _teacher(x, t, y) + 0.1 * w.view(-1, 1, 1, 1) * x

    got = consistency_distillation_loss(student, _teacher, diffusion, x0, t_next, t_prev, w, noise, null_class=NULL,
                                        model_kwargs={"y": y})
    ab = diffusion.alphas_cumprod.float()
    a_n, a_p = ab[t_next].view(-1, 1, 1, 1), ab[t_prev].view(-1, 1, 1, 1)
    x_t = a_n.sqrt() * x0 + (1 - a_n).sqrt() * noise  # slides eq. 2
    eps = (1 + w.view(-1, 1, 1, 1)) * _teacher(x_t, t_next, y) - w.view(-1, 1, 1, 1) * _teacher(
        x_t, t_next, torch.full_like(y, NULL))
    x0_hat = (x_t - (1 - a_n).sqrt() * eps) / a_n.sqrt()
    x_prev = a_p.sqrt() * x0_hat + (1 - a_p).sqrt() * eps  # DDIM, η = 0

    def f(x, t, a):
        return (x - (1 - a).sqrt() * student(x, t, w, y)) / a.sqrt()

    target = f(x_prev, t_prev, a_p)
    target[2] = x_prev[2] / a_p[2].sqrt()  # t_prev = 0: the boundary f(x, τ_0) = x
    pred = f(x_t, t_next, a_n)
    c = 0.00054 * math.sqrt(3 * 4 * 4)
    want = torch.sqrt((pred - target).pow(2).flatten(1).sum(1) + c * c) - c
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_step_distillation_loss_against_its_formula():
    """Two teacher DDIM steps (one ending on clean data) against the single-step target of Salimans & Ho eq. 8."""
    diffusion = _diffusion("v")
    gen = torch.Generator().manual_seed(5)
    x0 = torch.rand(2, 3, 4, 4, generator=gen) * 2 - 1
    noise = torch.randn(2, 3, 4, 4, generator=gen)
    y, w = torch.tensor([0, 2]), torch.tensor([0.5, 2.0])
    path = torch.tensor([[999, 749, 500], [250, 125, -1]])

    def student(x, t, w, y, **kwargs):
        return 0.7 * _teacher(x, t, y) - 0.05 * w.view(-1, 1, 1, 1)

    got = step_distillation_loss(student, _teacher, diffusion, x0, path, w, noise, null_class=NULL,
                                 model_kwargs={"y": y}, clip_denoised=False)
    ab_table = diffusion.alphas_cumprod.float()

    def ab(t):
        return torch.stack([torch.tensor(1.0) if int(v) < 0 else ab_table[int(v)] for v in t]).view(-1, 1, 1, 1)

    def xstart_eps(x, t, out):  # v-prediction: x̂ = α·x − σ·v, ε̂ = σ·x + α·v
        a, s = ab(t).sqrt(), (1 - ab(t)).sqrt()
        return a * x - s * out, s * x + a * out

    x_t = ab(path[:, 0]).sqrt() * x0 + (1 - ab(path[:, 0])).sqrt() * noise
    x = x_t
    for j in range(2):
        t = path[:, j]
        out = (1 + w.view(-1, 1, 1, 1)) * _teacher(x, t, y) - w.view(-1, 1, 1, 1) * _teacher(x, t, torch.full_like(y, NULL))
        xs, eps = xstart_eps(x, t, out)
        x = ab(path[:, j + 1]).sqrt() * xs + (1 - ab(path[:, j + 1])).sqrt() * eps
    a_t, a_e = ab(path[:, 0]), ab(path[:, 2])
    ratio = ((1 - a_e) / (1 - a_t)).sqrt()
    target = (x - ratio * x_t) / (a_e.sqrt() - ratio * a_t.sqrt())
    torch.testing.assert_close(target[1], x[1])  # ending on clean data, the target is where the teacher lands
    pred = xstart_eps(x_t, path[:, 0], student(x_t, path[:, 0], w, y))[0]
    weight = (a_t / (1 - a_t)).clamp(min=1).flatten()
    want = weight * (pred - target).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_pseudo_huber_is_near_l2_far_away_and_quadratic_near_zero():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.zeros(2, 3, 4, 4)
    b[0] = 10.0
    b[1, 0, 0, 0] = 1e-4
    d = pseudo_huber(a, b, c=0.01)
    assert d[0] == pytest.approx(math.sqrt(48 * 100 + 1e-4) - 0.01, rel=1e-6)
    assert d[1] == pytest.approx(1e-8 / (2 * 0.01), rel=1e-2)


def test_distillation_grid_and_timesteps():
    assert distillation_grid(1000, 4) == [0, 250, 500, 749, 999]
    assert distillation_timesteps(1000, 4, 4) == [250, 500, 749, 999]
    assert distillation_timesteps(1000, 16, 1) == [999]
    assert distillation_timesteps(1000, 16, 2) == [500, 999]
    assert distillation_timesteps(1000, 16, 4) == [250, 500, 749, 999]
    for steps in range(1, 17):
        visited = distillation_timesteps(1000, 16, steps)
        assert len(visited) == steps and visited[-1] == 999 and 0 not in visited
        assert set(visited) <= set(distillation_grid(1000, 16))
    with pytest.raises(ValueError, match=r"steps must be in \[1, 16\]"):
        distillation_timesteps(1000, 16, 17)
    with pytest.raises(ValueError, match="levels must be in"):
        distillation_grid(10, 10)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_consistency_sampler_recovers_gaussian_data_with_the_exact_consistency_function(steps):
    """x_0 ~ N(μ, s²): f(x_t, t) = μ + s·(x_t − √ᾱ·μ)/√(ᾱ·s² + 1 − ᾱ) maps the marginal at t onto the data, so
    every multistep schedule returns N(μ, s²) samples (Song et al. 2023 Algorithm 1), and one step is f(x_T)."""
    base = _diffusion("x0")
    mu, s = 0.3, 0.5

    def exact(x, t, **kwargs):
        ab = base.alphas_cumprod.float()[t].view(-1, 1, 1, 1)
        return mu + s * (x - ab.sqrt() * mu) / (ab * s * s + 1 - ab).sqrt()

    respaced = base.respace(distillation_timesteps(1000, 8, steps))
    x_T = torch.randn(4096, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    out = sample_consistency(exact, respaced, x_T=x_T, clip_denoised=False,
                             generator=torch.Generator().manual_seed(4))
    assert float(out.mean()) == pytest.approx(mu, abs=0.01)
    assert float(out.std()) == pytest.approx(s, rel=0.02)
    if steps == 1:
        torch.testing.assert_close(out, exact(x_T, torch.full((4096,), 999)))


def test_consistency_sampler_stops_at_a_level_for_truncation():
    base = _diffusion("x0")
    respaced = base.respace(distillation_timesteps(1000, 8, 4))
    calls = []

    def model(x, t, **kwargs):
        calls.append(int(t[0]))
        return torch.zeros_like(x)

    out = sample_consistency(model, respaced, x_T=torch.randn(2, 3, 4, 4), stop_at_index=1,
                             generator=torch.Generator().manual_seed(0))
    assert calls == [999, 749]  # evaluations above the stop index only
    # x̂_0 = 0 re-noised to the level of index 1 (t = 500): pure noise scaled by √(1 − ᾱ)
    assert float(out.std()) == pytest.approx(math.sqrt(1 - float(base.alphas_cumprod[500])), rel=0.3)


def test_distilled_stage_settings_are_checked(tmp_path):
    import stages

    teacher = stages.get_stage("base32", "tiny")
    with pytest.raises(ValueError, match="consistency sampler needs a consistency-distilled stage"):
        dataclasses.replace(teacher.sampling, sampler="consistency", steps=4).check_for(teacher)
    student = dataclasses.replace(
        teacher, distill=DistillSpec(method="consistency", teacher=str(tmp_path), w_max=2.0, levels=8),
        sampling=SamplingSettings(sampler="consistency", steps=4, w=1.0))
    cases = [({"sampler": "ddpm", "steps": 40}, "sample it with sampler consistency"),
             ({"steps": 9}, r"trained on 8 levels; steps must be a count in \[1, 8\], got 9"),
             ({"steps": "ddim4"}, "steps must be a count"),
             ({"w": 2.5}, r"trained for w in \[0, 2\], got w=2.5"),
             ({"guidance_interval": (0, 500)}, "guidance_interval does not apply to a distilled stage")]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            dataclasses.replace(student.sampling, **changes).check_for(student)
        assert "\n" not in str(err.value)
    for bad, message in [({"method": "progressive"}, "distill.method"), ({"method": "guidance"}, "teacher"),
                         ({"method": "consistency", "teacher": "x", "w_max": 1.0}, "levels must be >= 1"),
                         ({"teacher": "x"}, "with method none")]:
        with pytest.raises(ValueError, match=message):
            DistillSpec(**bad)

"""EDM's log-normal noise-level sampler and EDM2's inverse-square-root learning-rate decay: the distribution the
sampler draws, its unit weights and state, the schedule's closed form and its exact resume, and a short run with
both options (and magnitude-preserving layers) that resumes from its checkpoint."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import SHARD_CLASSES, tiny_run_config

from cascade.config import DiffusionConfig
from cascade.diffusion.gaussian import GaussianDiffusion
from cascade.diffusion.schedules import make_betas
from cascade.training.losses import sample_timesteps
from cascade.training.optimizer import lr_factor, make_lr_schedule
from cascade.training.timestep_sampler import LogNormalSampler, make_timestep_sampler, stage_timestep_sampler
from cascade.training.trainer_config import TrainerConfig


def _total_variation(counts: np.ndarray, p: np.ndarray) -> float:
    return 0.5 * float(np.abs(counts / counts.sum() - p).sum())


def test_lognormal_sampler_draws_the_log_normal_mass_of_each_timestep():
    diffusion = GaussianDiffusion(make_betas("cosine", 200))
    sampler = make_timestep_sampler("lognormal", 200, alphas_cumprod=diffusion.alphas_cumprod, p_mean=-1.2,
                                    p_std=1.2)
    p = sampler.weights()
    assert isinstance(sampler, LogNormalSampler) and p.sum() == pytest.approx(1.0) and (p >= 0).all()
    # p_t against EDM's definition: ln σ ~ N(P_mean, P_std²), mapped to the t of nearest ln σ_t
    gen = torch.Generator().manual_seed(0)
    log_sigma = -1.2 + 1.2 * torch.randn(40_000, generator=gen, dtype=torch.float64)
    abar = diffusion.alphas_cumprod
    nearest = (log_sigma[:, None] - 0.5 * torch.log((1 - abar) / abar)[None]).abs().argmin(dim=1)
    assert _total_variation(np.bincount(nearest.numpy(), minlength=200), p) < 0.04
    # the sampler's own draws follow p_t, with weight 1: it changes the training distribution
    t, weights = sampler.sample(40_000, "cpu", generator=torch.Generator().manual_seed(1))
    assert _total_variation(np.bincount(t.numpy(), minlength=200), p) < 0.04
    assert torch.equal(weights, torch.ones(40_000)) and not sampler.importance_weighted
    t, weights = sample_timesteps(sampler, 16, torch.device("cpu"))  # what the diffusion losses multiply by
    assert torch.equal(weights, torch.ones(16))
    # its median: the t whose ln σ_t is nearest P_mean (its cell holds ln σ = P_mean)
    median_t = int((0.5 * torch.log((1 - abar) / abar) + 1.2).abs().argmin())
    assert p[:median_t].sum() <= 0.5 <= p[:median_t + 1].sum()


def test_lognormal_sampler_is_built_from_the_config_and_resumes():
    diffusion_cfg = DiffusionConfig(timestep_sampler="lognormal", p_mean=-0.4, p_std=1.0)
    diffusion = GaussianDiffusion(make_betas("cosine", 50))
    sampler = stage_timestep_sampler(diffusion_cfg, diffusion)
    assert (sampler.p_mean, sampler.p_std) == (-0.4, 1.0)
    resumed = stage_timestep_sampler(diffusion_cfg, diffusion)
    resumed.load_state_dict(sampler.state_dict())
    a = sampler.sample(32, "cpu", generator=torch.Generator().manual_seed(3))
    b = resumed.sample(32, "cpu", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    other = stage_timestep_sampler(dataclasses.replace(diffusion_cfg, p_std=2.0), diffusion)
    with pytest.raises(ValueError, match="p_std"):
        other.load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="alphas_cumprod"):
        make_timestep_sampler("lognormal", 50)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("p_std", -1, "diffusion.p_std must be a number in (0, 20], got -1"),
    ("p_std", 0, "diffusion.p_std must be a number in (0, 20], got 0"),
    ("p_mean", math.inf, "diffusion.p_mean must be a number in [-20, 20], got inf"),
    ("timestep_sampler", "log-normal", "diffusion.timestep_sampler must be one of"),
])
def test_bad_lognormal_settings_are_one_line_errors(key, value, message):
    with pytest.raises(ValueError) as err:
        DiffusionConfig(**{key: value})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_inv_sqrt_schedule_is_the_closed_form_and_resumes_exactly():
    cfg = TrainerConfig(lr=1e-2, warmup_steps=10, lr_schedule="inv_sqrt", lr_ref_steps=100)
    for s in (0, 4, 9, 50, 100, 101, 400, 2500):
        # α(s) = α_ref·min(1, (s + 1)/warmup)/√max(s/t_ref, 1) (EDM2 eq. 16 after the warm-up)
        assert lr_factor(s, cfg) * cfg.lr == pytest.approx(1e-2 * min(1.0, (s + 1) / 10) / math.sqrt(max(s / 100, 1)))
    assert lr_factor(400, dataclasses.replace(cfg, lr_schedule="constant")) == 1.0

    def rates(steps_taken: int, count: int) -> list[float]:
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([param], lr=cfg.lr)
        schedule = make_lr_schedule(optimizer, cfg, steps_taken)
        out = []
        for _ in range(count):
            out.append(schedule.get_last_lr()[0])
            optimizer.step()
            schedule.step()
        return out

    straight = rates(0, 300)
    assert straight[150] == pytest.approx(1e-2 / math.sqrt(1.5))
    assert rates(137, 163) == straight[137:]  # a resumed schedule is positioned by the steps taken alone


@pytest.mark.parametrize(("key", "value", "message"), [
    ("lr_schedule", "cosine", "trainer.lr_schedule must be one of constant, inv_sqrt, got 'cosine'"),
    ("lr_ref_steps", 0, "trainer.lr_ref_steps must be an integer >= 1, got 0"),
])
def test_bad_schedule_settings_are_one_line_errors(key, value, message):
    with pytest.raises(ValueError) as err:
        TrainerConfig(**{key: value})
    assert str(err.value) == message


def test_a_run_with_the_edm2_options_resumes_from_its_checkpoint(synthetic_shards, tmp_path):
    """Log-normal t, inv_sqrt decay and magnitude-preserving layers together: the checkpoint loads into the same
    network (`load_stage`) and a resumed run continues the schedule where it stopped."""
    import stages
    from cascade import checkpoint
    from cascade.nets.mp_layers import MPConv2d
    from cascade.training.timestep_sampler import LogNormalSampler
    from cascade.training.trainer import StageTrainer

    stage = stages.get_stage("base32", "tiny", num_classes=SHARD_CLASSES).with_overrides(
        {"unet": {"magnitude_preserving": True}, "diffusion": {"timestep_sampler": "lognormal"}})
    run = tiny_run_config(tmp_path / "run", synthetic_shards, max_steps=2, lr=1e-2, warmup_steps=0,
                          lr_schedule="inv_sqrt", lr_ref_steps=1)
    StageTrainer(stage, run).run()
    cfg, model, _ = checkpoint.load_stage(tmp_path / "run")
    assert cfg.unet.magnitude_preserving and isinstance(model.out_conv, MPConv2d)
    resumed = StageTrainer(stage, dataclasses.replace(run, trainer=dataclasses.replace(run.trainer, max_steps=3)))
    assert isinstance(resumed.timestep_sampler, LogNormalSampler)
    assert resumed.scheduler.get_last_lr() == pytest.approx([1e-2 / math.sqrt(2)])  # s = 2, t_ref = 1
    resumed.run()
    assert checkpoint.load_training_state(tmp_path / "run")["step"] == 3


def test_edm2_recipes_set_their_option_on_the_v_minsnr5_objective():
    import stages
    from cascade.harness.quality_recipes import DEFAULT_RECIPES, apply_recipe

    stage = stages.get_stage("base32", "tiny")
    v_minsnr5, _ = apply_recipe("v-minsnr5", stage, TrainerConfig())
    expected = {"edm2-lognormal": ("lognormal", False, "constant"), "edm2-invsqrt": ("uniform", False, "inv_sqrt"),
                "edm2-mp": ("uniform", True, "constant"), "edm2-all": ("lognormal", True, "inv_sqrt")}
    for name, (sampler, mp, schedule) in expected.items():
        assert name not in DEFAULT_RECIPES
        recipe_stage, trainer = apply_recipe(name, stage, TrainerConfig())
        got = (recipe_stage.diffusion.timestep_sampler, recipe_stage.unet.magnitude_preserving, trainer.lr_schedule)
        assert got == (sampler, mp, schedule)
        assert dataclasses.replace(recipe_stage.diffusion, timestep_sampler="uniform") == v_minsnr5.diffusion
        assert trainer.lr == (1e-2 if mp else TrainerConfig().lr)

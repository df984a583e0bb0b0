"""Stage registry, configs (round trips, overrides, errors), shapes for every stage and preset."""

import json

import pytest
import torch

import stages
from cascade.diffusion.gaussian import GaussianDiffusion


def test_registry_names_and_errors():
    assert stages.STAGE_NAMES == ("base32", "sr64", "sr128", "sr256", "classifier32")
    assert stages.SIZES == ("tiny", "paper")
    with pytest.raises(ValueError, match="unknown stage 'sr512'.*base32"):
        stages.get_stage("sr512")
    with pytest.raises(ValueError, match="unknown size 'huge'.*tiny"):
        stages.get_stage("base32", "huge")


@pytest.mark.parametrize("name", stages.STAGE_NAMES)
def test_tiny_stage_forward_shapes_and_size(name):
    cfg = stages.get_stage(name, "tiny", num_classes=7)
    torch.manual_seed(0)
    model = stages.build_model(cfg).eval()
    assert stages.count_parameters(model) < 3_000_000
    with torch.no_grad():
        out = model(**stages.example_inputs(cfg, batch_size=1, generator=torch.Generator().manual_seed(0)))
    r, channels = cfg.resolution, 6 if cfg.diffusion.model_var_type == "learned_range" else 3  # mean ‖ variance
    assert out.shape == ((1, 7) if cfg.kind == "classifier" else (1, channels, r, r))


@pytest.mark.parametrize("name", stages.STAGE_NAMES)
def test_paper_stage_shapes_on_meta_device(name):
    cfg = stages.get_stage(name, "paper", num_classes=1000)
    with torch.device("meta"):
        model = stages.build_model(cfg)
    assert stages.count_parameters(model) > 30_000_000
    out = model(**stages.example_inputs(cfg, batch_size=2, device="meta"))
    r = cfg.resolution
    assert out.shape == ((2, 1000) if cfg.kind == "classifier" else (2, 6, r, r))


def test_stage_definitions_follow_cdm():
    sr64, sr128, sr256 = (stages.get_stage(n) for n in ("sr64", "sr128", "sr256"))
    assert (sr64.low_resolution, sr128.low_resolution, sr256.low_resolution) == (32, 64, 128)
    assert sr64.aug.blur_prob == 0 and sr64.aug.s_max > 0
    assert sr128.aug.blur_prob == sr256.aug.blur_prob == 0.5 and sr256.aug.blur_sigma == (0.4, 0.6)
    base = stages.get_stage("base32", "paper")
    assert (base.unet.model_channels, base.unet.channel_mult, base.unet.num_res_blocks) == (
        256,
        (1, 2, 3, 4),
        3,
    )
    assert base.diffusion.schedule == "cosine" and base.diffusion.model_var_type == "learned_range"


def test_config_round_trip_through_json():
    for name in stages.STAGE_NAMES:
        cfg = stages.get_stage(name, "tiny")
        assert stages.StageConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_overrides_apply_and_reject_unknown_keys():
    cfg = stages.get_stage("sr64").with_overrides(
        {"num_classes": 3, "unet": {"channel_mult": [1, 2], "num_res_blocks": 1}, "aug": {"s_max": 0.1}}
    )
    assert cfg.num_classes == 3 and cfg.unet.channel_mult == (1, 2) and cfg.aug.s_max == 0.1
    assert cfg.unet.model_channels == stages.get_stage("sr64").unet.model_channels
    with pytest.raises(ValueError, match="unet.widht"):
        cfg.with_overrides({"unet": {"widht": 3}})
    with pytest.raises(ValueError, match="lr"):
        cfg.with_overrides({"lr": 1e-4})
    with pytest.raises(ValueError, match="diffusion.schedule"):
        cfg.with_overrides({"diffusion": {"schedule": "sigmoid"}})
    with pytest.raises(ValueError, match="low_resolution"):
        cfg.with_overrides({"low_resolution": None})
    with pytest.raises(ValueError, match="one per level"):
        cfg.with_overrides({"unet": {"num_res_blocks": [1, 1, 1]}})
    with pytest.raises(ValueError, match="aug.s_max"):
        cfg.with_overrides({"aug": {"s_max": 2.0}})


def test_build_diffusion_follows_config():
    cfg = stages.get_stage("base32", "paper").with_overrides({"diffusion": {"num_timesteps": 50}})
    diffusion = stages.build_diffusion(cfg)
    assert isinstance(diffusion, GaussianDiffusion) and diffusion.num_timesteps == 50
    assert diffusion.model_var_type == "learned_range" and diffusion.loss_type == "hybrid"

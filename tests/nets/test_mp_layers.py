"""EDM2's magnitude-preserving layers (`cascade.nets.mp_layers`) and the UNet built with them: unit magnitude for
unit-variance inputs, forced weight normalisation in training, the option's path from the config to the network,
channels_last with bf16 autocast, and a state-dict round trip."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import stages
from cascade.nets.build import build_model, example_inputs
from cascade.nets.mp_layers import MPConv2d, MPLinear, mp_cat, mp_silu, mp_sum, normalize, zero_init_
from cascade.nets.unet import ResBlock


def _rms(x: torch.Tensor) -> float:
    return float(x.detach().float().pow(2).mean().sqrt())


def _mp_stage(name: str = "base32"):
    return stages.get_stage(name, "tiny", num_classes=4).with_overrides({"unet": {"magnitude_preserving": True}})


def test_mp_conv_and_linear_keep_unit_magnitude_whatever_the_weights():
    gen = torch.Generator().manual_seed(0)
    conv = MPConv2d(16, 24, 3, padding=1)
    linear = MPLinear(64, 48)
    with torch.no_grad():  # stored weights of any scale: the layers use them normalised
        conv.weight.mul_(torch.rand(24, 1, 1, 1, generator=gen) * 50)
        linear.weight.mul_(0.01)
    x = torch.randn(16, 16, 24, 24, generator=gen)
    assert _rms(conv.eval()(x)) == pytest.approx(1.0, abs=0.06)  # a little below 1: zero padding at the borders
    assert _rms(linear.eval()(torch.randn(4096, 64, generator=gen))) == pytest.approx(1.0, abs=0.03)


def test_mp_silu_sum_and_cat_keep_unit_magnitude():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 200_000, generator=gen)
    assert _rms(mp_silu(a)) == pytest.approx(1.0, abs=0.01)
    assert _rms(torch.nn.functional.silu(a)) == pytest.approx(0.596, abs=0.01)  # what MP-SiLU divides by
    for t in (0.3, 0.5, 0.9):
        assert _rms(mp_sum(a, b, t)) == pytest.approx(1.0, abs=0.01)
    assert _rms(a + b) == pytest.approx(math.sqrt(2), abs=0.01)  # the plain sum grows
    wide, narrow = torch.randn(64, 48, 8, 8, generator=gen), torch.randn(64, 16, 8, 8, generator=gen)
    out = mp_cat(wide, narrow, t=0.3)
    assert out.shape == (64, 64, 8, 8) and _rms(out) == pytest.approx(1.0, abs=0.01)
    energy = out.pow(2).sum(dim=(0, 2, 3))
    # the two parts hold (1 − t)² : t² of the energy whatever their widths (48 against 16 channels)
    assert float(energy[:48].sum() / energy[48:].sum()) == pytest.approx(0.7**2 / 0.3**2, rel=0.03)


def test_forced_weight_normalisation_after_a_training_step():
    torch.manual_seed(2)
    conv = MPConv2d(8, 12, 3, padding=1)
    optimizer = torch.optim.Adam(conv.parameters(), lr=0.1)
    x = torch.randn(4, 8, 10, 10)
    conv(x).square().mean().backward()  # a training forward first normalises the stored weights
    unit = torch.full((12,), math.sqrt(72))
    torch.testing.assert_close(conv.weight.detach().flatten(1).norm(dim=1), unit, rtol=1e-3, atol=0)
    optimizer.step()
    row_norms = conv.weight.flatten(1).norm(dim=1)
    assert not torch.allclose(row_norms, unit, rtol=1e-3)  # the step moved them off the unit sphere
    conv.eval()
    before = conv.weight.detach().clone()
    out_eval = conv(x)
    assert torch.equal(conv.weight, before)  # evaluation uses the weights normalised but leaves them be
    conv.train()
    out_train = conv(x)  # training normalises the stored weights first: each row has unit RMS, norm √fan_in
    # (to ε = 1e-4 of normalize)
    torch.testing.assert_close(conv.weight.flatten(1).norm(dim=1), torch.full((12,), math.sqrt(72)), rtol=1e-3, atol=0)
    torch.testing.assert_close(out_train, out_eval, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(normalize(conv.weight), conv.weight.detach(), rtol=1e-5, atol=1e-6)


def test_zero_init_starts_either_kind_of_layer_at_zero():
    for layer in (MPConv2d(4, 6, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1)):
        zero_init_(layer)
        assert torch.count_nonzero(layer(torch.randn(2, 4, 5, 5))) == 0
    with pytest.raises(TypeError, match="GroupNorm"):
        zero_init_(nn.GroupNorm(2, 4))


@pytest.mark.parametrize("name", ["base32", "sr64"])
def test_the_option_builds_an_mp_unet_whose_activations_do_not_grow(name):
    torch.manual_seed(3)
    model = build_model(_mp_stage(name)).eval()
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules())  # every conv and linear is MP
    assert not any(isinstance(m, (MPConv2d, MPLinear)) for m in build_model(stages.get_stage(name, "tiny")).modules())
    magnitudes = []
    for block in model.modules():
        if isinstance(block, ResBlock):
            block.register_forward_hook(lambda _m, _i, out: magnitudes.append(_rms(out)))
    with torch.no_grad():
        model(**example_inputs(_mp_stage(name), 8, generator=torch.Generator().manual_seed(0)))
    assert len(magnitudes) > 10 and all(0.3 < m < 1.5 for m in magnitudes), magnitudes


def test_mp_unet_trains_in_bf16_channels_last_and_round_trips_its_state():
    stage = _mp_stage()
    torch.manual_seed(4)
    model = build_model(stage).to(memory_format=torch.channels_last).train()
    inputs = example_inputs(stage, 2, generator=torch.Generator().manual_seed(1))
    inputs["x_t"] = inputs["x_t"].contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs)
    (out.float() - inputs["x_t"]).square().mean().backward()
    assert out.shape == inputs["x_t"].shape and torch.isfinite(out).all()
    assert model.out_conv.gain.grad is not None and model.out_conv.gain.grad.abs() > 0  # the output gain learns
    with torch.no_grad():
        model.out_conv.gain.fill_(0.5)  # a nonzero output to compare
    model.eval()
    copy = build_model(stage)
    copy.load_state_dict(model.state_dict())
    copy.eval()
    with torch.no_grad():
        torch.testing.assert_close(copy(**inputs), model(**inputs), rtol=1e-4, atol=1e-5)

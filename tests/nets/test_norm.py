"""GroupNorm's channels_last CPU path against PyTorch's own group norm: values, gradients, layouts."""

import pytest
import torch
import torch.nn.functional as F

from cascade.nets.norm import SMALL_MAP, GroupNorm, group_norm


def _reference(x, gn, dy):
    """F.group_norm's output and gradients on a contiguous float64 copy."""
    xr = x.detach().double().contiguous().requires_grad_()
    w = gn.weight.detach().double().requires_grad_()
    b = gn.bias.detach().double().requires_grad_()
    y = F.group_norm(xr, gn.num_groups, w, b, gn.eps)
    y.backward(dy.double())
    return y, xr.grad, w.grad, b.grad


@pytest.mark.parametrize("size", [4, 17])  # a small map (contiguous forward) and a large one (channels_last kernel)
def test_float64_gradients_pass_gradcheck(size):
    assert (size * size <= SMALL_MAP) == (size == 4)
    torch.manual_seed(0)
    gn = GroupNorm(2, 6).double()
    with torch.no_grad():
        gn.weight.normal_(), gn.bias.normal_()
    x = torch.randn(2, 6, size, size, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: gn(x), (x, gn.weight, gn.bias))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2 * 2.0**-7)])
@pytest.mark.parametrize("size", [8, 20])
def test_matches_pytorch_and_keeps_channels_last(dtype, tol, size):
    torch.manual_seed(1)
    gn = group_norm(32, 8)  # 8 groups of 4 channels
    with torch.no_grad():
        gn.weight.normal_(), gn.bias.normal_()
    x = (3 * torch.randn(4, 32, size, size) + 1).to(dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = gn(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref_y, ref_dx, ref_dw, ref_db = _reference(x, gn, dy)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    for got, ref in ((y, ref_y), (x.grad, ref_dx), (gn.weight.grad, ref_dw), (gn.bias.grad, ref_db)):
        assert (got.double() - ref).abs().max() <= tol * ref.abs().max()


def test_inference_and_contiguous_inputs_use_pytorch_values():
    torch.manual_seed(2)
    gn = group_norm(16, 4)
    for size in (8, 32):
        x = torch.randn(2, 16, size, size)
        expected = F.group_norm(x, 4, gn.weight, gn.bias)
        with torch.no_grad():
            got = gn(x.contiguous(memory_format=torch.channels_last))
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gn(x), expected)


def test_state_dict_is_nn_groupnorm():
    assert group_norm(48, 32).state_dict().keys() == torch.nn.GroupNorm(16, 48).state_dict().keys()
    assert group_norm(48, 32).num_groups == 16


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.bfloat16, 4 * 2.0**-7)])
@pytest.mark.parametrize("size", [4, 20])
def test_scale_shift_matches_addcmul_of_group_norm(dtype, tol, size):
    torch.manual_seed(3)
    gn = group_norm(16, 4).to(torch.float64 if dtype == torch.float64 else torch.float32)
    with torch.no_grad():
        gn.weight.normal_(), gn.bias.normal_()
    x = torch.randn(3, 16, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    scale, shift = (torch.randn(3, 16, 1, 1, dtype=dtype, requires_grad=True) for _ in range(2))
    if dtype == torch.float64 and size == 4:  # numerical Jacobians: keep the input small
        assert torch.autograd.gradcheck(lambda x, s, t, w, b: gn(x, s, t), (x, scale, shift, gn.weight, gn.bias))
    y = gn(x, scale, shift)
    dy = torch.randn_like(y)
    y.backward(dy)
    inputs = [t.detach().double().requires_grad_() for t in (x, scale, shift, gn.weight, gn.bias)]
    ref = torch.addcmul(inputs[2], F.group_norm(inputs[0], 4, inputs[3], inputs[4]), 1 + inputs[1])
    ref.backward(dy.double())
    assert (y.double() - ref).abs().max() <= tol * ref.abs().max()
    for got, want in zip((x.grad, scale.grad, shift.grad, gn.weight.grad, gn.bias.grad), inputs):
        assert got.shape == want.shape
        assert (got.double() - want.grad).abs().max() <= tol * want.grad.abs().max()
    with torch.no_grad():  # inference folds the scale-shift the same way
        assert (gn(x, scale, shift).double() - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("with_scale", [False, True])
def test_bf16_gradients_stay_accurate_when_the_group_mean_is_large(with_scale):
    torch.manual_seed(4)
    gn = group_norm(16, 4)
    x = (torch.randn(2, 16, 20, 20) + 20).bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_()
    scale, shift = (0.1 * torch.randn(2, 16, 1, 1), 0.1 * torch.randn(2, 16, 1, 1)) if with_scale else (None, None)
    y = gn(x, scale, shift)
    dy = torch.randn_like(y)
    y.backward(dy)
    xr = x.detach().double().requires_grad_()
    ref = F.group_norm(xr, 4, gn.weight.double(), gn.bias.double())
    if with_scale:
        ref = torch.addcmul(shift.double(), ref, 1 + scale.double())
    ref.backward(dy.double())
    assert (x.grad.double() - xr.grad).abs().max() <= 4 * 2.0**-7 * xr.grad.abs().max()


def test_unusual_settings_fall_back_or_are_refused():
    x = torch.randn(2, 8, 20, 20).contiguous(memory_format=torch.channels_last).requires_grad_()
    plain = GroupNorm(4, 8, affine=False, eps=1e-3)
    torch.testing.assert_close(plain(x), F.group_norm(x, 4, eps=1e-3))
    plain(x).sum().backward()
    with pytest.raises(ValueError, match="scale and shift together"):
        group_norm(8, 4)(x, torch.zeros(2, 8, 1, 1))

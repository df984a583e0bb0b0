"""The profile's attribution of operator time to kinds of work."""

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import record_function

from cascade.harness.bench_profile import KINDS, classify, format_profiles, profile_step


@pytest.mark.parametrize("name, kind", [
    ("aten::mkldnn_convolution", "convolution"), ("autograd::engine::evaluate_function: ConvolutionBackward0",
                                                  "convolution"),
    ("aten::addmm", "matmul/attention"), ("aten::_scaled_dot_product_flash_attention_for_cpu", "matmul/attention"),
    ("aten::native_group_norm", "normalisation"), ("_ChannelsLastGroupNormBackward", "normalisation"),
    ("aten::silu_backward", "activation"), ("aten::_to_copy", "casts"), ("ToCopyBackward0", "casts"),
    ("aten::add_", "elementwise"), ("CatBackward0", "elementwise"), ("cascade::forward", None)])
def test_classify(name, kind):
    assert classify(name) == kind


def test_profile_attributes_scopes_casts_and_kinds():
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(4, 8, 16, 16)
    params = [torch.zeros(1000) for _ in range(20)]

    def step():
        with torch.no_grad():
            h = F.silu(F.group_norm(conv(x.to(torch.float64).float()), 4))
            (h * 2).sum()
            with record_function("cascade::ema"):
                for p in params:
                    p.add_(1.0)  # elementwise work, but inside the EMA's scope

    out = profile_step(step, 2)
    kinds = out["kinds"]
    assert set(kinds) == set(KINDS)
    for kind in ("convolution", "normalisation", "activation", "elementwise", "casts", "EMA"):
        assert kinds[kind] > 0, kind
    assert kinds["optimizer"] == kinds["data"] == kinds["matmul/attention"] == 0
    assert sum(kinds.values()) == pytest.approx(out["profiled_ms"], rel=1e-6)


def test_format_profiles_puts_diffusers_beside_cascade():
    kinds = {k: 1.0 for k in KINDS}
    prof = {"train": {"profiled_ms": 10.0, "kinds": kinds}}
    results = [{"model": m, "stage": "base32", "mode": "bf16", "batch_size": 8, "profile": prof}
               for m in ("cascade", "diffusers")]
    text = format_profiles(results)
    assert "profile base32 bf16, training step (batch 8)" in text
    assert "cascade ms" in text and "diffusers ms" in text
    assert "non-conv / conv" in text and "9.00" in text
    with pytest.raises(ValueError, match="steps must be >= 1"):
        profile_step(lambda: None, 0)

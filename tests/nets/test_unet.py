"""UNet, attention and classifier: attention equations, conditioning, precision/layout, overfitting."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import stages
from cascade.nets.attention import SHORT_SEQUENCE, CrossAttention2d, attention, explicit_attention
from cascade.nets.unet import UNet, timestep_embedding


def _randomize_zero_params(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give zero-initialized layers (output convs/projections) random weights so every path matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _tiny_base(**unet) -> UNet:
    cfg = stages.get_stage("base32", "tiny").with_overrides(
        {
            "unet": {
                "model_channels": 16,
                "channel_mult": [1, 2],
                "num_res_blocks": 1,
                "head_channels": 16,
                "attention_resolutions": [16],
                "cross_attention_resolutions": [16],
                **unet,
            }
        }
    )
    torch.manual_seed(0)
    return _randomize_zero_params(stages.build_model(cfg)).eval()


def test_sdpa_attention_equals_explicit_softmax():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 8, generator=gen) for n in (10, 7, 7))
    torch.testing.assert_close(attention(q, k, v), explicit_attention(q, k, v), atol=1e-5, rtol=1e-5)
    manual = torch.softmax(q[0, :, 1] @ k[0, :, 1].T / 8**0.5, dim=-1) @ v[0, :, 1]  # eq. 15, one head
    torch.testing.assert_close(attention(q, k, v)[0, :, 1], manual, atol=1e-5, rtol=1e-5)



@pytest.mark.parametrize("tokens", [16, SHORT_SEQUENCE + 4])  # short bf16 sequences: matmul / float32 paths; flash
def test_bf16_attention_matches_float32_on_every_kernel_path(tokens):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, tokens, 2, 8, generator=gen, requires_grad=True) for _ in range(3))
    expected = explicit_attention(q, k, v)
    weights = torch.randn(expected.shape, generator=gen)
    (expected * weights).sum().backward()
    qb, kb, vb = (t.detach().bfloat16().requires_grad_(True) for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(qb, kb, vb)  # gradients needed
        with torch.no_grad():
            inference = attention(qb, kb, vb)
    assert out.dtype == inference.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(inference.float(), expected, atol=2e-2, rtol=2e-2)
    (out.float() * weights).sum().backward()
    for low, ref in ((qb, q), (kb, k), (vb, v)):
        assert low.grad.dtype == torch.bfloat16
        torch.testing.assert_close(low.grad.float(), ref.grad, atol=5e-2, rtol=5e-2)

def test_cross_attention_block_uses_context():
    block = _randomize_zero_params(CrossAttention2d(16, 12, head_channels=8))
    x, ctx = torch.randn(2, 16, 4, 4), torch.randn(2, 5, 12)
    ctx2 = ctx.clone()
    ctx2[1] += 1.0
    out, out2 = block(x, ctx), block(x, ctx2)
    torch.testing.assert_close(out[0], out2[0])
    assert not torch.allclose(out[1], out2[1])


def test_cross_attention_attends_to_own_class_tokens():
    model = _tiny_base()
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([10, 500]), torch.tensor([3, 7])
    with torch.no_grad():
        before = model(x, t, y)
        model.class_tokens.table.weight[3] += 1.0  # class 3's tokens only
        after = model(x, t, y)
        model.class_tokens.table.weight[5] += 1.0  # a class absent from the batch
        after_other = model(x, t, y)
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(before[1], after[1])
    torch.testing.assert_close(after, after_other)


def test_null_class_is_unconditional_branch():
    model = _tiny_base()
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([0, 100, 999])
    with torch.no_grad():
        uncond = model(x, t)
        torch.testing.assert_close(uncond, model(x, t, y=torch.full((3,), 10)))
        assert not torch.allclose(uncond, model(x, t, y=torch.tensor([0, 1, 2])))


def test_output_is_zero_at_init_and_learned_variance_doubles_channels():
    cfg = stages.get_stage("base32", "tiny").with_overrides(
        {"diffusion": {"model_var_type": "learned_range", "loss": "hybrid"}})
    model = stages.build_model(cfg)
    out = model(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert out.shape == (2, 6, 32, 32) and not out.any()
    fixed = stages.build_model(
        cfg.with_overrides({"diffusion": {"model_var_type": "fixed_small", "loss": "simple"}})
    )
    assert fixed(torch.randn(1, 3, 32, 32), torch.tensor([1])).shape == (1, 3, 32, 32)


def test_timestep_embedding_is_sinusoidal():
    emb = timestep_embedding(torch.tensor([0.0, 3.0]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    torch.testing.assert_close(emb[1, 0], torch.cos(torch.tensor(3.0)))


def test_channels_last_and_bf16_autocast_match_fp32():
    model = _tiny_base()
    gen = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(2, 3, 32, 32, generator=gen), torch.tensor([5, 700]), torch.tensor([1, 10])
    with torch.no_grad():
        ref = model(x, t, y)
        model_cl = model.to(memory_format=torch.channels_last)
        out_cl = model_cl(x.contiguous(memory_format=torch.channels_last), t, y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf16 = model_cl(x.contiguous(memory_format=torch.channels_last), t, y)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl, ref, atol=1e-4, rtol=1e-4)
    assert out_bf16.dtype == torch.float32
    rel = (out_bf16 - ref).norm() / ref.norm()
    assert rel < 0.05, rel


def test_gradient_checkpointing_gives_same_gradients():
    plain, ckpt = _tiny_base(), _tiny_base(use_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([5, 700]), torch.tensor([1, 2])
    for m in (plain, ckpt):
        m.train()
        m(x, t, y).square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_bad_inputs_raise_clear_errors():
    base = _tiny_base()
    sr = stages.build_model(stages.get_stage("sr64", "tiny"))
    x64, t = torch.randn(1, 3, 64, 64), torch.tensor([3])
    with pytest.raises(ValueError, match="x_t must have shape"):
        base(torch.randn(1, 3, 16, 16), t)
    with pytest.raises(ValueError, match="class indices"):
        base(torch.randn(1, 3, 32, 32), t, y=torch.tensor([11]))
    with pytest.raises(ValueError, match="only for super-resolution"):
        base(torch.randn(1, 3, 32, 32), t, x_low=torch.randn(1, 3, 16, 16), aug_level=torch.zeros(1))
    with pytest.raises(ValueError, match="needs x_low"):
        sr(x64, t)
    with pytest.raises(ValueError, match="x_low must have shape"):
        sr(x64, t, x_low=torch.randn(1, 3, 16, 16), aug_level=torch.zeros(1))
    with pytest.raises(ValueError, match="t must be"):
        base(torch.randn(2, 3, 32, 32), torch.tensor([1, 2, 3]))




def _overfit(model, loss_fn, steps: int, lr: float = 2e-3) -> tuple[float, float]:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    first = None
    for _ in range(steps):
        loss = loss_fn()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, loss_fn().item()


def _diffusion_overfit(cfg, batch, steps):
    torch.manual_seed(0)
    model, diffusion = stages.build_model(cfg), stages.build_diffusion(cfg)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, cfg.resolution, cfg.resolution, generator=gen).clamp(-1, 1)
    noise = torch.randn(x.shape, generator=gen)
    t = torch.randint(0, cfg.diffusion.num_timesteps, (batch,), generator=gen)
    kwargs = {"y": torch.arange(batch) % cfg.num_classes}
    if cfg.kind == "sr":
        r = cfg.low_resolution
        kwargs |= {
            "x_low": torch.randn(batch, 3, r, r, generator=gen),
            "aug_level": torch.rand(batch, generator=gen),
        }
    return _overfit(
        model, lambda: diffusion.training_losses(model, x, t, noise, kwargs)["loss"].mean(), steps
    )


SMALL = {
    "model_channels": 16,
    "channel_mult": [1, 2],
    "num_res_blocks": 1,
    "head_channels": 16,
    "attention_resolutions": [],
    "cross_attention_resolutions": [],
}


def test_tiny_base_overfits_one_batch(one_thread):
    cfg = stages.get_stage("base32", "tiny").with_overrides({"resolution": 16, "unet": SMALL})
    first, last = _diffusion_overfit(cfg, 4, 200)
    assert last < first / 10, (first, last)


def test_tiny_sr_overfits_one_batch(one_thread):
    cfg = stages.get_stage("sr64", "tiny").with_overrides(
        {"resolution": 16, "low_resolution": 8, "unet": SMALL}
    )
    first, last = _diffusion_overfit(cfg, 4, 200)
    assert last < first / 10, (first, last)


def test_tiny_classifier_overfits_one_batch(one_thread):
    cfg = stages.get_stage("classifier32", "tiny").with_overrides({"resolution": 16, "unet": SMALL})
    torch.manual_seed(0)
    model, diffusion = stages.build_model(cfg), stages.build_diffusion(cfg)
    gen = torch.Generator().manual_seed(0)
    x0, y = torch.randn(8, 3, 16, 16, generator=gen).clamp(-1, 1), torch.arange(8) % 10
    t = torch.randint(0, 300, (8,), generator=gen)
    x_t = diffusion.q_sample(x0, t, noise=torch.randn(x0.shape, generator=gen))
    first, last = _overfit(model, lambda: F.cross_entropy(model(x_t, t), y), 100)
    assert last < first / 10, (first, last)


def _skip_sr64(cond_skip_std: float, prediction: str = "eps"):
    overrides = {"model_channels": 8, "channel_mult": [1], "num_res_blocks": 1, "attention_resolutions": [],
                 "norm_groups": 4, "cond_skip_std": cond_skip_std}
    cfg = stages.get_stage("sr64", "tiny").with_overrides({"unet": overrides,
                                                           "diffusion": {"prediction": prediction}})
    torch.manual_seed(0)
    return stages.build_model(cfg).eval()  # fresh: the output convolution is zero, only the skip speaks


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("aug_level", [0.0, 0.3])
def test_conditioning_skip_is_the_gaussian_posterior_mean_of_the_target(aug_level, prediction):
    from cascade.diffusion.gaussian import aug_alpha_bar, make_betas
    from cascade.imageops import upsample
    from cascade.nets.precond import ConditioningSkip

    sigma, n = 0.1, 4
    model = _skip_sr64(sigma, prediction)
    assert isinstance(model, ConditioningSkip) and isinstance(model.backbone, UNet)
    assert not hasattr(model.backbone, "skip_alphas_cumprod"), "the UNet knows nothing about ᾱ"
    alphas_cumprod = torch.cumprod(1 - torch.as_tensor(make_betas("cosine", 1000)), 0).float()
    gen = torch.Generator().manual_seed(1)
    x_low = torch.rand(n, 3, 32, 32, generator=gen) * 2 - 1
    x_up = upsample(x_low, 64)
    var = sigma**2 + (1 - float(aug_alpha_bar(aug_level)))
    t = torch.tensor([50, 100, 500, 999])
    ab = alphas_cumprod[t].view(-1, 1, 1, 1)
    # x_0 ~ N(x_up, var·I), x_t = √ᾱ x_0 + √(1−ᾱ) ε (eq. 2): many draws per pixel
    draws = 64
    x0 = x_up + var**0.5 * torch.randn(draws, *x_up.shape, generator=gen)
    eps = torch.randn(draws, *x_up.shape, generator=gen)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    target = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[prediction]
    levels = torch.full((n,), aug_level)
    with torch.no_grad():  # the whole model on a few draws (a fresh backbone outputs zeros) ...
        out = torch.stack([model(x, t, y=torch.zeros(n, dtype=torch.long), x_low=x_low, aug_level=levels)
                           for x in x_t[:2]])
        pred = torch.stack([model.skip(x, t, x_up, levels) for x in x_t])  # ... its skip on all of them
    torch.testing.assert_close(out[:, :, :3], pred[:2])
    assert torch.equal(out[:, :, 3:], torch.zeros_like(out[:, :, 3:]))  # the variance channels are untouched
    # closed forms: E[ε | x_t] = √(1−ᾱ)·r/D, E[x_0 | x_t] = x_up + √ᾱ·var·r/D, v = √ᾱ·ε − √(1−ᾱ)·x_0, with
    # r = x_t − √ᾱ x_up and D = ᾱ·var + 1 − ᾱ (computed here through E[ε] and E[x_0], not the skip's v form)
    scaled = (x_t - ab.sqrt() * x_up) / (ab * var + 1 - ab)
    e_eps, e_x0 = (1 - ab).sqrt() * scaled, x_up + ab.sqrt() * var * scaled
    expected = {"eps": e_eps, "x0": e_x0, "v": ab.sqrt() * e_eps - (1 - ab).sqrt() * e_x0}[prediction]
    torch.testing.assert_close(pred, expected, atol=1e-4, rtol=1e-4)
    # it is the minimum-MSE estimate: no other scaling of its deviation from the prior mean does better
    mse = ((pred - target) ** 2).mean(dim=(0, 2, 3, 4))
    prior_mean = {"eps": torch.zeros_like(x_up), "x0": x_up, "v": -(1 - ab).sqrt() * x_up}[prediction]
    for scale in (0.9, 1.1):
        scaled_pred = prior_mean + scale * (pred - prior_mean)
        assert (((scaled_pred - target) ** 2).mean(dim=(0, 2, 3, 4)) >= mse - 1e-6).all()
    if prediction == "eps":  # and its error variance is the posterior's: ᾱ·var/(ᾱ·var + 1 − ᾱ)
        posterior_var = (ab * var / (ab * var + 1 - ab)).flatten()
        torch.testing.assert_close(mse, posterior_var, atol=0.01, rtol=0.05)


def test_conditioning_skip_keeps_the_bare_unet_state_dict_keys():
    from cascade.nets.precond import ConditioningSkip

    wrapped, bare = _skip_sr64(0.1), _skip_sr64(0.0)
    assert isinstance(wrapped, ConditioningSkip) and isinstance(bare, UNet)
    keys = list(wrapped.state_dict())
    assert keys == list(bare.state_dict()) and not any(k.startswith("backbone.") for k in keys)
    with torch.no_grad():
        for p in bare.parameters():
            p.add_(torch.randn_like(p))
    wrapped.load_state_dict(bare.state_dict())  # a bare UNet's checkpoint loads into the wrapper (strict)
    for (name, a), b in zip(wrapped.backbone.state_dict().items(), bare.state_dict().values()):
        assert torch.equal(a, b), name
    prefixed = {"backbone." + k: v for k, v in bare.state_dict().items()}
    wrapped.load_state_dict(prefixed)  # and so do keys saved with the prefix
    bare.load_state_dict(wrapped.state_dict())  # and the wrapper's checkpoint into a bare UNet
    with pytest.raises(RuntimeError, match="Unexpected key"):
        wrapped.load_state_dict({**bare.state_dict(), "stray.weight": torch.zeros(1)})


def test_conditioning_skip_bad_settings_raise():
    from cascade.diffusion.gaussian import make_betas
    from cascade.nets.precond import ConditioningSkip

    with pytest.raises(ValueError, match="cond_skip_std must be >= 0"):
        stages.get_stage("sr64", "tiny").with_overrides({"unet": {"cond_skip_std": -0.1}})
    with pytest.raises(ValueError, match="applies to sr stages only"):
        stages.get_stage("base32", "tiny").with_overrides({"unet": {"cond_skip_std": 0.1}})
    alphas_cumprod = torch.cumprod(1 - torch.as_tensor(make_betas("cosine", 10)), 0)
    base = UNet(32, 8, (1, 2), 1, 10, out_channels=6, norm_groups=4, head_channels=8)
    with pytest.raises(ValueError, match="needs a super-resolution backbone"):
        ConditioningSkip(base, 0.1, alphas_cumprod)
    sr = UNet(64, 8, (1,), 1, 10, low_resolution=32, norm_groups=4, head_channels=8)
    with pytest.raises(ValueError, match="cond_skip_std must be > 0"):
        ConditioningSkip(sr, 0.0, alphas_cumprod)
    with pytest.raises(ValueError, match="unknown prediction type"):
        ConditioningSkip(sr, 0.1, alphas_cumprod, prediction="score")

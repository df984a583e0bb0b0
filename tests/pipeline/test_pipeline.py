"""CascadePipeline end to end on tiny checkpoints: shapes, seeds, guidance, augmentation modes, checks."""

from __future__ import annotations

import pytest
import torch

from cascade.diffusion.gaussian import aug_alpha_bar, aug_level_from_alpha_bar
from cascade.pipeline.cascade_pipeline import CascadeConfigError, CascadePipeline

BASE_SR64 = ("base32", "sr64")


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random weight noise: a few training steps leave the zero-initialised output layer predicting ε ≈ 0,
    for which conditional and null-class predictions (and so every guidance weight) would coincide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))


@pytest.fixture(scope="module")
def pipe_64(runs_root):
    return CascadePipeline.from_runs(runs_root, BASE_SR64)


@pytest.fixture(scope="module")
def pipe_base(runs_root):
    pipe = CascadePipeline.from_runs(runs_root, ("base32",))
    _perturb(pipe.stages[0].model, seed=0)
    return pipe


class _Spy(torch.nn.Module):
    """Records the keyword arguments a stage model is called with."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, x, t, **kwargs):
        self.calls.append({"x": x.detach().clone(), **{k: v.detach().clone() for k, v in kwargs.items()}})
        return self.model(x, t, **kwargs)


def test_full_chain_gives_every_stage_at_its_size(runs_root):
    pipe = CascadePipeline.from_runs(runs_root)
    out = pipe([0, 2], num_per_class=2, steps=2, w=1.0, progress=False)
    assert out["labels"].tolist() == [0, 0, 2, 2]
    for name, res in (("base32", 32), ("sr64", 64), ("sr128", 128), ("sr256", 256)):
        assert out[name].shape == (4, 3, res, res)
        assert out[name].dtype == torch.float32 and torch.isfinite(out[name]).all()
        assert out[name].abs().max() <= 1.0


def test_same_seed_same_images_other_seed_other_images(pipe_64):
    settings = {"num_per_class": 1, "steps": 2, "w": 2.0, "aug_level": 0.3, "progress": False}
    a = pipe_64([0, 2], seed=5, **settings)
    b = pipe_64([0, 2], seed=5, **settings)
    c = pipe_64([0, 2], seed=6, **settings)
    for name in BASE_SR64:
        assert torch.equal(a[name], b[name])
        assert not torch.allclose(a[name], c[name])


def test_starting_noise_does_not_depend_on_batch_size(pipe_base):
    settings = {"num_per_class": 3, "steps": 2, "sampler": "ddim", "eta": 0.0, "w": 0.0, "seed": 2, "progress": False}
    spy = _Spy(pipe_base.stages[0].model)
    bare, pipe_base.stages[0].model = pipe_base.stages[0].model, spy
    try:
        whole = pipe_base([2], **settings)
        one_by_one = pipe_base([2], batch_size=1, **settings)
    finally:
        pipe_base.stages[0].model = bare
    first_whole, first_single = spy.calls[0]["x"], torch.cat([c["x"] for c in spy.calls[2::2]])
    assert torch.equal(first_whole, first_single)  # x_T of each sample comes from its own generator
    # DDIM (η = 0) is deterministic given x_T: equal up to the rounding of batched convolutions (oneDNN picks its
    # kernels by batch shape; in bf16 that rounding is a few bf16 units of the image values).
    atol = 5e-2 if pipe_base.precision == "bf16" else 1e-3
    torch.testing.assert_close(whole["base32"], one_by_one["base32"], atol=atol, rtol=0)


def test_ancestral_samples_do_not_depend_on_batch_size(pipe_64):
    settings = {"num_per_class": 3, "steps": 3, "sampler": "ddpm", "w": 1.0, "seed": 9, "progress": False}
    whole = pipe_64([0, 2], **settings)
    one_by_one = pipe_64([0, 2], batch_size=1, **settings)
    later_half = pipe_64.run(pipe_64.validate([2], pipe_64.settings(steps=3, sampler="ddpm", w=1.0), num_per_class=3,
                                              seed=9), start_index=3, progress=False)
    for name in BASE_SR64:  # every noise of sample i is drawn from its own generators
        torch.testing.assert_close(whole[name], one_by_one[name], atol=1e-3, rtol=0)
        torch.testing.assert_close(whole[name][3:], later_half[name], atol=1e-3, rtol=0)
    assert not torch.allclose(whole["base32"][0], whole["base32"][1])


def test_sampler_is_chosen_per_stage(pipe_64):
    settings = {"num_per_class": 1, "steps": 3, "seed": 4, "progress": False}
    own = pipe_64.settings()["base32"].sampler  # the base stage's default, stored in its checkpoint
    other = "ddpm" if own != "ddpm" else "ddim"
    plan = pipe_64.validate([1], pipe_64.settings(sampler={"sr64": "ddim"}, steps=3), seed=4)
    assert [sp.settings.sampler for sp in plan.stages] == [own, "ddim"]
    assert plan.to_dict()["stages"]["sr64"]["sampler"] == "ddim"
    mixed = pipe_64([1], sampler={"sr64": "ddim"}, **settings)
    all_own = pipe_64([1], sampler=own, **settings)
    all_other = pipe_64([1], sampler=other, **settings)
    assert torch.equal(mixed["base32"], all_own["base32"])  # the base stage kept its own sampler
    assert not torch.equal(mixed["base32"], all_other["base32"])
    # sr64 ran DDIM on the base sample: the same as sampling that stage alone with DDIM
    alone = pipe_64.sample_stage("sr64", mixed["labels"], all_own["base32"],
                                 pipe_64.settings(sampler="ddim", steps=3)["sr64"], seed=4)
    assert torch.equal(mixed["sr64"], alone)


def test_w_zero_is_the_conditional_sample(runs_root):
    # fp32: under bf16 autocast (auto on CPUs with native bf16) the guided path's batch of 2N rounds differently
    # from the conditional batch of N, which hides the identity this test checks
    pipe_base = CascadePipeline.from_runs(runs_root, ("base32",), precision="fp32")
    _perturb(pipe_base.stages[0].model, seed=0)
    settings = {"num_per_class": 2, "steps": 3, "seed": 1, "progress": False}
    plain = pipe_base([2], w=0.0, **settings)["base32"]
    # The batched guided path with a vanishing weight must reduce to the conditional model (eq. 17).
    guided_to_zero = pipe_base([2], w=1e-7, **settings)["base32"]
    guided = pipe_base([2], w=3.0, **settings)["base32"]
    torch.testing.assert_close(plain, guided_to_zero, atol=5e-3, rtol=0)
    assert (plain - guided).abs().max() > 5e-2


def test_w_zero_calls_the_bare_model_with_the_labels(pipe_base):
    spy = _Spy(pipe_base.stages[0].model)
    bare, pipe_base.stages[0].model = pipe_base.stages[0].model, spy
    try:
        pipe_base([1, 2], w=0.0, steps=2, progress=False)
    finally:
        pipe_base.stages[0].model = bare
    assert len(spy.calls) == 2 and all(c["y"].tolist() == [1, 2] for c in spy.calls)


@pytest.mark.parametrize("truncate", [False, True])
def test_augmentation_hands_over_the_right_level(pipe_64, truncate):
    s = 0.5
    plan = pipe_64.validate([1], pipe_64.settings(steps={"base32": 8, "sr64": 2}, aug_level={"sr64": s}, w=0.0,
                                                  truncate=truncate), num_per_class=2)
    base, sr = plan.stages
    spy = _Spy(pipe_64.stages[1].model)
    bare, pipe_64.stages[1].model = pipe_64.stages[1].model, spy
    try:
        out = pipe_64.run(plan, progress=False)
    finally:
        pipe_64.stages[1].model = bare
    handed = spy.calls[0]
    assert out["sr64"].shape == (2, 3, 64, 64)
    if truncate:
        alphas_cumprod = base.diffusion.alphas_cumprod
        k = int((alphas_cumprod - aug_alpha_bar(torch.tensor(s, dtype=torch.float64))).abs().argmin())
        assert base.stop_at_index == k and 0 < k < 7
        assert sr.aug_level == pytest.approx(float(aug_level_from_alpha_bar(alphas_cumprod[k])))
        assert float(aug_alpha_bar(torch.tensor(sr.aug_level))) == pytest.approx(float(alphas_cumprod[k]), abs=1e-5)
        torch.testing.assert_close(handed["x_low"], out["base32"])  # z_k itself, not re-noised
    else:
        assert base.stop_at_index is None and sr.aug_level == s
        assert not torch.allclose(handed["x_low"], out["base32"])  # re-noised to level s
        assert out["base32"].abs().max() <= 1.0
    assert torch.all(handed["aug_level"] == sr.aug_level)


def test_truncated_base_output_keeps_noise_of_level_k(pipe_64):
    plan = pipe_64.validate([0], pipe_64.settings(steps={"base32": 8, "sr64": 2}, aug_level=0.9, truncate=True),
                            num_per_class=4)
    out = pipe_64.run(plan, progress=False)
    alpha_bar = float(plan.stages[0].diffusion.alphas_cumprod[plan.stages[0].stop_at_index])
    assert alpha_bar < 0.5
    # z_k = √ᾱ_k·x̂ + √(1−ᾱ_k)·ε: a noisy image, wider than the clipped [-1, 1] range.
    assert out["base32"].abs().max() > 1.0


def test_classifier_guidance_runs_and_moves_the_sample(pipe_base, tiny_runs):
    clf = tiny_runs["classifier32"]
    settings = {"num_per_class": 2, "steps": 2, "seed": 3, "progress": False}
    plain = pipe_base([1], **settings)["base32"]
    _perturb(pipe_base._classifier(clf).model, seed=1)  # its zero-initialised head has ~zero gradients
    guided = pipe_base([1], classifier=str(clf), classifier_scale=5.0, **settings)["base32"]
    assert guided.shape == plain.shape and torch.isfinite(guided).all()
    assert (plain - guided).abs().max() > 1e-4
    assert any(str(p["path"]).startswith(str(clf)) for k, p in pipe_base.checkpoints().items() if "classifier" in k)


def test_bf16_precision_runs(runs_root):
    pipe = CascadePipeline.from_runs(runs_root, ("base32",), precision="bf16")
    out = pipe([0], steps=2, w=1.0, progress=False)
    assert out["base32"].dtype == torch.float32 and torch.isfinite(out["base32"]).all()


def test_bf16_and_fp32_samples_agree_on_a_fixed_seed(runs_root):
    # bf16 autocast runs on every CPU (natively or emulated), so this holds wherever the suite runs
    out = {p: CascadePipeline.from_runs(runs_root, BASE_SR64, precision=p)([0, 2], steps=4, sampler="ddim", eta=0.0,
                                                                         w=2.0, seed=7, progress=False)
           for p in ("fp32", "bf16")}
    for stage in BASE_SR64:
        diff = (out["bf16"][stage] - out["fp32"][stage]).abs()
        assert diff.mean() < 2e-3 and diff.max() < 0.05, (stage, float(diff.mean()), float(diff.max()))


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_follows_native_bf16(runs_root, monkeypatch, native, expected):
    import cascade.device

    monkeypatch.setattr(cascade.device, "native_bf16", lambda device: native)
    assert CascadePipeline.from_runs(runs_root, ("base32",), precision="auto").precision == expected


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"classes": [1, 3]}, "stage base32: class 3 is out of range"),
        ({"classes": [-1]}, "class -1 is out of range"),
        ({"classes": []}, "non-empty"),
        ({"w": -1.0}, "stage base32: w must be >= 0"),
        ({"w": {"sr64": -0.5}}, "stage sr64: w must be >= 0"),
        ({"w": {"sr256": 1.0}}, "'sr256' is not in the chain"),
        ({"steps": -3}, "stage base32: steps must be a positive"),
        ({"steps": {"sr64": 0}}, "stage sr64: steps must be a positive"),
        ({"steps": "ddim-x"}, "stage base32: bad steps"),
        ({"steps": 10**6}, "exceeds"),
        ({"sampler": "euler"}, "sampler 'euler' is unknown"),
        ({"sampler": {"sr64": "euler"}}, "stage sr64: sampler 'euler' is unknown"),
        ({"sampler": {"sr128": "ddim"}}, "'sr128' is not in the chain"),
        ({"aug_level": {"sr64": 1.5}}, "stage sr64: aug_level must be in [0.0, 1.0]"),
        ({"aug_level": {"base32": 0.1}}, "base32 is the base stage"),
        ({"eta": -1.0}, "eta must be in [0.0, 1.0]"),
        ({"classifier_scale": 1.0}, "needs a classifier checkpoint"),
        ({"num_per_class": 0}, "num_per_class must be an integer >= 1"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
    ],
)
def test_bad_settings_fail_before_sampling_with_one_line(pipe_64, settings, expected):
    classes = settings.pop("classes", [1])
    run = {k: settings.pop(k) for k in ("num_per_class", "batch_size") if k in settings}
    with pytest.raises(CascadeConfigError) as err:
        pipe_64.validate(classes, pipe_64.settings(**settings), **run)
    assert expected in _one_line(err)


def test_chain_must_fit(runs_root):
    with pytest.raises(CascadeConfigError) as err:
        CascadePipeline.from_runs(runs_root, ("base32", "sr128"))
    assert "stage sr128: takes 64x64 inputs but base32 makes 32x32" in _one_line(err)
    with pytest.raises(CascadeConfigError) as err:
        CascadePipeline.from_runs(runs_root, ("sr64",))
    assert "stage sr64: the chain must start with a base stage" in _one_line(err)
    with pytest.raises(CascadeConfigError) as err:
        CascadePipeline.from_checkpoints({"base32": runs_root / "base32", "sr64": runs_root / "sr128"})
    assert "stage sr64: its checkpoint holds stage 'sr128'" in _one_line(err)


def test_every_stage_needs_a_checkpoint(runs_root, tmp_path):
    with pytest.raises(CascadeConfigError) as err:
        CascadePipeline.from_runs(tmp_path, ("base32",))
    assert "stage base32:" in _one_line(err) and "pass a checkpoint for base32" in str(err.value)
    with pytest.raises(CascadeConfigError) as err:
        CascadePipeline.from_runs(runs_root, ("base32",), checkpoints={"sr64": tmp_path})
    assert "stage sr64: has a checkpoint but is not in the chain" in _one_line(err)


def test_classifier_must_suit_the_base_stage(pipe_base, runs_root):
    with pytest.raises(CascadeConfigError) as err:
        pipe_base.validate([1], pipe_base.settings(classifier=str(runs_root / "sr64"), classifier_scale=1.0))
    assert "classifier:" in _one_line(err) and "pass a classifier checkpoint" in str(err.value)


def test_bad_device_and_precision(runs_root):
    with pytest.raises(CascadeConfigError, match="precision 'fp8' is unknown"):
        CascadePipeline.from_runs(runs_root, ("base32",), precision="fp8")
    with pytest.raises(CascadeConfigError, match="not a torch device"):
        CascadePipeline.from_runs(runs_root, ("base32",), device="gpu0")


def test_stage_alone_ignores_truncation_a_later_stage_asks_for(pipe_64):
    """sample_stage("base32") is the base stage alone even when sr64's own defaults truncate the chain."""
    import dataclasses

    sr = pipe_64.stages[1]
    plain = pipe_64.sample_stage("base32", [0, 1], None, pipe_64.settings(steps=3)["base32"], seed=2)
    original = sr.config
    sr.config = dataclasses.replace(original, sampling=dataclasses.replace(original.sampling, truncate=True))
    try:
        alone = pipe_64.sample_stage("base32", [0, 1], None, pipe_64.settings(steps=3)["base32"], seed=2)
    finally:
        sr.config = original
    assert torch.equal(plain, alone) and alone.abs().max() <= 1.0  # a clean sample, not a handed-over z_k


def test_non_finite_samples_are_one_line_errors(pipe_base):
    from cascade.pipeline.cascade_pipeline import NonFiniteSamplesError

    channels = 6 if pipe_base.stages[0].diffusion.model_var_type == "learned_range" else 3

    class Diverged(torch.nn.Module):
        def forward(self, x, t, **kwargs):
            return torch.full((x.shape[0], channels, *x.shape[2:]), float("nan"))

    bare, pipe_base.stages[0].model = pipe_base.stages[0].model, Diverged()
    try:
        with pytest.raises(NonFiniteSamplesError) as err:
            pipe_base([1], steps=2, w=0.0, progress=False)
    finally:
        pipe_base.stages[0].model = bare
    sampler = pipe_base.stages[0].config.sampling.sampler
    assert f"stage base32: the {sampler} sampler produced NaN or infinite values" in _one_line(err)

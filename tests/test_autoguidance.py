"""Autoguidance (Karras et al. 2024): the wrapper against its formula, the sampling settings, the NFE count and
summary, the pipeline and sample_cascade.py guiding base32 with an earlier checkpoint of its run, and every
guide checkpoint the cascade refuses."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import load_tool

import stages
from cascade.checkpoint import list_checkpoints, load_stage
from cascade.config import DistillSpec, SamplingSettings
from cascade.diffusion.guidance import AutoGuidance, autoguidance
from cascade.pipeline.cascade_pipeline import CascadeConfigError, CascadePipeline
from cascade.pipeline.plan import (
    StagePlan,
    describe_stage_plan,
    monitor_settings,
    network_evaluations,
    settings_for,
)
from cascade.pipeline.stage_sampling import guided_model, sample_stage

sample_cascade = load_tool("sample_cascade")


class _Stub(torch.nn.Module):
    """A model whose output is ``value`` everywhere (``channels`` channels) and that records its calls."""

    def __init__(self, value: float, channels: int = 3):
        super().__init__()
        self.value, self.channels, self.calls = value, channels, []

    def forward(self, x, t, **kwargs):
        self.calls.append({"t": t, **kwargs})
        return torch.full((x.shape[0], self.channels, *x.shape[2:]), self.value)


# ---------------------------------------------------------------------------------------------------------------
# The wrapper


@pytest.mark.parametrize(("w", "expected"), [(0.0, -1.0), (1.0, 3.0), (2.0, 7.0), (0.5, 1.0)])
def test_wrapper_is_the_guide_plus_w_times_the_difference(w, expected):
    good, bad = _Stub(3.0), _Stub(-1.0)
    out = autoguidance(good, bad, w)(torch.zeros(2, 3, 4, 4), torch.tensor([5, 9]), y=torch.tensor([0, 1]))
    # D_w = D_0 + w·(D_1 − D_0): w = 0 the guide, w = 1 the good model, w = 2 extrapolates past it.
    torch.testing.assert_close(out, torch.full((2, 3, 4, 4), expected))
    assert len(bad.calls) == (0 if w == 1.0 else 1)  # w = 1: the good model alone, no guide evaluation


def test_both_models_get_the_same_labels_and_sr_inputs_and_the_variance_is_the_good_models():
    good, bad = _Stub(2.0, channels=6), _Stub(0.0, channels=3)  # learned variance only in the good model
    kwargs = {"y": torch.tensor([1, 2]), "x_low": torch.randn(2, 3, 2, 2), "aug_level": torch.tensor([0.1, 0.1])}
    out = AutoGuidance(good, bad, 3.0)(torch.zeros(2, 3, 4, 4), torch.tensor(7), **kwargs)
    assert out.shape == (2, 6, 4, 4)
    torch.testing.assert_close(out[:, :3], torch.full((2, 3, 4, 4), 6.0))  # 0 + 3·(2 − 0)
    torch.testing.assert_close(out[:, 3:], torch.full((2, 3, 4, 4), 2.0))  # the good model's variance channels
    for calls in (good.calls, bad.calls):
        assert calls[0]["t"].tolist() == [7, 7]
        assert all(calls[0][k] is v for k, v in kwargs.items())


def test_guidance_interval_leaves_the_good_model_alone_outside_it():
    good, bad = _Stub(3.0), _Stub(-1.0)
    guided = autoguidance(good, bad, 2.0, interval=(10, 20), num_timesteps=100)
    out = guided(torch.zeros(3, 3, 2, 2), torch.tensor([5, 15, 25]))
    assert out[:, 0, 0, 0].tolist() == [3.0, 7.0, 3.0]  # only t = 15 is inside [10, 20]
    bad.calls.clear()
    outside = guided(torch.zeros(2, 3, 2, 2), torch.tensor([50, 60]))
    assert outside[:, 0, 0, 0].tolist() == [3.0, 3.0] and not bad.calls  # no sample inside: the guide is not run


@pytest.mark.parametrize(("args", "message"), [
    ((-0.5,), "autoguidance weight w must be a finite number >= 0"),
    ((float("nan"),), "autoguidance weight w must be a finite number >= 0"),
    ((2.0, (10, 20)), "guidance_interval needs num_timesteps"),
])
def test_wrapper_refuses_a_bad_weight_or_interval(args, message):
    with pytest.raises(ValueError, match=message):
        AutoGuidance(_Stub(1.0), _Stub(0.0), *args)


def test_wrapper_refuses_the_model_as_its_own_guide():
    model = _Stub(1.0)
    with pytest.raises(ValueError, match="the guide is the model itself"):
        autoguidance(model, model, 2.0)


# ---------------------------------------------------------------------------------------------------------------
# Settings, NFE, summary


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"guide": "bad"}, "guide 'bad' is unknown; use one of cfg, auto"),
    ({"guide": "auto", "w": 1.0}, "guide auto needs guide_checkpoint"),
    ({"guide": "auto", "guide_checkpoint": "", "w": 1.0}, "guide auto needs guide_checkpoint"),
    ({"guide_checkpoint": "runs/g"}, "guide_checkpoint runs/g applies to guide auto only"),
    ({"guide": "auto", "guide_checkpoint": 3}, "sampling.guide_checkpoint must be str or None"),
])
def test_sampling_settings_refuse_bad_guides(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingSettings(**kwargs)


def _base(**sampling) -> object:
    stage = stages.get_stage("base32", "tiny", num_classes=3)
    return dataclasses.replace(stage, sampling=dataclasses.replace(stage.sampling, **sampling))


def test_a_distilled_stage_or_a_classifier_refuses_autoguidance():
    auto = {"guide": "auto", "guide_checkpoint": "runs/g"}
    with pytest.raises(ValueError, match="stage base32 is guidance-distilled: .*guide auto cannot apply"):
        dataclasses.replace(_base(), distill=DistillSpec("guidance", "t", 4.0), sampling=SamplingSettings(w=1.0, **auto))
    classifier = stages.get_stage("classifier32", "tiny", num_classes=3)
    with pytest.raises(ValueError, match="stage classifier32: guide auto applies to base and SR stages only"):
        dataclasses.replace(classifier.sampling, **auto).check_for(classifier)


def test_guided_model_autoguides_at_the_papers_weight_one_plus_w():
    stage = _base(w=2.0, guide="auto", guide_checkpoint="runs/g")
    diffusion = type("D", (), {"num_timesteps": stage.diffusion.num_timesteps})()
    good, bad = _Stub(1.0), _Stub(0.0)
    wrapped = guided_model(good, diffusion, stage, stage.sampling, guide=bad)
    assert isinstance(wrapped, AutoGuidance) and wrapped.w == 3.0 and wrapped.guide is bad
    assert guided_model(good, diffusion, stage, dataclasses.replace(stage.sampling, w=0.0), guide=bad) is good
    with pytest.raises(ValueError, match="stage base32: guide auto needs its guide model"):
        guided_model(good, diffusion, stage, stage.sampling)


def test_nfe_and_summary_name_the_guide():
    settings = SamplingSettings(sampler="ddim", steps=4, w=1.0, guide="auto", guide_checkpoint="runs/g",
                                guidance_interval=(0, 500))
    timesteps = [0, 250, 500, 750]
    assert network_evaluations(settings, timesteps) == 2 + 2 + 2 + 1  # two models inside the interval, one above
    sp = StagePlan("base32", 32, settings, timesteps)
    line = describe_stage_plan(sp, {"guide": "--guide", "w": "--w", "guide_checkpoint": "--guide-ckpt"})
    assert "· autoguidance (--guide) w=1 (--w) guide=runs/g (--guide-ckpt) for t in [0, 500] ·" in line
    assert line.endswith("7 NFE/image")


def test_guide_cfg_drops_a_default_guide_checkpoint_and_monitors_sample_the_model_alone():
    stage = _base(w=2.0, guide="auto", guide_checkpoint="runs/g")
    assert settings_for(stage, stage.sampling, {"guide": "cfg"}).guide_checkpoint is None
    monitor = monitor_settings(stage, 3)
    assert (monitor.guide, monitor.guide_checkpoint, monitor.w, monitor.steps) == ("cfg", None, 0.0, 3)
    with pytest.raises(CascadeConfigError, match="stage base32: guide_checkpoint runs/h applies to guide auto only"):
        settings_for(_base(), _base().sampling, {"guide_checkpoint": "runs/h"})


# ---------------------------------------------------------------------------------------------------------------
# The cascade and the command line, on the tiny runs


def _earlier(run: Path) -> Path:
    """The run's earliest checkpoint (the tiny runs keep two: steps 2 and 3)."""
    found = list_checkpoints(run / "checkpoints")
    assert len(found) >= 2, found
    return found[0]


def test_pipeline_autoguides_a_stage_with_an_earlier_checkpoint_of_its_run(runs_root):
    guide_dir = _earlier(runs_root / "base32")
    pipe = CascadePipeline.from_runs(runs_root, ("base32",))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a few steps leave the output layer near zero: make the good model differ from the guide
        for p in pipe.stages[0].model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    common = {"steps": 2, "w": 1.5}
    plan = pipe.validate([0, 2], pipe.settings(**common, guide="auto", guide_checkpoint=str(guide_dir)), seed=1)
    images = pipe.run(plan, progress=False)["base32"]
    _, guide, _ = load_stage(guide_dir)
    stage = pipe.stages[0]
    expected = sample_stage(stage.model, stage.diffusion, stage.config, plan.stages[0].settings,
                            torch.tensor([0, 2]), seed=1, device=pipe.device, precision=pipe.precision,
                            guide=guide.to(pipe.device, memory_format=torch.channels_last))  # as the pipeline places it
    torch.testing.assert_close(images, expected)
    cfg = pipe.run(pipe.validate([0, 2], pipe.settings(**common), seed=1), progress=False)["base32"]
    assert not torch.allclose(images, cfg, atol=1e-3)  # another guide, other images
    assert pipe.checkpoints()[f"guide:base32:{guide_dir}"]["step"] == 2


def test_command_line_samples_with_an_earlier_checkpoint_as_guide(runs_root, tmp_path, capsys):
    guide_dir = _earlier(runs_root / "base32")
    out = tmp_path / "samples"
    code = sample_cascade.main(["--classes", "0,1", "--stages", "base32", "--steps", "2", "--w", "1",
                                "--guide", "auto", "--guide-ckpt", f"base32={guide_dir}", "--runs", str(runs_root),
                                "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    settings = json.loads((out / "settings.json").read_text())
    base = settings["stages"]["base32"]
    assert (base["guide"], base["guide_checkpoint"], base["w"]) == ("auto", str(guide_dir), 1.0)
    assert settings["checkpoints"][f"guide:base32:{guide_dir}"]["path"] == str(guide_dir)
    assert f"autoguidance (--guide) w=1 (--w) guide={guide_dir} (--guide-ckpt)" in err
    assert "4 NFE/image" in err  # two steps, two models each


def _variant(tmp_path: Path, run: Path, name: str, change) -> Path:
    """A step folder holding only a copy of ``run``'s newest config.json with ``change`` applied to its stage:
    the cascade reads a guide's config (and refuses it) before loading any weights."""
    folder = tmp_path / name / "step-00000001"
    folder.mkdir(parents=True)
    record = json.loads((list_checkpoints(run / "checkpoints")[-1] / "config.json").read_text())
    change(record["stage"])
    (folder / "config.json").write_text(json.dumps(record))
    return folder


_BAD_GUIDES = {
    "resolution": ("sr64", lambda s: s.update(resolution=128), "guide {} has resolution 128 but sr64 has 64"),
    "low_resolution": ("sr64", lambda s: s.update(low_resolution=16), "has low_resolution 16 but sr64 has 32"),
    "classes": ("base32", lambda s: s.update(num_classes=5), "has num_classes 5 but base32 has 3"),
    "prediction": ("base32", lambda s: s["diffusion"].update(prediction="eps"), "has prediction eps but base32 has v"),
    "schedule": ("base32", lambda s: s["diffusion"].update(schedule="linear"), "has schedule linear but base32 has"),
    "timesteps": ("base32", lambda s: s["diffusion"].update(num_timesteps=500), "has num_timesteps 500 but base32"),
    "distilled": ("base32", lambda s: s.update(distill={"method": "guidance", "teacher": "t", "w_max": 4.0}),
                  "guide {} is a guidance-distilled student"),
}


@pytest.mark.parametrize("case", sorted(_BAD_GUIDES))
def test_a_guide_that_differs_from_its_stage_is_refused(runs_root, tmp_path, capsys, case):
    stage, change, message = _BAD_GUIDES[case]
    guide = _variant(tmp_path, runs_root / stage, case, change)
    code = sample_cascade.main(["--classes", "1", "--stages", "base32,sr64", "--guide", "auto",
                                "--guide-ckpt", f"{stage}={guide}", "--w", f"{stage}=1", "--runs", str(runs_root),
                                "--out", str(tmp_path / "o")])
    assert code == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and line.startswith(f"sample_cascade: error: stage {stage}: ")
    assert message.format(guide) in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["--guide", "auto"], "--guide auto needs --guide-ckpt STAGE=PATH"),
    (["--guide", "base32=auto"], "stage base32: guide auto needs guide_checkpoint"),
    (["--guide-ckpt", "base32={runs}/base32"], "stage base32: guide_checkpoint {runs}/base32 applies to guide auto"),
    (["--guide", "auto", "--guide-ckpt", "base32=/nonexistent/guide"],
     ("stage base32: checkpoint path /nonexistent/guide does not exist; pass an existing checkpoint of base32 as its "
      "guide (--guide-ckpt base32=PATH)")),
    (["--guide", "auto", "--guide-ckpt", "base32={runs}/sr64"], "stage base32: guide {runs}/sr64 holds stage sr64"),
    (["--guide", "auto", "--guide-ckpt", "base32={runs}/classifier32"],
     "stage base32: guide {runs}/classifier32 holds a classifier (classifier32)"),
    (["--guide", "auto", "--guide-ckpt", "base32={runs}/base32"],
     "stage base32: guide {runs}/base32 is the stage's own checkpoint"),
    (["--guide", "auto", "--guide-ckpt", "base32"], "--guide-ckpt: malformed 'base32'"),
])
def test_bad_guide_options_give_one_line_and_exit_2(runs_root, tmp_path, capsys, args, message):
    args = [a.format(runs=runs_root) for a in args]
    code = sample_cascade.main(["--classes", "1", "--stages", "base32", "--runs", str(runs_root),
                                "--out", str(tmp_path / "o"), *args])
    assert code == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and message.format(runs=runs_root) in line
    assert not (tmp_path / "o").exists()


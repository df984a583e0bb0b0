"""The one stage sampler (cascade.pipeline.stage_sampling.sample_stage): the cascade, the trainer's sample grids and
the quality benchmark all sample through it, and they draw the same images for the same settings and seed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from cascade.pipeline import stage_sampling
from cascade.pipeline.cascade_pipeline import CascadePipeline

ROOT = Path(__file__).resolve().parents[2]
LEGACY = ROOT / "tests" / "fixtures" / "legacy_runs"


@pytest.fixture(scope="module")
def pipe():
    return CascadePipeline.from_runs(LEGACY, ("base32", "sr64"), precision="fp32")


def _spy(monkeypatch, module) -> list[str]:
    """Route `module`'s `sample_stage` through a recorder of the stage names it samples."""
    calls = []

    def recording(model, diffusion, config, *args, **kwargs):
        calls.append(config.name)
        return stage_sampling.sample_stage(model, diffusion, config, *args, **kwargs)

    monkeypatch.setattr(module, "sample_stage", recording)
    return calls


def test_only_the_stage_sampler_calls_a_sampler_by_name():
    found = [str(path.relative_to(ROOT)) for folder in ("cascade", "tools") for path in sorted((ROOT / folder).rglob("*.py"))
             for line in path.read_text().splitlines() if "SAMPLERS[" in line]
    assert found == ["cascade/pipeline/stage_sampling.py"]


def test_the_cascade_samples_every_stage_through_it(pipe, monkeypatch, one_thread):
    from cascade.pipeline import cascade_pipeline

    calls = _spy(monkeypatch, cascade_pipeline)
    pipe([0, 1], steps=2, seed=1, progress=False)
    pipe.sample_stage("sr64", [2], torch.zeros(1, 3, 32, 32), seed=1)
    assert calls == ["base32", "sr64", "sr64"]


def test_the_trainer_grids_sample_through_it(pipe, monkeypatch, tmp_path, one_thread):
    from cascade.training import sample_grid

    calls = _spy(monkeypatch, sample_grid)
    base, sr = pipe.stages
    sample_grid.write_sample_grid(tmp_path / "base.png", base.model, base.diffusion, base.config, steps=2, count=2,
                                  seed=0, device=torch.device("cpu"))
    inputs = {"x": torch.zeros(2, 3, 64, 64), "x_low": torch.zeros(2, 3, 32, 32), "y": torch.tensor([0, 1])}
    sample_grid.write_sample_grid(tmp_path / "sr.png", sr.model, sr.diffusion, sr.config, steps=2, count=2, seed=0,
                                  device=torch.device("cpu"), inputs=inputs)
    assert calls == ["base32", "sr64"] and (tmp_path / "base.png").is_file() and (tmp_path / "sr.png").is_file()


def test_the_quality_bench_samples_through_it_and_draws_the_cascades_images(pipe, monkeypatch, one_thread):
    from cascade.harness import quality_samplers

    calls = _spy(monkeypatch, quality_samplers)
    (setting,) = quality_samplers.parse_samplers("ddpm3:w=1", default_w=None)
    base = pipe.stages[0]
    labels = torch.tensor([0, 2, 1])
    images, nfe = quality_samplers.sample_images(base.model, base.diffusion, base.config, setting, labels, seed=5,
                                                 batch_size=2)
    assert calls == ["base32"] and nfe == 6  # 3 guided steps: conditional and null-class halves
    settings = dataclasses.replace(base.config.sampling, sampler="ddpm", steps=3, w=1.0)
    # the same noise per sample; batches of 2 and of 3 differ only by the rounding of batched convolutions
    torch.testing.assert_close(images, pipe.sample_stage("base32", labels, settings=settings, seed=5, batch_size=3),
                               rtol=0, atol=1e-5)


def test_every_timestep_when_steps_is_none(pipe):
    from cascade.diffusion.gaussian import GaussianDiffusion
    from cascade.diffusion.schedules import make_betas

    config = pipe.stages[0].config
    diffusion = GaussianDiffusion(make_betas("cosine", 12))
    settings = dataclasses.replace(config.sampling, sampler="ddim", steps=None, w=0.0)
    seen = []

    def zero_eps(x, t, **kwargs):
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    images = stage_sampling.sample_stage(zero_eps, diffusion, config, settings, torch.tensor([1]), seed=0)
    assert images.shape == (1, 3, 32, 32) and seen == list(range(11, -1, -1))


def test_default_chunk_is_per_resolution_on_cpu_and_everything_elsewhere():
    from cascade.pipeline.stage_sampling import default_chunk

    cpu = torch.device("cpu")
    assert [default_chunk(r, cpu) for r in (32, 64, 128, 256, 1024)] == [16, 16, 8, 2, 1]
    assert default_chunk(64, torch.device("cuda")) is None

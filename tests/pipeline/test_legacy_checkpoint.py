"""Checkpoints written by earlier releases keep loading and sampling the same images.

``tests/fixtures/legacy_runs`` holds a base32 and an sr64 run folder written by the code before the package
was split into subpackages (``tests/fixtures/make_legacy_runs.py`` made them), with the samples it drew.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_runs"


def test_a_legacy_checkpoint_loads_and_samples_what_it_sampled(one_thread):
    from cascade import CascadePipeline

    reference = json.loads((FIXTURE / "reference_samples.json").read_text())
    pipe = CascadePipeline.from_runs(FIXTURE, ("base32", "sr64"))
    torch.manual_seed(0)
    images = pipe([0, 2], steps=3, seed=1234, progress=False)
    for key, ref in reference.items():
        got = images[key]
        assert list(got.shape) == ref["shape"], key
        # float32 sums differ across CPU kinds only in the last digits
        assert abs(float(got.double().sum()) - ref["sum"]) <= 1e-3 * max(1.0, abs(ref["sum"])), key
        assert torch.allclose(got.flatten()[:8].double(), torch.tensor(ref["first"], dtype=torch.float64),
                              atol=1e-4), key


def test_a_legacy_checkpoint_rebuilds_its_stage():
    from cascade import load_stage

    config, model, diffusion = load_stage(FIXTURE / "sr64")
    assert config.name == "sr64" and config.low_resolution == 32
    assert config.sampling.steps == 25 and config.sampling.aug_level == 0.03
    assert not model.training and diffusion.num_timesteps == config.diffusion.num_timesteps

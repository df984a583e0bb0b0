"""The "EMA not ready" guard: the warm-up weight's closed forms, the trainer's ``ema`` record and the one-line warning
`checkpoint.load_stage` gives for EMA weights still carried by the learning-rate warm-up."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import SHARD_CLASSES, tiny_run_config

from cascade import checkpoint
from cascade.ema_profiles import (
    WARMUP_WEIGHT_LIMIT,
    classic_ready_step,
    classic_warmup_weight,
    gamma_from_sigma_rel,
    power_ready_step,
    power_warmup_weight,
)
from cascade.training.ema import EMA

# ------------------------------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("decay, warmup, warmup_steps, updates", [
    (0.999, 10.0, 2, 3), (0.9, 10.0, 5, 40), (0.999, 10.0, 100, 6000), (0.99, 1.0, 7, 50), (0.0, 10.0, 2, 4),
])
def test_classic_warmup_weight_is_the_product_of_the_decays_after_the_warmup(decay, warmup, warmup_steps, updates):
    ema = EMA(torch.nn.Linear(1, 1), decay=decay, warmup=warmup)
    product = 1.0
    for n in range(warmup_steps, updates):
        product *= ema.decay_at(n)
    assert classic_warmup_weight(updates, decay, warmup, warmup_steps) == pytest.approx(product, rel=1e-9, abs=1e-300)
    assert classic_warmup_weight(warmup_steps, decay, warmup, warmup_steps) == 1.0


def test_classic_warmup_weight_is_the_share_of_the_warmup_weights_in_the_average():
    """Track an EMA of θ_n = 1 for n ≤ W and 0 after: its value is the share carried by θ_0 … θ_W."""
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.ones_(model.weight)
    ema = EMA(model, decay=0.95, warmup=10.0)
    warmup_steps = 6
    for step in range(1, 60):
        model.weight.data.fill_(1.0 if step <= warmup_steps else 0.0)
        ema.update(model)
        want = classic_warmup_weight(step, 0.95, 10.0, warmup_steps)
        assert float(ema.model.weight) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10])
def test_power_warmup_weight_and_ready_step(sigma_rel):
    gamma, w = gamma_from_sigma_rel(sigma_rel), 40
    for t in (40, 41, 57, 300):
        discrete = sum(k ** (gamma + 1) - (k - 1) ** (gamma + 1) for k in range(1, w + 1)) / t ** (gamma + 1)
        assert power_warmup_weight(t, gamma, w) == pytest.approx(discrete, rel=1e-12)
    ready = power_ready_step(gamma, w)
    assert power_warmup_weight(ready, gamma, w) <= WARMUP_WEIGHT_LIMIT < power_warmup_weight(ready - 1, gamma, w)


@pytest.mark.parametrize("decay, warmup, warmup_steps", [(0.9999, 10.0, 1000), (0.999, 10.0, 100), (0.5, 1.0, 2)])
def test_classic_ready_step_is_the_first_step_at_or_under_the_limit(decay, warmup, warmup_steps):
    ready = classic_ready_step(decay, warmup, warmup_steps)
    weight = classic_warmup_weight(ready, decay, warmup, warmup_steps)
    assert weight <= WARMUP_WEIGHT_LIMIT < classic_warmup_weight(ready - 1, decay, warmup, warmup_steps)


# ---------------------------------------------------------------------------------------------------- the guard


def _train(run: Path, shards: Path, **trainer) -> Path:
    from cascade.training.trainer import train_stage
    from stages import get_stage

    stage = get_stage("base32", "tiny", num_classes=SHARD_CLASSES)
    settings = {"max_steps": 5, "ckpt_every": 0, "ema_sigma_rels": (), "channels_last": False, **trainer}
    return train_stage(stage, tiny_run_config(run, shards, **settings))


@pytest.fixture(scope="module")
def young(tmp_path_factory, synthetic_shards) -> Path:
    """5 steps, all of them warm-up: the EMA is the warm-up's weights alone."""
    return _train(tmp_path_factory.mktemp("young") / "base32", synthetic_shards, warmup_steps=5)


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if "not ready" in line]


def test_the_guard_fires_once_on_a_young_checkpoint_and_names_the_ready_step(young, capsys):
    record = checkpoint.load_config(young)["ema"]
    ready = classic_ready_step(0.9999, 10.0, 5)
    assert record == {"kind": "classic", "decay": 0.9999, "warmup": 10.0, "num_updates": 5, "warmup_steps": 5,
                      "warmup_weight": 1.0, "threshold": WARMUP_WEIGHT_LIMIT, "ready_step": ready}
    capsys.readouterr()
    checkpoint.load_stage(young)
    checkpoint.load_stage(young)  # once per checkpoint
    checkpoint.load_stage(young, weights="model")  # the raw weights: nothing to say
    lines = _warnings(capsys.readouterr().err)
    assert lines == [(f"warning: {young.resolve()}: its EMA weights are not ready: 100% of their weight is on the "
                     f"first 5 steps (the learning-rate warm-up); ready at step {ready}; using the EMA weights anyway "
                     "(train past that step; from Python, load_stage(..., weights='model') loads the raw weights)")]


def test_a_checkpoint_without_the_record_is_judged_by_its_trainer_settings(young, tmp_path, capsys):
    old = tmp_path / "old" / young.name
    shutil.copytree(young, old)
    config = json.loads((old / "config.json").read_text())
    del config["ema"]
    (old / "config.json").write_text(json.dumps(config))
    assert checkpoint.ema_record(old)["ready_step"] == classic_ready_step(0.9999, 10.0, 5)
    capsys.readouterr()
    checkpoint.load_stage(old)
    assert len(_warnings(capsys.readouterr().err)) == 1
    del config["train"]  # nothing to judge by: silent
    (old / "config.json").write_text(json.dumps(config))
    assert checkpoint.ema_record(old) is None


def test_the_guard_is_silent_on_a_trained_checkpoint(synthetic_shards, tmp_path, capsys):
    """A short warm-up and a short EMA: after 5 steps 0.5⁴ of the average is left on θ_0, θ_1."""
    ckpt = _train(tmp_path / "run", synthetic_shards, warmup_steps=1, ema_decay=0.5, ema_warmup=1.0)
    record = checkpoint.load_config(ckpt)["ema"]
    assert record["warmup_weight"] == pytest.approx(0.5 ** 4) and record["ready_step"] == 3
    capsys.readouterr()
    checkpoint.load_stage(ckpt)
    assert _warnings(capsys.readouterr().err) == []


def test_posthoc_record_message():
    message = checkpoint.ema_not_ready_message(Path("ckpt"), {
        "kind": "posthoc", "sigma_rel": 0.05, "warmup_steps": 100, "warmup_weight": 0.62, "ready_step": 120})
    assert message == ("ckpt: its post-hoc EMA σ_rel=0.05 weights are not ready: 62% of their weight is on the first "
                       "100 steps (the learning-rate warm-up); ready at step 120; using the EMA weights anyway (train "
                       "past that step; from Python, load_stage(..., weights='model') loads the raw weights)")
    assert checkpoint.ema_not_ready_message(Path("ckpt"), {"warmup_weight": 0.25}) is None

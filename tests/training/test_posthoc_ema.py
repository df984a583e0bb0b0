"""Power-function EMAs, their snapshots and post-hoc reconstruction (EDM2 §3): the closed forms, the trainer's
snapshots and exact resume, and tools/posthoc_ema.py."""

from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARD_CLASSES, tiny_run_config
from safetensors import safe_open
from torch import nn

from cascade import checkpoint
from cascade.ema_profiles import gamma_from_sigma_rel, power_profile_dot, sigma_rel_from_gamma
from cascade.training.ema import PowerEMA
from cascade.training.posthoc_ema import (
    SnapshotCadence,
    list_snapshots,
    posthoc_ema,
    reconstruct,
    reconstruct_many,
    solve_coefficients,
)

ROOT = Path(__file__).resolve().parents[2]
SIGMA_RELS = (0.05, 0.10)  # the trainer's default profiles (the shared fixtures turn them off)


class Scalar(nn.Module):
    def __init__(self, value: float = 0.0):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([value], dtype=torch.float64))
        self.register_buffer("seen", torch.zeros(1))


# ------------------------------------------------------------------------------------------------ closed forms


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.1, 0.2, 0.29])
def test_sigma_rel_gamma_round_trip(sigma_rel):
    gamma = gamma_from_sigma_rel(sigma_rel)
    assert sigma_rel_from_gamma(gamma) == pytest.approx(sigma_rel, rel=1e-12)
    # the cubic of EDM2 eq. 126 holds at the solution
    s = sigma_rel ** -2
    assert gamma ** 3 + 7 * gamma ** 2 + (16 - s) * gamma + 12 - s == pytest.approx(0.0, abs=1e-6 * s)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 6.94, 16.97, 100.0])
def test_gamma_sigma_rel_round_trip(gamma):
    assert gamma_from_sigma_rel(sigma_rel_from_gamma(gamma)) == pytest.approx(gamma, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.3, 0.5])
def test_sigma_rel_out_of_range_is_one_clear_error(bad):
    with pytest.raises(ValueError, match=r"must be in \(0, 0.3\)"):
        gamma_from_sigma_rel(bad)


@pytest.mark.parametrize("a, b", [((100.0, 6.94), (60.0, 2.0)), ((40.0, 16.97), (40.0, 6.94)),
                                  ((10.0, 0.5), (90.0, 16.97))])
def test_profile_inner_product_matches_numerical_integration(a, b):
    (t_a, g_a), (t_b, g_b) = a, b
    tau = torch.linspace(0.0, min(t_a, t_b), 400_001, dtype=torch.float64)
    p_a = (g_a + 1) / t_a * (tau / t_a) ** g_a
    p_b = (g_b + 1) / t_b * (tau / t_b) ** g_b
    numeric = float(torch.trapezoid(p_a * p_b, tau))
    assert power_profile_dot(t_a, g_a, t_b, g_b) == pytest.approx(numeric, rel=1e-7)
    assert power_profile_dot(t_b, g_b, t_a, g_a) == pytest.approx(numeric, rel=1e-7)


def test_power_ema_of_a_linear_ramp_is_the_closed_form():
    """θ_k = k for k = 1..T: the power EMA is Σ_k k (k^(γ+1) − (k−1)^(γ+1)) / T^(γ+1); a skipped update (apply=0)
    neither moves it nor advances t; buffers are copied."""
    model = Scalar(-5.0)  # the starting copy carries no weight (β_1 = 0)
    ema = PowerEMA(model, (0.05, 0.2))
    steps = 30
    for k in range(1, steps + 1):
        with torch.no_grad():
            model.theta.fill_(k)
            model.seen.fill_(k)
        ema.update(model, apply=torch.tensor(True))
        with torch.no_grad():
            model.theta.fill_(1e6)  # a non-finite step's weights: skipped
        ema.update(model, apply=torch.tensor(False))
    assert ema.num_updates == steps
    for averages, gamma in zip(ema.averages, ema.gammas):
        g = gamma + 1
        expected = sum(k * (k ** g - (k - 1) ** g) for k in range(1, steps + 1)) / steps ** g
        assert float(averages["theta"]) == pytest.approx(expected, rel=1e-12)
    assert float(ema.profile_state_dict(0)["seen"]) == steps


def test_power_ema_state_round_trip_continues_exactly():
    model = Scalar()
    a, b = PowerEMA(model, (0.1,)), PowerEMA(model, (0.1,))
    for k in range(1, 6):
        model.theta.data.fill_(k * k)
        a.update(model)
    b.load_state_dict(a.state_dict())
    for k in range(6, 9):
        model.theta.data.fill_(k * k)
        a.update(model)
        b.update(model)
    assert b.num_updates == a.num_updates == 8
    assert torch.equal(a.averages[0]["theta"], b.averages[0]["theta"])
    with pytest.raises(ValueError, match="tracks sigma_rels"):
        PowerEMA(model, (0.05,)).load_state_dict(a.state_dict())


def test_snapshot_cadence():
    auto = SnapshotCadence("auto", max_steps=3200, max_seconds=0)
    assert auto.steps == 100 and auto.seconds is None
    assert [s for s in range(1, 501) if auto.due(s)] == [100, 200, 300, 400, 500]
    assert auto.due(7, last=True)
    short = SnapshotCadence("auto", max_steps=40, max_seconds=64)  # a smoke test: no snapshot every step
    assert short.steps == 50 and short.seconds == 2.0
    short.since -= 10.0  # the time trigger has passed, but fewer than 50 steps since the start
    assert [s for s in range(1, 40) if short.due(s)] == [] and short.due(40, last=True)
    assert SnapshotCadence(5, max_steps=640, max_seconds=64).seconds is None


def test_reconstruction_of_an_intermediate_width_is_close_on_a_smooth_trajectory(tmp_path):
    """θ_t = sin(t/40) + t/100 (smooth), snapshots of σ_rel 0.05 and 0.15 every 10 updates: the post-hoc EMA of
    σ_rel 0.10 is close to a directly tracked one (the fit's error, not float error), and exact at 0.15."""
    from cascade.training.posthoc_ema import write_snapshot

    model = Scalar()
    tracked = PowerEMA(model, (0.05, 0.15))
    direct = PowerEMA(model, (0.10,))
    for t in range(1, 201):
        model.theta.data.fill_(math.sin(t / 40) + t / 100)
        tracked.update(model)
        direct.update(model)
        if t % 10 == 0:
            write_snapshot(tmp_path, tracked, t)
    got = float(reconstruct(tmp_path, 0.10)["theta"])
    want, first = float(direct.averages[0]["theta"]), float(tracked.averages[0]["theta"])
    assert abs(got - want) < 0.02 * abs(want - first)  # far closer than the neighbouring tracked width
    assert float(reconstruct(tmp_path, 0.15)["theta"]) == pytest.approx(float(tracked.averages[1]["theta"]),
                                                                        rel=1e-6)
    # an earlier step uses only the snapshots up to it
    at_100 = posthoc_ema(tmp_path, [0.15], step=100)[0]
    assert at_100.num_updates == 100 and len(at_100.snapshots) == 10


def test_coefficients_pick_a_tracked_profile():
    profiles = [(t, g) for t in (10.0, 20.0, 30.0) for g in (16.97, 6.94)]
    x = solve_coefficients(profiles, (30.0, 6.94))
    assert x[-1] == pytest.approx(1.0, abs=1e-6) and sum(abs(v) for v in x[:-1]) < 1e-5


# ------------------------------------------------------------------------------------------ the trainer's snapshots

STEPS = 8


def _train(run_dir: Path, shards: Path, **trainer):
    from cascade.training.trainer import train_stage
    from stages import get_stage

    stage = get_stage("base32", "tiny", num_classes=SHARD_CLASSES)
    settings = {"max_steps": STEPS, "ckpt_every": 4, "ema_snapshot_every": 2, "channels_last": False, **trainer}
    settings.setdefault("ema_sigma_rels", SIGMA_RELS)  # the shared fixtures turn post-hoc EMA off
    return train_stage(stage, tiny_run_config(run_dir, shards, **settings))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_shards) -> Path:
    run = tmp_path_factory.mktemp("posthoc") / "base32"
    _train(run, synthetic_shards, keep_last=1)
    return run


def _power_state(run: Path) -> dict:
    return checkpoint.load_training_state(run)["power_ema"]


def test_trainer_writes_snapshots_and_reconstruction_matches_the_tracked_ema(trained):
    snaps = list_snapshots(trained)
    assert [s.step for s in snaps] == [2, 4, 6, 8]
    assert [s.num_updates for s in snaps] == [2, 4, 6, 8]
    assert snaps[-1].sigma_rels == (0.05, 0.10)
    with safe_open(str(snaps[-1].path), framework="pt") as f:
        meta = f.metadata()
        assert json.loads(meta["gammas"]) == pytest.approx([gamma_from_sigma_rel(0.05), gamma_from_sigma_rel(0.1)])
        names = f.keys()  # a safe_open handle is not iterable
        assert all(f.get_tensor(k).dtype == torch.float32 for k in names if not k.startswith("buffers/"))
    state = _power_state(trained)
    assert state["num_updates"] == STEPS and state["sigma_rels"] == [0.05, 0.10]
    many = reconstruct_many(trained, [0.05, 0.10])
    for k, sigma_rel in enumerate((0.05, 0.10)):
        tracked = state["averages"][k]
        got = many[sigma_rel]
        assert set(tracked) <= set(got)
        for name, value in tracked.items():
            torch.testing.assert_close(got[name], value.float(), rtol=1e-5, atol=1e-6)
    # the reconstruction loads into the stage's network
    _, model, _ = checkpoint.load_stage(trained, weights="model")
    model.load_state_dict(many[0.05])


def test_exact_resume_continues_the_power_emas(trained, synthetic_shards, tmp_path):
    """Stopped by a signal at step 3 and resumed: the same power-EMA state and snapshots as the uninterrupted run."""
    import signal

    from cascade.training.trainer import StageTrainer, TrainingInterrupted
    from stages import get_stage

    stage = get_stage("base32", "tiny", num_classes=SHARD_CLASSES)
    config = tiny_run_config(tmp_path, synthetic_shards, max_steps=STEPS, ckpt_every=4, ema_snapshot_every=2,
                             ema_sigma_rels=SIGMA_RELS,
                             channels_last=False)
    first = StageTrainer(stage, config)
    real_step = first._train_step

    def step_then_stop():
        real_step()
        if first.step == 3:
            signal.raise_signal(signal.SIGTERM)

    first._train_step = step_then_stop
    with pytest.raises(TrainingInterrupted):
        first.run()
    StageTrainer(stage, config).run()
    resumed, straight = _power_state(tmp_path), _power_state(trained)
    assert resumed["num_updates"] == straight["num_updates"] == STEPS
    for a, b in zip(resumed["averages"], straight["averages"]):
        for name in a:
            assert torch.equal(a[name], b[name]), name
    assert [s.step for s in list_snapshots(tmp_path)] == [2, 4, 6, 8]


def test_a_checkpoint_without_power_ema_state_resumes_with_fresh_ones(trained, synthetic_shards, tmp_path, capsys):
    import shutil

    from cascade.training.trainer import StageTrainer
    from stages import get_stage

    run = tmp_path / "old"
    shutil.copytree(trained / "checkpoints", run / "checkpoints")
    ckpt = checkpoint.resolve_checkpoint(run)
    state = checkpoint.load_training_state(ckpt)
    del state["power_ema"]
    torch.save(state, ckpt / checkpoint.TRAINING_STATE_FILE)
    stage = get_stage("base32", "tiny", num_classes=SHARD_CLASSES)
    config = tiny_run_config(run, synthetic_shards, max_steps=STEPS + 2, ckpt_every=4, ema_snapshot_every=2,
                             ema_sigma_rels=SIGMA_RELS,
                             channels_last=False)
    StageTrainer(stage, config).run()
    assert f"start afresh at step {STEPS}" in capsys.readouterr().err
    snaps = list_snapshots(run)
    assert [(s.step, s.num_updates, s.start_step) for s in snaps] == [(STEPS + 2, 2, STEPS)]
    result = posthoc_ema(run, [0.10])[0]
    assert result.start_step == STEPS and len(result.snapshots) == 1


def test_power_emas_off():
    from cascade.training.trainer_config import TrainerConfig

    assert TrainerConfig(ema_sigma_rels=[]).ema_sigma_rels == ()
    with pytest.raises(ValueError, match=r"trainer.ema_sigma_rels: 0.3 is out of range; each σ_rel must be in"):
        TrainerConfig(ema_sigma_rels=[0.05, 0.3])
    with pytest.raises(ValueError, match="trainer.ema_snapshot_every must be auto or a number of steps >= 1"):
        TrainerConfig(ema_snapshot_every=0)


# ------------------------------------------------------------------------------------------------------- the tool


def _tool(argv, monkeypatch) -> int:
    monkeypatch.setattr(sys, "argv", [str(ROOT / "tools" / "posthoc_ema.py"), *argv])
    try:
        runpy.run_path(str(ROOT / "tools" / "posthoc_ema.py"), run_name="__main__")
    except SystemExit as exc:
        return exc.code
    return 0


def test_tool_writes_checkpoints_that_load_stage_loads(trained, tmp_path, monkeypatch, capsys):
    out = tmp_path / "one"
    assert _tool([str(trained), "--sigma-rel", "0.1", "--out", str(out)], monkeypatch) == 0
    record = checkpoint.load_config(out)
    assert record["ema"]["kind"] == "posthoc" and record["ema"]["sigma_rel"] == 0.1
    assert record["ema"]["snapshots"] == 4 and record["step"] == STEPS and record["ema"]["checkpoint_step"] == STEPS
    _, model, _ = checkpoint.load_stage(out)
    want = reconstruct(trained, 0.1)
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    # an earlier step into the same folder: written and kept beside the later one, and the folder loads it
    assert _tool([str(trained), "--sigma-rel", "0.1", "--step", "4", "--out", str(out)], monkeypatch) == 0
    assert [p.name for p in checkpoint.list_checkpoints(out / "checkpoints")] == ["step-00000004", "step-00000008"]
    assert checkpoint.load_config(out)["step"] == 4
    # several widths, by default into <run>/posthoc/sigma-X.XXX
    assert _tool([str(trained), "--sigma-rel", "0.03,0.05", "--step", "4"], monkeypatch) == 0
    for sigma_rel in (0.03, 0.05):  # step 4's checkpoint is gone (keep_last=1): the model from step 8
        record = checkpoint.load_config(trained / "posthoc" / f"sigma-{sigma_rel:.3f}")
        assert record["step"] == 4 and record["ema"]["checkpoint_step"] == STEPS
        assert record["ema"]["sigma_rel"] == sigma_rel
    assert "σ_rel=0.03" in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("no_snapshots", ("holds no EMA snapshots (ema_snapshots/step-*.safetensors): trained with "
                     "trainer.ema_sigma_rels=[]?")),
    ("range", "--sigma-rel: 0.4 is out of range; each σ_rel must be in (0, 0.3)"),
    ("unwritable", "is a file; choose another --out"),
    ("step", "has no EMA snapshot at step 3"),
])
def test_tool_errors_are_one_line(case, message, trained, tmp_path, monkeypatch, capsys):
    run, extra = trained, []
    if case == "no_snapshots":
        run = tmp_path / "bare"
        (run / "checkpoints").mkdir(parents=True)
    sigma = "0.4" if case == "range" else "0.1"
    if case == "unwritable":
        (tmp_path / "file").write_text("")
        extra = ["--out", str(tmp_path / "file" / "x")]
    if case == "step":
        extra = ["--step", "3", "--out", str(tmp_path / "o")]
    code = _tool([str(run), "--sigma-rel", sigma, *extra], monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("posthoc_ema: error: "), err
    assert message in err[0]


def test_snapshots_are_not_subject_to_keep_last(trained):
    assert [p.name for p in checkpoint.list_checkpoints(trained / "checkpoints")] == ["step-00000008"]
    assert len(list_snapshots(trained)) == 4


def test_power_ema_weights_load_into_a_fresh_sr_model():
    """An SR stage's network holds a non-persistent buffer (the conditioning skip's schedule table): the power EMA's
    weights, like a checkpoint's, carry only the state dict's keys, so they load strictly into a fresh model."""
    from cascade.nets.build import build_model
    from stages import get_stage

    stage = get_stage("sr64", "tiny", num_classes=SHARD_CLASSES)
    model = build_model(stage)
    assert set(dict(model.named_buffers())) - set(model.state_dict())  # the case: a buffer that is not a weight
    ema = PowerEMA(model, (0.05,))
    ema.update(model)
    assert not set(dict(model.named_buffers())) & set(ema.buffers)  # its buffers are all schedule tables
    build_model(stage).load_state_dict(ema.profile_state_dict(0))  # strict: no unexpected key

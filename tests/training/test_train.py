"""The stage trainer (cascade.training.trainer) and its command line (tools/train_stage.py), on CPU."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SHARD_CLASSES, tiny_run_config
from PIL import Image
from torch import nn

from cascade import checkpoint
from cascade.training.ema import EMA
from cascade.training.trainer_config import DataConfig, RunConfig, TrainerConfig

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "train_stage.py"


def _env():
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _tool(*args, cwd=ROOT, timeout=120):
    return subprocess.run([sys.executable, str(TOOL), *args], check=False, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------- EMA


class _WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))
        self.register_buffer("count", torch.zeros(()))


def test_ema_decay_warmup_and_buffers_copied():
    model = _WithBuffer()
    ema = EMA(model, decay=0.9, warmup=10)
    assert ema.decay_at(0) == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    assert ema.decay_at(1000) == pytest.approx(0.9)  # capped at decay
    expected = torch.zeros(3)
    for n in range(4):
        model.w.data.fill_(float(n + 1))
        model.count.fill_(float(n + 1))
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * (n + 1)
    torch.testing.assert_close(ema.model.w.data, expected)
    assert float(ema.model.count) == 4.0  # copied, not averaged
    assert not ema.model.w.requires_grad


def test_ema_skip_flag_leaves_average_unchanged():
    model = _WithBuffer()
    ema = EMA(model, decay=0.5, warmup=1)
    model.w.data.fill_(2.0)
    ema.update(model, apply=torch.tensor(False))
    assert torch.equal(ema.model.w.data, torch.zeros(3))
    ema.update(model, apply=torch.tensor(True))
    torch.testing.assert_close(ema.model.w.data, torch.ones(3))  # 0.5·0 + 0.5·2


def test_ema_skipped_update_does_not_advance_the_warmup():
    model = _WithBuffer()
    ema = EMA(model, decay=0.99, warmup=10)
    model.w.data.fill_(1.0)
    for _ in range(3):
        ema.update(model, apply=torch.tensor(False))
    assert ema.num_updates == 0 and torch.equal(ema.model.w.data, torch.zeros(3))
    ema.update(model, apply=torch.tensor(True))
    assert ema.num_updates == 1
    torch.testing.assert_close(ema.model.w.data, torch.full((3,), 1 - ema.decay_at(0)))  # first warm-up decay


def test_ema_rejects_bad_decay():
    with pytest.raises(ValueError, match="decay"):
        EMA(_WithBuffer(), decay=1.0)


# ----------------------------------------------------------------------------------------------- config


def test_trainer_config_rejects_bad_values():
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainerConfig(mixed_precision="fp32")
    with pytest.raises(ValueError, match="trainer.batch_size"):
        TrainerConfig(batch_size=0)
    with pytest.raises(ValueError, match="trainer.max_step"):
        RunConfig.from_dict({"run_dir": "r", "data": {"root": "d"}, "trainer": {"max_step": 3}})
    assert TrainerConfig(lr=1).lr == 1.0
    for bad in (1, 0, "yes"):  # 1 == True in Python: only "auto" and real booleans are settings
        with pytest.raises(ValueError, match="trainer.channels_last must be auto, true or false"):
            TrainerConfig(channels_last=bad)
        with pytest.raises(ValueError, match="data.hflip must be auto, true or false"):
            DataConfig(root="d", hflip=bad)
    assert TrainerConfig(channels_last=True).channels_last is True and DataConfig(root="d", hflip=False).hflip is False


def test_mixed_precision_auto_and_label_dropout():
    from cascade.device import resolve_mixed_precision
    from cascade.training.losses import drop_labels

    assert resolve_mixed_precision("fp16", torch.device("cpu")) == "fp16"
    assert resolve_mixed_precision("auto", torch.device("cpu")) in ("no", "bf16")
    y = torch.randint(0, 5, (4000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(drop_labels(y, 0.0, 5), y)
    dropped = drop_labels(y, 0.1, 5)
    assert torch.equal(dropped[dropped != 5], y[dropped != 5])
    assert 0.07 < (dropped == 5).float().mean() < 0.13


def test_compile_without_a_compiler_is_one_clear_error(monkeypatch):
    import shutil

    from cascade.training.runtime import check_compile_available

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match=r"^trainer.compile=true needs a C\+\+ compiler .*trainer.compile=false$"):
        check_compile_available(torch.device("cpu"))


def test_auto_precision_follows_native_bf16(monkeypatch):
    from cascade import device

    monkeypatch.setattr(device, "native_bf16", lambda device: True)
    assert device.resolve_mixed_precision("auto", torch.device("cpu")) == "bf16"
    monkeypatch.setattr(device, "native_bf16", lambda device: False)
    assert device.resolve_mixed_precision("auto", torch.device("cpu")) == "no"
    assert device.resolve_mixed_precision("bf16", torch.device("cpu")) == "bf16"


def test_precisions_change_between_runs_in_one_process(synthetic_shards, tmp_path):
    """bf16, then full precision, then bf16 again in one process (a notebook, the demo, this suite): each run
    trains in its own precision instead of failing on accelerate's process-wide state."""
    import stages
    from cascade.training.trainer import StageTrainer

    stage = stages.get_stage("base32", "tiny", num_classes=SHARD_CLASSES)
    for i, precision in enumerate(("bf16", "no", "bf16")):
        run = tiny_run_config(tmp_path / f"run{i}", synthetic_shards, max_steps=1, mixed_precision=precision)
        trainer = StageTrainer(stage, run)
        assert trainer.accelerator.mixed_precision == precision
        final = trainer.run()
        assert checkpoint.load_config(final)["train"]["mixed_precision_resolved"] == precision
        assert _records(run.run_dir)[-1]["loss"] > 0


# ----------------------------------------------------------------------------------------------- training


def test_every_stage_trains_a_few_steps(tiny_runs):
    import stages

    assert set(tiny_runs) == set(stages.STAGE_NAMES)
    for name, run_dir in tiny_runs.items():
        records = _records(run_dir)
        assert [r["step"] for r in records] == [1, 2, 3], name
        for r in records:
            assert all(k in r for k in ("loss", "loss_q0", "loss_q3", "lr", "grad_norm", "img_per_s", "nan_skips"))
            assert r["nan_skips"] == 0 and r["loss"] > 0 and r["grad_norm"] > 0, (name, r)
        latest = checkpoint.latest_checkpoint(run_dir)
        assert latest.name == "step-00000003", name
        assert [p.name for p in checkpoint.list_checkpoints(run_dir / "checkpoints")] == \
            ["step-00000002", "step-00000003"]
        record = checkpoint.load_config(latest)
        assert record["stage"]["name"] == name and record["train"]["trainer"]["batch_size"] == 2
        state = checkpoint.load_training_state(latest)
        assert state["step"] == 3 and state["data"]["segment_start"] == 3 and len(state["rng"]) == 1
        model_w, ema_w = checkpoint.load_weights(latest, "model"), checkpoint.load_weights(latest, "ema")
        assert model_w.keys() == ema_w.keys()
        assert any(not torch.equal(model_w[k], ema_w[k]) for k in model_w), name


def test_logged_lr_is_the_rate_the_step_used(tiny_runs):
    """warmup_steps=2: step 1 trains at lr/2, steps 2 and 3 at lr (the scheduler's rate before it steps)."""
    records = _records(tiny_runs["base32"])
    lr = checkpoint.load_config(tiny_runs["base32"])["train"]["trainer"]["lr"]
    assert [r["lr"] for r in records] == pytest.approx([lr / 2, lr, lr])


def test_layout_probe_times_copies_and_restores_the_rng():
    import stages
    from cascade.nets.build import build_diffusion, build_model
    from cascade.training.losses import make_stage_loss
    from cascade.training.memory_format import MIN_GAIN, probe_channels_last
    from cascade.training.timestep_sampler import UniformSampler

    torch.manual_seed(0)
    stage = stages.get_stage("base32", "tiny", num_classes=3)
    model, diffusion = build_model(stage), build_diffusion(stage)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn = make_stage_loss(stage, diffusion, UniformSampler(diffusion.num_timesteps), 0.1)
    batch = {"x": torch.rand(2, 3, 32, 32) * 2 - 1, "y": torch.tensor([0, 2])}
    torch.manual_seed(5)
    want = torch.rand(4)
    torch.manual_seed(5)
    probe = probe_channels_last(model, loss_fn, batch, trials=1)
    assert torch.equal(torch.rand(4), want)  # the global RNG is as before: the run does not depend on the probe
    assert probe.contiguous_s > 0 and probe.channels_last_s > 0
    assert probe.channels_last == (probe.channels_last_s < (1 - MIN_GAIN) * probe.contiguous_s)
    assert "channels_last=auto" in probe.describe() and "using" in probe.describe()
    for k, v in model.state_dict().items():  # copies were timed: the weights, grads and layout are untouched
        assert torch.equal(v, before[k]) and v.is_contiguous()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="trials must be >= 1"):
        probe_channels_last(model, loss_fn, batch, trials=0)


def test_channels_last_auto_measures_long_cpu_runs_and_resume_keeps_the_layout(synthetic_shards, tmp_path):
    import stages
    from cascade.training.memory_format import PROBE_MIN_STEPS
    from cascade.training.trainer import StageTrainer

    stage = stages.get_stage("base32", "tiny", num_classes=SHARD_CLASSES)
    short = StageTrainer(stage, tiny_run_config(tmp_path / "short", synthetic_shards, channels_last="auto"))
    assert short.layout_probe is None and short.channels_last is False  # 3 steps: not worth measuring
    budget = StageTrainer(stage, tiny_run_config(tmp_path / "budget", synthetic_shards, channels_last="auto",
                                                 max_seconds=60.0))
    assert budget.layout_probe is not None and budget.channels_last == budget.layout_probe.channels_last
    long_cfg = tiny_run_config(tmp_path / "long", synthetic_shards, channels_last="auto", max_steps=PROBE_MIN_STEPS,
                               ckpt_every=0)
    assert StageTrainer(stage, long_cfg).layout_probe is not None
    # a checkpoint records the layout; a resumed run keeps it without measuring, whichever way it went
    ran = StageTrainer(stage, tiny_run_config(tmp_path / "run", synthetic_shards, channels_last=True, max_steps=2))
    ran.run()
    assert checkpoint.load_training_state(checkpoint.latest_checkpoint(tmp_path / "run"))["channels_last"] is True
    resumed = StageTrainer(stage, tiny_run_config(tmp_path / "run", synthetic_shards, channels_last="auto",
                                                  max_steps=2 + PROBE_MIN_STEPS))
    assert resumed.layout_probe is None and resumed.channels_last is True
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in resumed.model.parameters())


def test_checkpoint_rebuilds_the_stage_alone(synthetic_shards, tmp_path):
    """load_stage on a copied step folder (no run dir, no shards) gives the trained EMA model's outputs."""
    import stages
    from cascade.training.trainer import StageTrainer

    stage = stages.get_stage("sr64", "tiny", num_classes=SHARD_CLASSES)
    trainer = StageTrainer(stage, tiny_run_config(tmp_path / "run", synthetic_shards, max_steps=2, sample_every=2,
                                                  sample_steps=2, sample_count=2))
    final = trainer.run()
    with Image.open(tmp_path / "run" / "samples" / "step-00000002.png") as grid:
        assert grid.size == (2 * 66 + 2, 3 * 66 + 2)  # 2 val inputs × (low-res, sample, real), 2 px padding
    alone = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(final, alone)
    cfg, model, diffusion = checkpoint.load_stage(alone)
    assert cfg == stage and not model.training
    assert diffusion.num_timesteps == trainer.diffusion.num_timesteps
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 64, generator=g)
    x_low = torch.randn(2, 3, 32, 32, generator=g)
    kwargs = {"y": torch.tensor([0, 2]), "x_low": x_low, "aug_level": torch.tensor([0.0, 0.3])}
    t = torch.tensor([1, 5])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, **kwargs), trainer.ema.model(x, t, **kwargs), rtol=0, atol=0)
    # run() closes the trainer (trackers, process group, distributed wrappers); a second run is one clear error
    assert trainer.model is trainer.accelerator.unwrap_model(trainer.model) and trainer.train_step is None
    with pytest.raises(RuntimeError, match="already run"):
        trainer.run()


def test_nonfinite_losses_are_skipped_then_stop(synthetic_shards, tmp_path, monkeypatch):
    import stages
    from cascade.training import trainer as train

    real_make_loss = train.make_stage_loss
    calls = {"n": 0}
    bad_calls = {2, 3}  # steps 2 and 3 of the first run

    def flaky_make_loss(*args, **kwargs):
        real_loss = real_make_loss(*args, **kwargs)

        def flaky_loss(model, batch):
            calls["n"] += 1
            out = real_loss(model, batch)
            if calls["n"] in bad_calls:
                out["loss"] = out["loss"] * float("nan")
            return out

        return flaky_loss

    monkeypatch.setattr(train, "make_stage_loss", flaky_make_loss)
    stage = stages.get_stage("base32", "tiny", num_classes=SHARD_CLASSES)
    final = train.train_stage(stage, tiny_run_config(tmp_path / "skip", synthetic_shards, max_steps=4,
                                                     max_nan_in_row=3))
    assert [r["nan_skips"] for r in _records(tmp_path / "skip")] == [0, 1, 2, 2]
    state = checkpoint.load_training_state(final)
    assert all(int(s["step"]) == 2 for s in state["optimizer"]["state"].values())  # 4 steps, 2 skipped
    assert state["nan"] == {"total": 2, "in_row": 0}
    assert state["ema_num_updates"] == 2  # the two skipped steps did not advance the EMA warm-up

    calls["n"] = 0
    bad_calls.clear()
    bad_calls.update(range(3, 100))  # every step from 3 on
    run = tiny_run_config(tmp_path / "stop", synthetic_shards, max_steps=10, max_nan_in_row=2, ckpt_every=2,
                          log_every=5)
    with pytest.raises(train.NonFiniteLossError, match=r"2 steps in a row.*step-00000002"):
        train.train_stage(stage, run)
    assert checkpoint.latest_checkpoint(tmp_path / "stop").name == "step-00000002"


def test_missing_resolution_and_resume_never_are_clear_errors(synthetic_shards, tiny_runs, tmp_path):
    import stages
    from cascade.training.trainer import StageTrainer

    low = tmp_path / "low"
    low.mkdir()
    info = json.loads((synthetic_shards / "dataset.json").read_text())
    info["resolutions"] = [32, 64]
    (low / "dataset.json").write_text(json.dumps(info))
    for name in info["shards"]["train"] + info["shards"]["val"]:
        (low / name).symlink_to(synthetic_shards / name)
    stage = stages.get_stage("sr128", "tiny", num_classes=SHARD_CLASSES)
    with pytest.raises(ValueError, match=r"missing \[128\]"):
        StageTrainer(stage, tiny_run_config(tmp_path / "r", low))
    base = stages.get_stage("base32", "tiny", num_classes=SHARD_CLASSES)
    run = tiny_run_config(tiny_runs["base32"], synthetic_shards)
    with pytest.raises(ValueError, match="already holds checkpoint"):
        StageTrainer(base, dataclasses.replace(run, resume="never"))
    other = stages.get_stage("sr64", "tiny", num_classes=SHARD_CLASSES)
    with pytest.raises(ValueError, match="stage configuration differs"):
        StageTrainer(other, run)


# ----------------------------------------------------------------------------------------------- command line

def _cli_args(shards, run_dir, **trainer):
    base = {"batch_size": 2, "log_every": 1, "sample_every": 0, "eval_every": 0, "progress": "false",
            "warmup_steps": 2}
    return ([f"data.root={shards}", f"run_dir={run_dir}", "size=tiny", "data.num_workers=1",
             "data.shuffle_buffer=8", "seed=3"] + [f"trainer.{k}={v}" for k, v in {**base, **trainer}.items()])


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_the_losses(synthetic_shards, tmp_path):
    ref = tmp_path / "ref"
    done = _tool("stage=base32", *_cli_args(synthetic_shards, ref, max_steps=7, ckpt_every=3, channels_last="true"))
    assert done.returncode == 0, done.stderr
    assert f"final checkpoint: {ref / 'checkpoints' / 'step-00000007'}" in done.stdout
    assert (ref / "hydra").is_dir() and not (ROOT / "outputs").exists()

    killed = tmp_path / "killed"
    # 1000 steps would make channels_last=auto measure the layouts (the 7-step reference does not): both runs
    # must compute in one layout to agree to float rounding
    args = _cli_args(synthetic_shards, killed, ckpt_every=3, channels_last="true")
    proc = subprocess.Popen([sys.executable, str(TOOL), "stage=base32", *args, "trainer.max_steps=1000"],
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and any(json.loads(ln)["step"] >= 5 for ln in log.read_text().splitlines() if ln):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = _tool("stage=base32", *args, "trainer.max_steps=7")
    assert resumed.returncode == 0, resumed.stderr
    resumed_from = int(resumed.stderr.split("(step ")[1].split(")")[0])
    assert 3 <= resumed_from < 7
    want = {r["step"]: r for r in _records(ref)}
    got = {r["step"]: r for r in _records(killed)}
    assert sorted(got) == list(range(1, 8))
    for step in range(1, 8):
        for key in ("loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3", "grad_norm", "lr"):
            a, b = want[step][key], got[step][key]
            assert (a is None and b is None) or a == pytest.approx(b, rel=1e-6, abs=1e-7), (step, key)
    a = checkpoint.load_weights(ref, "ema")
    b = checkpoint.load_weights(killed, "ema")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_two_process_cpu_run_agrees_on_weights(synthetic_shards, tmp_path):
    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TOOL), "stage=base32", *_cli_args(synthetic_shards, run_dir, max_steps=2, ckpt_every=0)]
    done = subprocess.run(cmd, check=False, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("final checkpoint:") == 1
    latest = checkpoint.latest_checkpoint(run_dir)
    state = checkpoint.load_training_state(latest)
    assert state["data"]["world_size"] == 2 and len(state["rng"]) == 2
    first, second = state["rank_weight_fingerprints"]
    assert first == second
    assert checkpoint.load_config(latest)["train"]["num_processes"] == 2
    assert [r["step"] for r in _records(run_dir)] == [1, 2]


def test_cfg_job_prints_the_resolved_configuration(tmp_path):
    done = _tool("stage=sr64", "data.root=/somewhere", "trainer.lr=3e-4", "--cfg", "job", "--resolve",
                 cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "run_dir: runs/sr64" in done.stdout and "lr: 0.0003" in done.stdout and "size: tiny" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["trainer.max_step=3", "data.root=x"], "max_step"),
    (["stage=sr32", "data.root=x"], "sr32"),
    (["trainer.mixed_precision=fp32", "data.root=x"], "mixed_precision"),
    (["data.hflip=sometimes", "data.root=x"], "hflip"),
    ([], "data.root"),
    (["data.root=/no/such/folder"], "/no/such/folder"),
])
def test_bad_overrides_are_clear_errors(args, message, tmp_path):
    done = _tool(*args, f"run_dir={tmp_path / 'r'}", cwd=tmp_path)
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_auto_workers_are_recorded_and_kept_on_resume(synthetic_shards, tmp_path, monkeypatch):
    """data.num_workers=auto resolves by the machine; the checkpoint records the count, and a resumed run reads the
    same data stream (the same count) even where auto would now pick another."""
    import dataclasses

    import stages
    from cascade.data import workers as data_module
    from cascade.training import trainer as train_module
    from cascade.training.trainer import StageTrainer
    from cascade.training.trainer_config import DataConfig

    stage = stages.get_stage("base32", "tiny", num_classes=SHARD_CLASSES)
    run = tiny_run_config(tmp_path / "run", synthetic_shards, max_steps=1)
    run = dataclasses.replace(run, data=DataConfig(root=str(synthetic_shards), num_workers="auto", shuffle_buffer=8))
    monkeypatch.setattr(train_module, "resolve_num_workers", lambda value, device: 0)
    StageTrainer(stage, run).run()
    assert checkpoint.load_training_state(tmp_path / "run")["data"]["num_workers"] == 0
    monkeypatch.setattr(train_module, "resolve_num_workers", lambda value, device: 3)
    resumed = StageTrainer(stage, dataclasses.replace(run, trainer=dataclasses.replace(run.trainer, max_steps=2)))
    assert resumed.num_workers == 0
    resumed.close()
    assert data_module.resolve_num_workers(2, torch.device("cpu")) == 2


def test_a_resumed_run_takes_the_optimizer_settings_it_is_given(synthetic_shards, tmp_path):
    """The checkpoint's Adam moments and schedule position stay; lr (through the warm-up), betas, eps and weight decay
    are the resumed invocation's (a loaded optimizer state alone would keep the old lr, and a new default such as
    configs/stage_trainer's would apply only in part)."""
    import dataclasses

    import stages
    from cascade.training.trainer import StageTrainer

    stage = stages.get_stage("base32", "tiny", num_classes=SHARD_CLASSES)
    run = tiny_run_config(tmp_path / "run", synthetic_shards, max_steps=2)
    run = dataclasses.replace(run, trainer=dataclasses.replace(run.trainer, lr=2e-4, warmup_steps=4))
    StageTrainer(stage, run).run()
    saved = checkpoint.load_training_state(tmp_path / "run")["optimizer"]
    same = StageTrainer(stage, dataclasses.replace(run, trainer=dataclasses.replace(run.trainer, max_steps=3)))
    assert same.scheduler.last_epoch == 2 and same.scheduler.get_last_lr() == pytest.approx([2e-4 * 3 / 4])
    same.close()
    changed = dataclasses.replace(run.trainer, max_steps=3, lr=1e-3, weight_decay=0.01, adam_betas=(0.8, 0.99))
    resumed = StageTrainer(stage, dataclasses.replace(run, trainer=changed))
    group = resumed.optimizer.param_groups[0]
    assert resumed.scheduler.last_epoch == 2 and resumed.scheduler.get_last_lr() == pytest.approx([1e-3 * 3 / 4])
    assert group["lr"] == pytest.approx(1e-3 * 3 / 4) and group["weight_decay"] == 0.01
    assert tuple(group["betas"]) == (0.8, 0.99)
    first = next(iter(saved["state"].values()))
    assert torch.equal(resumed.optimizer.state_dict()["state"][0]["exp_avg"], first["exp_avg"])  # moments kept
    resumed.close()


def test_a_failing_close_never_hides_the_runs_own_error(synthetic_shards, tmp_path, monkeypatch, capsys):
    import stages
    from cascade.training.trainer import StageTrainer

    stage = stages.get_stage("base32", "tiny", num_classes=SHARD_CLASSES)
    trainer = StageTrainer(stage, tiny_run_config(tmp_path / "run", synthetic_shards, max_steps=1))

    def boom(interrupt):
        raise ValueError("the run's own error")

    def full_disk():
        raise OSError("no space left on device")

    monkeypatch.setattr(trainer, "_run", boom)
    monkeypatch.setattr(trainer.accelerator, "end_training", full_disk)
    with pytest.raises(ValueError, match="the run's own error"):
        trainer.run()
    assert "closing the trainer after a failure also failed" in capsys.readouterr().err

"""Preemption and the non-finite limit: SIGTERM / SIGUSR1 take Ctrl-C's path (checkpoint at the current step, one
line, exit 128 + signal) in training and in every tool; trainer.max_nan_in_row holds at every step."""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SHARD_CLASSES, one_line, tiny_run_config

from cascade import checkpoint
from cascade.errors import GracefulInterrupt, StopSignal, cli_main, deferred_interrupts

ROOT = Path(__file__).resolve().parents[2]
TRAIN_TOOL = ROOT / "tools" / "train_stage.py"
TOOLS = sorted(p.stem for p in (ROOT / "tools").glob("*.py"))


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"{name}_preempt_tool", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "CASCADE_DEBUG")}
    env["OMP_NUM_THREADS"] = "1"
    return env




def _signal_after_step(trainer, step: int, signum: int) -> None:
    real_step = trainer._train_step

    def step_then_signal():
        real_step()
        if trainer.step == step:
            signal.raise_signal(signum)  # a request: the loop stops before the next step

    trainer._train_step = step_then_signal


# ----------------------------------------------------------------------------------------------- signals


def test_stop_signals_become_one_line_and_128_plus_signal(capsys):
    main = cli_main("tool", interrupted="interrupted; nothing was written")(signal.raise_signal)
    assert main(signal.SIGTERM) == 143 and main(signal.SIGUSR1) == 138
    assert capsys.readouterr().err.splitlines() == ["tool: interrupted by SIGTERM; nothing was written",
                                                    "tool: interrupted by SIGUSR1; nothing was written"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after the tool

    with GracefulInterrupt() as guard:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)
    assert guard.requested and guard.signum == signal.SIGTERM and guard.exit_code == 143

    written = []
    with pytest.raises(StopSignal) as stop, deferred_interrupts():  # held until the block is done, then raised
        signal.raise_signal(signal.SIGTERM)
        written.append("all")
    assert written == ["all"] and stop.value.signum == signal.SIGTERM


def test_slurm_warning_signal_checkpoints_the_current_step(synthetic_shards, tmp_path):
    from cascade.training.trainer import StageTrainer, TrainingInterrupted
    from stages import get_stage

    stage = get_stage("base32", "tiny", num_classes=SHARD_CLASSES)
    signum = signal.SIGUSR1  # sbatch --signal=USR1@60
    trainer = StageTrainer(stage, tiny_run_config(tmp_path, synthetic_shards, max_steps=6, ckpt_every=0,
                                                  channels_last=False))
    _signal_after_step(trainer, 3, signum)
    name = signal.Signals(signum).name
    with pytest.raises(TrainingInterrupted, match=f"interrupted by {name} at step 3; run the same") as stop:
        trainer.run()
    assert stop.value.signum == signum and stop.value.checkpoint.name == "step-00000003"
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-00000003"
    assert signal.getsignal(signum) is signal.SIG_DFL


def test_signal_during_a_checkpoint_write_lets_it_finish(synthetic_shards, tmp_path, monkeypatch):
    """SIGTERM in the middle of writing step 2's checkpoint: the write completes, the run stops at step 2 with that
    checkpoint, written once and readable."""
    from cascade.training import trainer as trainer_module
    from stages import get_stage

    stage = get_stage("base32", "tiny", num_classes=SHARD_CLASSES)
    real_save = checkpoint.save_checkpoint
    saves = []

    def save_with_signal(*args, **kwargs):
        saves.append(args[1])
        signal.raise_signal(signal.SIGTERM)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(trainer_module.checkpoint, "save_checkpoint", save_with_signal)
    run = tiny_run_config(tmp_path, synthetic_shards, max_steps=4, channels_last=False)
    with pytest.raises(trainer_module.TrainingInterrupted, match="interrupted by SIGTERM at step 2; run the same"):
        trainer_module.StageTrainer(stage, run).run()
    assert saves == [2]
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-00000002"
    checkpoint.verify_checkpoint(checkpoint.latest_checkpoint(tmp_path))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def _agree(rank: int, world_size: int, store_path: str, results: str) -> None:
    from cascade.training.stopping import NonFiniteLossError, StopCheck

    torch.distributed.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                                         world_size=world_size)
    try:
        counter = torch.zeros((), dtype=torch.long)
        check = StopCheck(counter, limit=2, run_dir=Path(results), world_size=world_size)
        interrupt = GracefulInterrupt()
        out = []
        check.record(1)
        out.append(check.check(interrupt))  # nothing yet
        if rank == 1:
            interrupt.count, interrupt.signum = 1, signal.SIGTERM  # only rank 1 got the signal
        out.append(check.check(interrupt))
        counter.fill_(2 if rank == 0 else 0)  # only rank 0 saw two non-finite steps in a row
        check.record(2)
        try:
            check.check(interrupt)
            out.append("no stop")
        except NonFiniteLossError as err:
            out.append(str(err).split(":")[0])
        Path(results, f"rank{rank}").write_text(repr(out))
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_agree_on_the_signal_and_the_non_finite_limit(tmp_path):
    torch.multiprocessing.start_processes(_agree, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2,
                                          start_method="fork")
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}").read_text() == repr([0, 15, "stopping at step 2"])


# ----------------------------------------------------------------------------------------------- non-finite


def test_non_finite_limit_holds_at_every_step(synthetic_shards, tmp_path, monkeypatch):
    """log_every=100: the run still stops after exactly max_nan_in_row non-finite steps, keeping the last good
    checkpoint, with no metrics line and no checkpoint of the non-finite state."""
    from cascade.training import trainer as train
    from stages import get_stage

    real_make_loss = train.make_stage_loss
    calls = {"n": 0}

    def make_loss(*args, **kwargs):
        real_loss = real_make_loss(*args, **kwargs)

        def loss(model, batch):
            calls["n"] += 1
            out = real_loss(model, batch)
            if calls["n"] >= 4:  # steps 4 on
                out["loss"] = out["loss"] * float("nan")
            return out

        return loss

    monkeypatch.setattr(train, "make_stage_loss", make_loss)
    stage = get_stage("base32", "tiny", num_classes=SHARD_CLASSES)
    run = tiny_run_config(tmp_path, synthetic_shards, max_steps=50, max_nan_in_row=2, ckpt_every=3, log_every=100,
                          channels_last=False)
    trainer = train.StageTrainer(stage, run)
    with pytest.raises(train.NonFiniteLossError,
                       match=r"stopping at step 5: .* 2 steps in a row .*max_nan_in_row=2.*step-00000003"):
        trainer.run()
    assert calls["n"] == 5 and int(trainer.nan_total) == 2  # exactly two non-finite steps were taken
    assert checkpoint.latest_checkpoint(tmp_path).name == "step-00000003"


# ----------------------------------------------------------------------------------------------- tools


def test_sigterm_in_sampling_and_evaluation_leaves_nothing_complete(tiny_runs, synthetic_shards, tmp_path,
                                                                   capsys, monkeypatch):
    from cascade.pipeline.cascade_pipeline import CascadePipeline

    def sigterm(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the tool")

    sample = _load_tool("sample_cascade")
    out = tmp_path / "samples"
    args = ["--classes", "1", "--stages", "base32", "--steps", "2", "--runs", str(tiny_runs["base32"].parent),
            "--out", str(out)]
    assert sample.main(args) == 0 and (out / "settings.json").is_file()
    monkeypatch.setattr(CascadePipeline, "run", sigterm)
    capsys.readouterr()
    assert sample.main(args) == 143
    assert one_line(capsys.readouterr().err).startswith("sample_cascade: interrupted by SIGTERM; the output folder")
    assert not (out / "settings.json").exists()

    for name in ("eval_fid", "sweep"):
        tool = _load_tool(name)
        monkeypatch.setattr(tool, "load_evaluation_inputs", sigterm)
        out = tmp_path / name
        code = tool.main(["--data", str(synthetic_shards), "--runs", str(tiny_runs["base32"].parent),
                          "--stages", "base32", "--device", "cpu", "--out", str(out)])
        assert code == 143
        assert one_line(capsys.readouterr().err) == (f"{name}: interrupted by SIGTERM; nothing was written "
                                                      "(earlier results in --out are untouched)")
        assert not out.exists() or not any(out.iterdir())


class Escaped(Exception):
    """A SIGTERM that no handler of the tool took (the test's own handler raises it)."""


def _escaped(signum, frame):
    raise Escaped


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_stops_on_sigterm_with_one_line_and_143(tool, monkeypatch, capfd):
    """`python tools/<tool>.py` receiving SIGTERM as it starts: one line naming the signal, exit 143."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / "tools" / f"{tool}.py")])
    for parse in ("parse_args", "parse_intermixed_args"):
        monkeypatch.setattr(argparse.ArgumentParser, parse, lambda *a, **k: signal.raise_signal(signal.SIGTERM))
    previous = signal.signal(signal.SIGTERM, _escaped)
    try:
        runpy.run_path(str(ROOT / "tools" / f"{tool}.py"), run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 143 and len(err) == 1 and err[0].startswith(f"{tool}: interrupted by SIGTERM"), (code, err)


def _signal_when(proc: subprocess.Popen, ready, signum: int, timeout: float = 120, group: bool = False) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    if group:  # as Slurm does: every process of the job, the loader's workers included
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)


@pytest.mark.slow
def test_sigterm_on_the_command_lines(synthetic_shards, tmp_path):
    """train_stage (SIGTERM to its whole process group, loader workers included): exit 143, one line, checkpoint
    at the step it names, the rerun resumes there. make_shards: exit 143, one line, no dataset.json; the rerun
    completes the folder."""
    run_dir = tmp_path / "run"
    args = [sys.executable, str(TRAIN_TOOL), "stage=base32", "size=tiny", f"data.root={synthetic_shards}",
            f"run_dir={run_dir}", "data.num_workers=1", "data.shuffle_buffer=8", "trainer.batch_size=2",
            "trainer.log_every=1", "trainer.sample_every=0", "trainer.eval_every=0", "trainer.progress=false",
            "trainer.ckpt_every=4", "trainer.channels_last=false",  # no layout probe: the run is cut short
            "trainer.mixed_precision=no"]
    proc = subprocess.Popen([*args, "trainer.max_steps=100000"], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    log = run_dir / "metrics.jsonl"
    _signal_when(proc, lambda: log.is_file() and len(log.read_text().splitlines()) >= 6, signal.SIGTERM,
                 group=True)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    step = checkpoint.load_config(run_dir)["step"]
    assert one_line(stderr) == f"train_stage: interrupted by SIGTERM at step {step}; run the same command to resume"
    assert step >= 6 and not list((run_dir / checkpoint.CHECKPOINTS_DIR).glob(".step-*"))
    resumed = subprocess.run([*args, f"trainer.max_steps={step + 1}"], env=_env(), capture_output=True, text=True,
                             timeout=180, check=False)
    assert resumed.returncode == 0 and f"(step {step})" in resumed.stderr, resumed.stderr

    out = tmp_path / "shards"
    command = [sys.executable, str(ROOT / "tools" / "make_shards.py"), "--source", "synthetic", "--out", str(out),
               "--num-classes", "3", "--images-per-class", "40", "--max-res", "64", "--shard-size", "2",
               "--no-progress"]
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _signal_when(proc, lambda: len(list(out.glob("train-*.tar"))) >= 2, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert one_line(stderr).startswith("make_shards: interrupted by SIGTERM; the output folder holds no complete")
    assert not (out / "dataset.json").exists()
    assert subprocess.run(command, env=_env(), capture_output=True, timeout=180, check=False).returncode == 0
    assert (out / "dataset.json").is_file()


@pytest.mark.slow
def test_preemption_drill(synthetic_shards, tmp_path):
    drill = _load_tool("fault_drill")
    result = drill.train_drill(tmp_path, synthetic_shards, kills=3, rng=random.Random(4), max_steps=8, quiet=True,
                               sig=signal.SIGTERM)
    assert result.ok, (result.tally(), result.problems, result.damaged_seen)
    assert result.kills == 3 and result.resumed == 3 and result.at_signal_step == 3

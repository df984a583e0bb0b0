"""Reliability: one line per failure, interrupts that keep the work, damaged checkpoints, kill -9."""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SHARD_CLASSES, one_line, tiny_run_config

from cascade import checkpoint
from cascade.errors import EXIT_INTERRUPTED, OutputNotWritable, cli_main, ensure_writable_dir

ROOT = Path(__file__).resolve().parents[2]
TRAIN_TOOL = ROOT / "tools" / "train_stage.py"
SAMPLE_TOOL = ROOT / "tools" / "sample_cascade.py"


def _env(**extra):
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "CASCADE_DEBUG")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _run(tool, *args, cwd=ROOT, env=None, timeout=180):
    return subprocess.run([sys.executable, str(tool), *map(str, args)], check=False, cwd=cwd, env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)


def _load_tool(name):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}




def _cli(shards, run_dir, **trainer):
    base = {"batch_size": 2, "log_every": 1, "sample_every": 0, "eval_every": 0, "progress": "false",
            "warmup_steps": 2, "mixed_precision": "no"}
    return ([f"data.root={shards}", f"run_dir={run_dir}", "size=tiny", "data.num_workers=0",
             "data.shuffle_buffer=8", "seed=3"] + [f"trainer.{k}={v}" for k, v in {**base, **trainer}.items()])


# ----------------------------------------------------------------------------------------------- fault 2


@pytest.mark.parametrize("override, message", [
    ("trainer.max_stepz=2", "unknown key 'trainer.max_stepz'"),       # unknown key
    ("newkey=3", "add a new key with +newkey=3"),                      # new key without +
    ("stage=sr65", "valid options: base32, classifier32"),             # unknown group option
    ("trainer.lr=[1,", "override 'trainer.lr=[1,' is malformed"),      # override syntax
    ("run_dir=${nope}", "Interpolation key 'nope' not found"),         # bad interpolation
    ("preset=sr64_tiny", "preset=sr64_tiny does not match stage=base32 size=tiny"),  # a group that follows stage
    ("stage_trainer=nope", "stage_trainer=nope does not match stage=base32 size=tiny"),  # optional: no file needed
    ("trainer.lr=abc", "Error merging override trainer.lr=abc; Value 'abc'"),  # a value of the wrong type
    ("--bogus", "unrecognized arguments: --bogus (overrides are KEY=VALUE"),  # not one of hydra's flags
])
def test_hydra_composition_errors_are_one_line_and_exit_2(override, message, tmp_path):
    done = _run(TRAIN_TOOL, "data.root=x", f"run_dir={tmp_path / 'r'}", override, cwd=tmp_path)
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert line.startswith("train_stage: error: ") and message in line, line
    assert not (tmp_path / "r").exists()


def test_stage_trainer_can_be_left_out(tmp_path):
    done = _run(TRAIN_TOOL, "data.root=x", "stage=sr64", "~stage_trainer", "--cfg", "job", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "lr: 0.0002" in done.stdout and "ema_decay: 0.999\n" in done.stdout


def test_debug_flag_shows_the_traceback(tmp_path):
    done = _run(TRAIN_TOOL, "data.root=x", "stage=sr65", cwd=tmp_path, env=_env(HYDRA_FULL_ERROR="1"))
    assert done.returncode != 0 and "Traceback" in done.stderr


# ----------------------------------------------------------------------------------------------- fault 3


def test_training_needs_no_val_split(tmp_path, capsys):
    """An SR stage's sample grid takes train inputs (with a warning) when the shards have no val split."""
    import stages
    from cascade.data.shards import write_shards
    from cascade.data.sources import SyntheticSource
    from cascade.training.trainer import StageTrainer

    shards = tmp_path / "noval"
    info = write_shards(SyntheticSource(num_classes=SHARD_CLASSES, images_per_class=2, seed=0), shards,
                        val_fraction=0.05, max_res=64)
    assert info["counts"]["val"]["total"] == 0
    stage = stages.get_stage("sr64", "tiny", num_classes=SHARD_CLASSES)
    StageTrainer(stage, tiny_run_config(tmp_path / "run", shards, max_steps=1, sample_every=1, sample_steps=2,
                                        sample_count=2)).run()
    assert (tmp_path / "run" / "samples" / "step-00000001.png").is_file()
    assert "no val samples; the sample grids take their low-resolution inputs from the train split" in \
        capsys.readouterr().err


def test_a_failure_during_the_run_is_one_line_exit_1(synthetic_shards, tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("a file where the checkpoints folder goes")  # the first save fails
    done = _run(TRAIN_TOOL, "stage=base32", *_cli(synthetic_shards, run_dir, max_steps=1), cwd=tmp_path)
    assert done.returncode == 1
    line = one_line(done.stderr)
    assert line.startswith("train_stage: error: FileExistsError") and "CASCADE_DEBUG=1" in line
    debug = _run(TRAIN_TOOL, "stage=base32", *_cli(synthetic_shards, run_dir, max_steps=1), cwd=tmp_path,
                 env=_env(HYDRA_FULL_ERROR="1"))
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_cli_main_maps_failures_to_one_line_and_exit_codes(capsys, monkeypatch):
    def failing(kind):
        if kind == "bad":
            raise ValueError("--x: bad value; use 1")
        if kind == "crash":
            raise RuntimeError("something\nbroke")
        if kind == "full":
            raise OSError(28, "No space left on device")
        raise KeyboardInterrupt

    main = cli_main("tool", interrupted="interrupted; nothing was written")(failing)
    assert main("bad") == 2 and main("crash") == 1 and main("full") == 1 and main("stop") == EXIT_INTERRUPTED
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["tool: error: --x: bad value; use 1",
                     "tool: error: RuntimeError: something broke (rerun with CASCADE_DEBUG=1 for the traceback)",
                     ("tool: error: [Errno 28] No space left on device: the disk is full; free space, then run the "
                      "same command again"),
                     "tool: interrupted; nothing was written"]
    monkeypatch.setenv("CASCADE_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main("crash")


# ----------------------------------------------------------------------------------------------- fault 4


def test_sigint_checkpoints_the_current_step_and_resume_continues_exactly(synthetic_shards, tmp_path):
    """Ctrl-C after step 3: checkpoint at 3, TrainingInterrupted; the resumed run equals a run that
    checkpointed at step 3 on its own (ckpt_every=3)."""
    import stages
    from cascade.training.trainer import StageTrainer, TrainingInterrupted

    stage = stages.get_stage("base32", "tiny", num_classes=SHARD_CLASSES)
    ref = tmp_path / "ref"
    StageTrainer(stage, tiny_run_config(ref, synthetic_shards, max_steps=5, ckpt_every=3)).run()

    run = tiny_run_config(tmp_path / "int", synthetic_shards, max_steps=5, ckpt_every=0)
    trainer = StageTrainer(stage, run)
    real_step = trainer._train_step

    def step_then_ctrl_c():
        real_step()
        if trainer.step == 3:
            signal.raise_signal(signal.SIGINT)  # handled as a request: the loop stops before step 4

    trainer._train_step = step_then_ctrl_c
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="interrupted at step 3; run the same command to resume"):
        trainer.run()
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored
    assert checkpoint.latest_checkpoint(tmp_path / "int").name == "step-00000003"
    StageTrainer(stage, run).run()
    want, got = _records(ref), _records(tmp_path / "int")
    assert sorted(got) == [1, 2, 3, 4, 5]
    for step in (4, 5):
        for key in ("loss", "grad_norm", "lr"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-6), (step, key)
    a, b = checkpoint.load_weights(ref, "ema"), checkpoint.load_weights(tmp_path / "int", "ema")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_ctrl_c_on_the_command_line_exits_130_with_one_line(synthetic_shards, tmp_path):
    run_dir = tmp_path / "r"
    args = _cli(synthetic_shards, run_dir, ckpt_every=0)
    proc = subprocess.Popen([sys.executable, str(TRAIN_TOOL), "stage=base32", *args, "trainer.max_steps=100000"],
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    log = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    line = one_line(stderr)
    step = checkpoint.load_config(run_dir)["step"]
    assert line == f"train_stage: interrupted at step {step}; run the same command to resume" and step >= 2
    resumed = _run(TRAIN_TOOL, "stage=base32", *args, f"trainer.max_steps={step + 1}", cwd=tmp_path)
    assert resumed.returncode == 0 and f"(step {step})" in resumed.stderr, resumed.stderr
    assert sorted(_records(run_dir)) == list(range(1, step + 2))


def test_interrupted_sampling_leaves_no_settings_json(tiny_runs, tmp_path, capsys, monkeypatch):
    from cascade.pipeline.cascade_pipeline import CascadePipeline

    tool = _load_tool("sample_cascade")
    out = tmp_path / "out"
    args = ["--classes", "1", "--stages", "base32", "--steps", "2", "--runs", str(tiny_runs["base32"].parent),
            "--out", str(out)]
    assert tool.main(args) == 0 and (out / "settings.json").is_file()

    def ctrl_c(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(CascadePipeline, "run", ctrl_c)
    capsys.readouterr()
    assert tool.main(args) == 130
    assert one_line(capsys.readouterr().err).startswith("sample_cascade: interrupted;")
    assert not (out / "settings.json").exists()  # the folder no longer claims to be complete


# ----------------------------------------------------------------------------------------------- damage


def test_resume_auto_skips_a_damaged_newest_checkpoint(synthetic_shards, tmp_path, capsys):
    import stages
    from cascade.training.trainer import StageTrainer

    stage = stages.get_stage("base32", "tiny", num_classes=SHARD_CLASSES)
    run_dir = tmp_path / "run"
    StageTrainer(stage, tiny_run_config(run_dir, synthetic_shards, max_steps=4, ckpt_every=2)).run()
    newest = checkpoint.latest_checkpoint(run_dir)
    assert newest.name == "step-00000004"
    state = newest / "training_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated, as after a full disk
    capsys.readouterr()
    trainer = StageTrainer(stage, tiny_run_config(run_dir, synthetic_shards, max_steps=4, ckpt_every=2))
    err = capsys.readouterr().err
    assert trainer.step == 2 and trainer.resume_from.name == "step-00000002"
    assert f"checkpoint {newest} is damaged" in err and str(state) in err
    assert trainer.run().name == "step-00000004"
    checkpoint.verify_checkpoint(run_dir)  # rewritten whole


def test_damaged_checkpoint_in_load_stage_and_sample_cascade_is_one_line(tiny_runs, tmp_path):
    ckpt = tmp_path / "base32"
    shutil.copytree(checkpoint.latest_checkpoint(tiny_runs["base32"]), ckpt)
    ema = ckpt / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:-64])
    with pytest.raises(checkpoint.CheckpointError, match=str(ema)):
        checkpoint.load_stage(ckpt)
    done = _run(SAMPLE_TOOL, "--classes", "1", "--stages", "base32", "--ckpt", f"base32={ckpt}", "--steps", "2",
                "--out", tmp_path / "o")
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert line.startswith("sample_cascade: error: checkpoint file") and str(ema) in line


# ----------------------------------------------------------------------------------------------- outputs


def test_unwritable_outputs_are_reported_before_any_work(synthetic_shards, tmp_path):
    import stages
    from cascade.training.trainer import StageTrainer

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OutputNotWritable, match="run_dir"):
        StageTrainer(stages.get_stage("base32", "tiny", num_classes=SHARD_CLASSES),
                     tiny_run_config(blocker / "run", synthetic_shards))
    with pytest.raises(OutputNotWritable, match="not writable"):
        ensure_writable_dir("/proc/cascade-test", "--out")  # refused even to root
    done = _run(TRAIN_TOOL, "stage=base32", *_cli(synthetic_shards, blocker / "run"), cwd=tmp_path)
    assert done.returncode == 2 and "run_dir" in one_line(done.stderr)
    assert not (tmp_path / "outputs").exists()
    done = _run(SAMPLE_TOOL, "--classes", "1", "--out", blocker / "samples")
    assert done.returncode == 2 and "--out" in one_line(done.stderr)


# ----------------------------------------------------------------------------------------------- multi-process


def _rank_logs(log_dir: Path) -> str:
    """Each rank's own stderr from torchrun's --log-dir (the launcher's stderr ends with its summary only)."""
    return "\n".join(f"== {path.relative_to(log_dir)}\n{path.read_text()[-3000:]}"
                     for path in sorted(log_dir.rglob("stderr.log")))


@pytest.mark.slow
def test_two_process_cpu_run_resumes(synthetic_shards, tmp_path):
    run_dir = tmp_path / "ddp"

    def torchrun(max_steps):
        logs = tmp_path / f"logs-{max_steps}"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "--log-dir", str(logs), "--tee", "3", str(TRAIN_TOOL), "stage=base32",
                   *_cli(synthetic_shards, run_dir, ckpt_every=0), f"trainer.max_steps={max_steps}"]
        done = subprocess.run(command, check=False, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                              timeout=240)
        assert done.returncode == 0, done.stderr[-1500:] + "\n" + _rank_logs(logs)
        return done

    torchrun(2)
    second = torchrun(3)
    assert "(step 2)" in second.stderr and second.stdout.count("final checkpoint:") == 1
    state = checkpoint.load_training_state(run_dir)
    assert state["step"] == 3 and state["rank_weight_fingerprints"][0] == state["rank_weight_fingerprints"][1]


# ----------------------------------------------------------------------------------------------- kill -9


@pytest.mark.slow
def test_kill_drill_training(synthetic_shards, tmp_path):
    drill = _load_tool("fault_drill")
    result = drill.train_drill(tmp_path, synthetic_shards, kills=3, rng=random.Random(1), max_steps=8, quiet=True)
    assert result.ok, (result.tally(), result.problems, result.damaged_seen)
    assert result.kills == 3 and result.resumed == 3


@pytest.mark.slow
def test_kill_drill_make_shards(tmp_path):
    drill = _load_tool("fault_drill")
    result = drill.shards_drill(tmp_path, kills=3, rng=random.Random(2), quiet=True)
    assert result.ok, (result.tally(), result.problems, result.partial_seen)
    assert result.kills == 3

"""Watching a training run: the start-up summary, plain log lines in files, trackers, sample grids on every run
and the quality proxy's cadence (cascade.training.watch, .progress, .trackers, .cadence)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARD_CLASSES, tiny_run_config

import stages
from cascade.summary import read_summary
from cascade.training import watch
from cascade.training.cadence import first_proxy_estimate, grid_part, proxy_due, step_due
from cascade.training.progress import ProgressDisplay, eta_seconds, format_duration
from cascade.training.trainer import StageTrainer
from cascade.training.trainer_config import TrainerConfig, parse_report_to

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "train_stage.py"
FAST = {"sample_steps": 2, "eval_count": 4}  # grids and proxies of two sampling steps


def _records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())}


def _train(shards, run_dir, name="base32", **trainer):
    stage = stages.get_stage(name, "tiny", num_classes=SHARD_CLASSES)
    return StageTrainer(stage, tiny_run_config(run_dir, shards, **{**FAST, **trainer}),
                        extra_config={"size": "tiny"}).run()


# ----------------------------------------------------------------------------------------- the rules


def test_grid_parts_follow_steps_or_the_time_budget_whichever_is_first():
    assert [grid_part(s, 100) for s in (0, 24, 25, 50, 99, 100)] == [0, 0, 1, 2, 3, 4]
    assert grid_part(10, 100, elapsed=30.0, max_seconds=60.0) == 2  # time ahead of steps
    assert grid_part(80, 100, elapsed=1.0, max_seconds=60.0) == 3  # steps ahead of time
    assert grid_part(10, 100, elapsed=500.0) == 0  # no budget: the time does not count
    assert step_due(5, 10) and not step_due(5, 11) and not step_due(0, 10) and not step_due("auto", 10)


def test_proxy_auto_rule_keeps_ten_percent_with_the_end_evaluation():
    # proxy seconds so far + 2 × estimate (this one and the end one) ≤ 0.1 × training seconds
    assert not proxy_due(train_seconds=199.0, proxy_seconds=0.0, estimate=10.0)
    assert proxy_due(train_seconds=200.0, proxy_seconds=0.0, estimate=10.0)  # first at 20 × the estimate
    assert not proxy_due(train_seconds=299.0, proxy_seconds=10.0, estimate=10.0)
    assert proxy_due(train_seconds=300.0, proxy_seconds=10.0, estimate=10.0)  # then every 10 × its duration
    # simulated: evaluations of 10 s while training runs, the end one always: total ≤ 10 % of training
    spent, train = 0.0, 0.0
    while train < 5000.0:
        train += 7.0  # a logging window
        if proxy_due(train, spent, 10.0):
            spent += 10.0
    assert spent + 10.0 <= 0.1 * train
    # the first estimate: count × steps network evaluations (× 2 guided) at a third of the training img/s
    assert first_proxy_estimate(50, 25, guided=False, train_images_per_s=10.0) == pytest.approx(50 * 25 / 30)
    assert first_proxy_estimate(50, 25, guided=True, train_images_per_s=10.0) == pytest.approx(2 * 50 * 25 / 30)
    assert first_proxy_estimate(50, 25, guided=True, train_images_per_s=0.0) == math.inf


def test_eta_is_the_sooner_of_steps_and_budget_and_lines_come_every_log_seconds():
    assert eta_seconds(50, 0, 100, elapsed=10.0, max_seconds=0.0) == pytest.approx(10.0)
    assert eta_seconds(50, 0, 100, elapsed=10.0, max_seconds=15.0) == pytest.approx(5.0)
    assert eta_seconds(0, 0, 100, elapsed=0.0, max_seconds=0.0) is None
    assert format_duration(3725.4) == "1:02:05" and format_duration(None) == "?"
    now = [0.0]

    class File:  # a log file: not a terminal
        text = ""

        def write(self, s):
            File.text += s

        def flush(self):
            pass

    display = ProgressDisplay("base32", start_step=0, max_steps=100, max_seconds=0.0, log_seconds=30.0, bar=True,
                              enabled=True, stream=File(), clock=lambda: now[0])
    assert display.bar is None and display.plain  # progress=true, but not a TTY: plain lines
    display.advance(5)
    now[0] = 29.0
    assert not display.due()
    now[0] = 30.0
    assert display.due()
    display.line(loss=0.5, lr=1e-4, img_per_s=12.0)
    assert not display.due()
    assert File.text == "base32 step 5/100 (5%) loss 0.5 lr 1.00e-04 img/s 12.0 elapsed 0:00:30 eta 0:09:30\n"

    # Logging windows: a line once log_seconds passed since the last one, never more often; close prints the last.
    record = {"loss": 0.25, "lr": 1e-4, "img_per_s": 10.0}
    for step, t in ((6, 31.0), (7, 59.0), (8, 60.0), (9, 61.0)):
        display.advance(step)
        now[0] = t
        display.window(record)
    display.close()
    steps = [line.split()[2] for line in File.text.splitlines()]
    assert steps == ["5/100", "8/100", "9/100"]  # 6 and 7: under 30 s after the last line; 9: the last, at close


# ------------------------------------------------------------------------------------- configuration


def test_bad_watch_settings_are_one_line_errors(monkeypatch):
    with pytest.raises(ValueError, match="trainer.report_to: unknown tracker 'tensorbord'"):
        TrainerConfig(report_to="tensorbord")
    for key, value in (("sample_every", "often"), ("eval_every", -1), ("sample_every", True)):
        with pytest.raises(ValueError, match=f"trainer.{key} must be auto, 0"):
            TrainerConfig(**{key: value})
    with pytest.raises(ValueError, match="trainer.eval_count must be an integer >= 2"):
        TrainerConfig(eval_count=1)
    with pytest.raises(ValueError, match="trainer.log_seconds"):
        TrainerConfig(log_seconds=0)
    assert parse_report_to("none") == () and parse_report_to("tensorboard, tensorboard") == ("tensorboard",)
    # both trackers, as hydra's command line passes them (a bare comma there would make a sweep)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    both = OverridesParser.create().parse_overrides(["trainer.report_to=tensorboard+wandb"])[0].value()
    if importlib.util.find_spec("wandb") is not None and importlib.util.find_spec("tensorboard") is not None:
        assert parse_report_to(both) == ("tensorboard", "wandb")
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec answers None: not installed
    with pytest.raises(ValueError) as caught:
        TrainerConfig(report_to="tensorboard,wandb")
    message = str(caught.value)
    assert "\n" not in message and 'pip install -e ".[track]"' in message and "wandb" in message


# ------------------------------------------------------------------------------------------ the runs


def test_a_run_prints_its_summary_plain_lines_and_writes_grids(synthetic_shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    _train(synthetic_shards, run_dir, sample_every="auto", eval_every=0, progress=False, run_report=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    summary = read_summary(err)
    assert summary["stage"] == "base32 (base, 32²)" and summary["size"] == "tiny"
    assert summary["parameters"].endswith("M") and summary["forward FLOPs/image"].endswith("M")
    assert summary["device"] == "cpu × 1 process"
    assert summary["mixed precision"] == "no (trainer.mixed_precision=no)"
    assert summary["memory layout"].startswith(("contiguous", "channels_last"))
    assert summary["images"] == "train 12, val 6" and summary["classes"].startswith("3 (")
    assert summary["resolutions"] == "32, 64, 128, 256"
    assert summary["batch"] == "2 per process × 1 accumulated × 1 = 2 images/step"
    assert summary["steps"] == "0 → 3" and summary["time budget"] == "none" and summary["resume"] == "fresh start"
    assert summary["run_dir"] == str(run_dir)
    assert summary["checkpoints"].startswith(str(run_dir / "checkpoints"))
    assert summary["metrics"].startswith(str(run_dir / "metrics.jsonl"))
    assert summary["trackers"].startswith("none")
    assert summary["sample grids"].startswith(f"{run_dir / 'samples'}: auto")
    assert summary["quality proxy"] == "off"
    assert summary["run report"] == f"{run_dir / 'report.md'} at the end"
    assert (run_dir / "report.md").is_file() and (run_dir / "report.png").stat().st_size > 0
    assert f"run report: {run_dir / 'report.md'}" in err
    lines = [ln for ln in err.splitlines() if ln.startswith("base32 step ")]
    assert [ln.split()[2] for ln in lines] == ["1/3", "3/3"]  # the first window and the last step (log_seconds=30)
    assert all(" loss " in ln and " lr " in ln and " img/s " in ln and " eta " in ln for ln in lines)
    # sample_every=auto: one grid per quarter reached (steps 1, 2) and the end grid (3)
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [f"step-0000000{s}.png" for s in (1, 2, 3)]
    records = _records(run_dir)
    assert all(records[s]["grid_seconds"] > 0 and records[s]["seconds"] > 0 for s in (1, 2, 3))


def test_the_tool_writing_to_a_file_prints_plain_lines_and_no_carriage_return(synthetic_shards, tmp_path):
    log = tmp_path / "train.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:  # progress left true: not a terminal, so plain lines
        done = subprocess.run([sys.executable, str(TOOL), "stage=base32", "size=tiny", f"data.root={synthetic_shards}",
                               f"run_dir={tmp_path / 'run'}", "data.num_workers=0", "data.shuffle_buffer=8",
                               "trainer.max_steps=2", "trainer.batch_size=2", "trainer.log_every=1",
                               "trainer.sample_every=0", "trainer.eval_every=0", "trainer.mixed_precision=no"],
                              check=False, cwd=ROOT, env=env, stdout=out, stderr=out, timeout=240)
    text = log.read_text()
    assert done.returncode == 0, text
    assert "\r" not in text
    assert "training base32" in text and "  parameters" in text
    assert [ln.split()[2] for ln in text.splitlines() if ln.startswith("base32 step ")] == ["1/2", "2/2"]
    assert "final checkpoint:" in text


def test_tensorboard_gets_scalars_and_grids_and_resumes_in_the_same_folder(synthetic_shards, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard not installed (pip install -e '.[dev]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    _train(synthetic_shards, run_dir, max_steps=2, report_to="tensorboard", sample_every=2, eval_every=0)
    _train(synthetic_shards, run_dir, max_steps=3, report_to="tensorboard", sample_every=2, eval_every=0)
    board = run_dir / "tensorboard"
    assert len(list(board.glob("events.out.tfevents.*"))) == 2  # the resumed run adds a file
    events = EventAccumulator(str(board), size_guidance={"images": 0, "scalars": 0})
    events.Reload()  # both files: one curve over the two invocations
    tags = events.Tags()
    assert {"loss", "loss_q0", "lr", "grad_norm", "img_per_s", "grid_seconds"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert [e.step for e in events.Images("samples")] == [2, 3]  # every 2 steps, and the resumed run's end


class _StubProxy:
    """A proxy that draws from the global RNGs (the trainer must keep them) and returns fixed numbers."""

    judge_summary, setup_seconds = "stub judge", 0.0

    def __init__(self):
        self.calls = []

    def __call__(self, model, diffusion):
        torch.randn(100)
        self.calls.append(model)
        return {"proxy_class_accuracy": 0.5, "proxy_fd": 12.0, "proxy_kid": 0.1, "proxy_kid_std": 0.01,
                "proxy_count": 4.0, "proxy_seconds": 0.0}


def test_proxy_cadence_merges_records_and_leaves_training_unchanged(synthetic_shards, tmp_path, monkeypatch):
    stub = _StubProxy()
    monkeypatch.setattr(watch, "make_quality_proxy", lambda trainer: stub)
    _train(synthetic_shards, tmp_path / "watched", max_steps=3, eval_every=2, sample_every=1)
    _train(synthetic_shards, tmp_path / "plain", max_steps=3, eval_every=0, sample_every=0)
    watched, plain = _records(tmp_path / "watched"), _records(tmp_path / "plain")
    assert sorted(watched) == [1, 2, 3]  # one record per logged step: the proxy merged into it
    assert "proxy_fd" not in watched[1] and watched[2]["proxy_fd"] == 12.0 and watched[3]["proxy_fd"] == 12.0
    assert watched[2]["proxy_seconds"] >= 0 and len(stub.calls) == 2  # step 2 and the end of the run
    for step in (1, 2, 3):  # grids and proxies draw no global random numbers: the same training
        for key in ("loss", "grad_norm", "loss_q0", "loss_q1", "loss_q2", "loss_q3"):
            assert watched[step][key] == plain[step][key], (step, key)


def test_the_real_proxy_writes_its_metrics(synthetic_shards, tmp_path):
    shards = tmp_path / "shards"  # its own copy: the judge is cached beside the shards
    shutil.copytree(synthetic_shards, shards)
    run_dir = tmp_path / "run"
    _train(shards, run_dir, max_steps=2, eval_every="auto", sample_every=0)
    record = _records(run_dir)[2]  # eval_every=auto: at least the end of the run
    for key in ("proxy_class_accuracy", "proxy_fd", "proxy_kid", "proxy_kid_std", "proxy_count", "proxy_seconds"):
        assert isinstance(record[key], float), key
    assert record["proxy_count"] == FAST["eval_count"] and 0.0 <= record["proxy_class_accuracy"] <= 1.0

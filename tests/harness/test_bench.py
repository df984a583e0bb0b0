"""Smoke tests of tools/bench.py and tools/bench_data.py (`cascade.harness.bench`): a quick run on one stage ends
with a table and valid JSON (no timing checks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_quick_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench.py"), "--quick", "--stages", "classifier32",
         "--batch-size", "2", "--threads", "1", "--trainer", "--trainer-steps", "20", "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert result["stage"] == "classifier32" and result["mode"] == "fp32" and result["batch_size"] == 2
    assert result["params"] > 0 and result["forward_gflops_per_image"] > 0
    assert result["train_images_per_s"] > 0 and result["peak_memory_mib"] > 0
    for dtype in ("fp32", "bf16"):
        assert set(result["ceilings"][dtype]) == {"conv_fwd_gflops", "conv_fwdbwd_gflops", "matmul_gflops"}
    assert report["data_loader_images_per_s"]["classifier32"] > 0
    assert "classifier32" in proc.stdout
    (trainer,) = report["trainer"]  # the trainer's img/s against the bare step (TrainStep) of the same run
    assert trainer["steps"] == 20 and trainer["trainer_images_per_s"] > 0
    assert trainer["trainer_vs_bare"] == trainer["trainer_images_per_s"] / result["train_images_per_s"]


def test_bench_profile_reports_every_kind_for_training_and_sampling(tmp_path):
    from cascade.harness.bench_profile import KINDS

    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench.py"), "--quick", "--stages", "base32", "--batch-size", "2",
         "--threads", "1", "--no-data", "--profile", "1", "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = json.loads(out.read_text())["results"]
    for part in ("train", "sample"):
        profile = result["profile"][part]
        assert list(profile["kinds"]) == list(KINDS) and profile["kinds"]["convolution"] > 0
        assert sum(profile["kinds"].values()) == pytest.approx(profile["profiled_ms"])
    assert result["profile"]["train"]["kinds"]["optimizer"] > 0 and result["profile"]["train"]["kinds"]["EMA"] > 0
    assert result["profile"]["sample"]["kinds"]["optimizer"] == 0
    assert "profile base32 fp32, training step (batch 2)" in proc.stdout
    assert "profile base32 fp32, guided sampling step (batch 2)" in proc.stdout


def test_bench_chunks_times_each_layout_and_chunk_size(tmp_path):
    out = tmp_path / "chunks.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench.py"), "--chunks", "1,3", "--stages", "base32", "--quick",
         "--threads", "1", "--json", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["layout"], r["chunk"]) for r in rows} == {(la, c) for la in ("contiguous", "channels_last")
                                                          for c in (1, 3)}
    assert all(r["images_per_s_per_step"] > 0 for r in rows)
    assert "best: " in proc.stdout and "default chunk here: 16" in proc.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--chunks", "4,x"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=120, check=False)
    assert bad.returncode == 2 and "--chunks takes a comma list of chunk sizes" in bad.stderr
    other = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--chunks", "4", "--profile"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False)
    assert other.returncode == 2 and "--profile does not apply to --chunks" in other.stderr


def test_compile_gains_pairs_compiled_with_eager_runs():
    from cascade.harness.bench import compile_gains

    base = {"model": "cascade", "stage": "base32"}
    results = [{**base, "mode": "bf16", "train_step_s": 0.5, "first_step_s": 0.6},
               {**base, "mode": "bf16+compile", "train_step_s": 0.4, "first_step_s": 30.4},
               {**base, "mode": "fp32+compile", "train_step_s": 0.4, "first_step_s": 20.4}]  # no eager twin
    (gain,) = compile_gains(results)
    assert gain["mode"] == "bf16" and gain["compile_s"] == pytest.approx(30.0)
    assert gain["speedup"] == pytest.approx(1.25) and gain["break_even_steps"] == pytest.approx(300.0)
    slower = compile_gains([{**results[0], "train_step_s": 0.3}, results[1]])
    assert slower[0]["break_even_steps"] is None


def test_bench_rejects_unknown_mode():
    from cascade.harness.bench import parse_mode

    assert parse_mode("bf16+cl") == {"bf16": True, "channels_last": True, "compile": False}
    with pytest.raises(ValueError, match="fp16"):
        parse_mode("fp16")


def test_bench_settings_are_checked_before_any_work(tmp_path):
    from cascade.harness.bench import BenchSettings

    with pytest.raises(ValueError, match="unknown bench model 'base33'"):
        BenchSettings(stages=("base32", "base33")).resolved()
    with pytest.raises(ValueError, match="--profile takes a number of training steps >= 1, got -1"):
        BenchSettings(profile=-1).resolved()
    quick = BenchSettings(modes=("fp32", "bf16+compile"), compile=True, quick=True, data_workers=0).resolved()
    assert quick.modes == ("fp32", "fp32+compile", "bf16+compile") and (quick.steps, quick.repeats) == (1, 1)
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--modes", "fp16", "--json",
                           str(tmp_path / "b.json")], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("bench: error: unknown mode token(s) ['fp16']")
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "b.json").exists()


def test_bench_big32_is_the_widened_base32():
    import stages
    from cascade.harness.bench import bench_stage

    big = bench_stage("big32", stages.get_stage)
    assert big.name == "base32" and big.unet.model_channels == 128 and big.num_classes == 10
    assert 30e6 < stages.count_parameters(stages.build_model(big)) < 40e6
    assert bench_stage("sr64", stages.get_stage) == stages.get_stage("sr64", "tiny", 10)


def test_bench_data_prints_each_stage_size_the_shards_hold(synthetic_shards):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_data.py"), "--root", str(synthetic_shards),
                           "--batch-size", "2", "--num-workers", "0", "--num-batches", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = proc.stdout.splitlines()
    assert [row.split()[0] for row in rows] == ["base32", "sr64", "sr128", "sr256"]
    assert "sr64     64² + 32²" in rows[1] and rows[1].endswith("images/s (batch 2, 0 workers)")

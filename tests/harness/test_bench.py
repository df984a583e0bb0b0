"""Smoke test of tools/bench.py: a quick run on one stage ends with a table and valid JSON (no timing checks)."""

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


def test_compile_gains_pairs_compiled_with_eager_runs():
    sys.path.insert(0, str(ROOT / "tools"))
    from bench import compile_gains

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
    sys.path.insert(0, str(ROOT / "tools"))
    from bench import parse_mode

    assert parse_mode("bf16+cl") == {"bf16": True, "channels_last": True, "compile": False}
    with pytest.raises(ValueError, match="fp16"):
        parse_mode("fp16")

"""Smoke test of tools/bench.py: a quick run on one stage ends with a table and valid JSON (no timing checks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench.py"), "--quick", "--stages", "classifier32",
         "--batch-size", "2", "--threads", "1", "--json", str(out)],
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


def test_bench_rejects_unknown_mode():
    sys.path.insert(0, str(ROOT / "tools"))
    from bench import parse_mode

    assert parse_mode("bf16+cl") == {"bf16": True, "channels_last": True, "compile": False}
    with pytest.raises(ValueError, match="fp16"):
        parse_mode("fp16")

"""tools/estimate.py: the training-time estimate of a stage on this machine, and one-line errors for bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import load_tool

from cascade.harness.estimate import gpu_check_figures
from cascade.summary import read_summary

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "estimate.py"


estimate = load_tool("estimate")


def _number(row: str) -> float:
    return float(re.match(r"\s*([0-9.e+-]+)", row).group(1))


def test_a_tiny_stage_prints_consistent_positive_figures(capsys, tmp_path, one_thread):
    code = estimate.main(["stage=classifier32", "size=tiny", "trainer.batch_size=2", "trainer.max_steps=50",
                          "--steps", "1", "--device", "cpu", "--gpu-check", str(tmp_path / "none.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("classifier32 (tiny)")
    rows = read_summary(out)
    step_s, img_s = _number(rows["s/step"]), _number(rows["img/s"])
    assert step_s > 0 and img_s > 0
    assert rows["batch"] == "2 images per step"
    assert img_s == pytest.approx(2 / step_s, rel=2e-3)  # printed to 3-4 significant digits
    assert _number(rows["s per 1,000 steps"]) == pytest.approx(1000 * step_s, rel=1e-3)
    assert rows["trainer.max_steps"].startswith("50 steps: ")
    assert _number(rows["days per 1M images"]) == pytest.approx(1e6 / img_s / 86400, rel=5e-3)
    assert rows["device"] == "cpu" and _number(rows["parameters"].rstrip("kMG")) > 0
    assert "contiguous (channels_last=auto keeps contiguous for runs under 200 steps)" in rows["memory layout"]
    assert "trainer.max_seconds" in out  # how to give a run a time budget


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["trainer.bogus=1"], "unknown key 'trainer.bogus'"),
        (["stage=sr999"], "Could not find 'stage/sr999'; valid options: base32"),
        (["trainer.batch_size=0"], "trainer.batch_size must be >= 1"),
        (["--all", "stage=sr64"], "--all chooses the stages"),
        (["--steps", "0"], "--steps: must be an integer >= 1"),
    ],
)
def test_bad_override_gives_one_line_and_exit_2(capsys, args, expected):
    try:
        code = estimate.main(args)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert "Traceback" not in err[0]


def test_gpu_check_figures_read_what_gpu_check_records(tmp_path):
    report = {"env": {"gpu": "NVIDIA H100"},
              "train": {"device": "cuda", "steps": 100, "runs": [
                  {"stage": "base32", "attention": "sdpa", "batch_size": 64, "img_per_s": 5000.0},
                  {"stage": "base32", "attention": "xformers", "batch_size": 64, "img_per_s": 6000.0},
                  {"stage": "sr64", "attention": "sdpa", "error": "OOM"}]}}
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(report))
    figures = gpu_check_figures(path)
    assert list(figures) == ["base32"]
    assert (figures["base32"].gpu, figures["base32"].images_per_s, figures["base32"].batch_size) == \
        ("NVIDIA H100", 5000.0, 64)
    assert gpu_check_figures(tmp_path / "missing.json") == {}
    path.write_text("not json")
    with pytest.raises(ValueError, match="gpu_check.json"):
        gpu_check_figures(path)

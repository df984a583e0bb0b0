"""The in-training quality proxy (cascade.evaluation.proxy) on the tiny trained stages, and the run report
(cascade.evaluation.run_report, tools/run_report.py) from hand-written metrics logs."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade import checkpoint
from cascade.evaluation.proxy import BASE_KEYS, SR_KEYS, QualityProxy, balanced_labels
from cascade.evaluation.run_report import write_run_report

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(synthetic_shards, tmp_path_factory) -> Path:
    """A private copy of the shards: the judge and its reference statistics are cached next to them."""
    return Path(shutil.copytree(synthetic_shards, tmp_path_factory.mktemp("proxy") / "shards"))


def test_balanced_labels_give_the_remainder_to_the_first_classes():
    assert balanced_labels(7, 3).tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert balanced_labels(2, 3).tolist() == [0, 1]


@pytest.mark.parametrize("name, count, keys", [("base32", 6, BASE_KEYS), ("sr64", 4, SR_KEYS)])
def test_proxy_keys_ranges_determinism_and_no_global_rng(tiny_runs, shards, one_thread, name, count, keys):
    stage, model, diffusion = checkpoint.load_stage(tiny_runs[name])
    proxy = QualityProxy(shards, stage, count=count, seed=0, device=torch.device("cpu"), steps=2)
    assert proxy.setup_seconds >= 0 and "% on real val images" in proxy.judge_summary
    model.train()
    states = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    first, second = proxy(model, diffusion), proxy(model, diffusion)
    assert torch.equal(states[0], torch.get_rng_state()) and np.array_equal(states[1], np.random.get_state()[1])
    assert states[2] == random.getstate()
    assert model.training  # left in the mode it was found in
    assert tuple(first) == keys
    assert {k: v for k, v in first.items() if k != "proxy_seconds"} == \
        {k: v for k, v in second.items() if k != "proxy_seconds"}
    assert 0.0 <= first["proxy_class_accuracy"] <= 1.0
    assert first["proxy_fd"] >= 0 and first["proxy_kid_std"] >= 0 and math.isfinite(first["proxy_kid"])
    assert first["proxy_count"] == count and first["proxy_seconds"] > 0
    if name == "sr64":
        assert first["proxy_consistency_db"] > 0 and first["proxy_detail_ratio"] >= 0


def test_proxy_refuses_shards_without_val_split_and_a_count_below_two(tmp_path, shards, tiny_runs):
    from cascade.data.shards import write_shards
    from cascade.data.sources import SyntheticSource

    stage = checkpoint.load_stage_config(tiny_runs["base32"])
    with pytest.raises(ValueError, match="count must be an integer >= 2"):
        QualityProxy(shards, stage, count=1, seed=0, device=torch.device("cpu"), steps=2)
    no_val = tmp_path / "no_val"
    write_shards(SyntheticSource(num_classes=3, images_per_class=2, seed=0), no_val, shard_size=4, val_fraction=0.0,
                 max_res=32)
    with pytest.raises(ValueError, match="no val split.*tools/make_shards.py --val-fraction"):
        QualityProxy(no_val, stage, count=4, seed=0, device=torch.device("cpu"), steps=2)


# ------------------------------------------------------------------------------------------------- run report


def _window(step: int, **extra) -> dict:
    return {"step": step, "loss": 1.0 / step, "loss_q0": 0.5 / step, "loss_q1": None, "loss_q2": 1.0 / step,
            "loss_q3": 2.0 / step, "lr": 1e-4, "grad_norm": 0.5, "img_per_s": 20.0, "nan_skips": 0, **extra}


def _proxy(**values) -> dict:
    return {"proxy_class_accuracy": 0.5, "proxy_fd": 2.0, "proxy_kid": 0.01, "proxy_kid_std": 0.002,
            "proxy_count": 6.0, "proxy_seconds": 1.5, **values}


def _write_log(run: Path, records: list[dict], tail: str = "") -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_run_report_reads_merged_and_separate_proxy_records_and_skips_a_cut_off_line(tmp_path):
    run = tmp_path / "base32"
    records = [_window(10), _window(20, **_proxy(proxy_fd=3.0)), _window(30), {"step": 40, **_proxy(proxy_fd=1.25)},
               _window(40)]
    _write_log(run, records, tail='{"step": 50, "loss": 0.0')  # killed mid-write
    (run / "samples").mkdir()
    for step in (10, 40):
        (run / "samples" / f"step-{step:08d}.png").write_bytes(b"")
    path = write_run_report(run)
    text = path.read_text()
    assert path == run / "report.md" and (run / "report.png").stat().st_size > 0
    assert "5 logging windows" not in text and "4 logging windows, last step 40." in text
    assert "| 20 | 0.500 | 3.000 | 0.0100 ± 0.0020 | 1.5 |" in text
    assert "| 40 | 0.500 | 1.250 |" in text
    assert "A proxy, not an evaluation: 6 fixed-seed samples" in text
    assert "![newest sample grid](samples/step-00000040.png)" in text and "(samples/step-00000010.png)" in text


def test_run_report_without_proxy_records_and_the_tool(tmp_path, capsys):
    run = tmp_path / "sr64"
    _write_log(run, [_window(1), _window(2)])
    spec = importlib.util.spec_from_file_location("run_report", ROOT / "tools" / "run_report.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([str(run)]) == 0
    text = (run / "report.md").read_text()
    assert "No quality proxy records" in text and "No sample grids" in text and (run / "report.png").is_file()
    assert tool.main([str(tmp_path / "missing")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err

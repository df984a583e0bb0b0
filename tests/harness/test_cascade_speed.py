"""tools/bench.py --cascade (`cascade.harness.cascade_speed`): the whole chain's sampling speed with teacher, student
and mixed stages (no timing checks: the configurations, their NFE and the one-line errors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_tool

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench_tool():
    return load_tool("bench")


def _planned_nfe(name: str, distilled: bool) -> int:
    """NFE per image of a tiny stage (or its default, step-distilled student) at its own defaults (the plan's rules)."""
    import stages
    from cascade.pipeline.plan import network_evaluations, stage_timesteps
    from cascade.training.distill import student_stage
    from cascade.training.trainer_config import DistillSettings

    cfg = stages.get_stage(name, "tiny", num_classes=10)
    if distilled:
        cfg = student_stage(cfg, "teacher", DistillSettings())
    return network_evaluations(cfg.sampling, stage_timesteps(cfg, cfg.sampling), guidance_input=distilled)


def test_quick_cascade_speed_has_three_configurations_with_planned_nfe(bench_tool, tmp_path, capsys, one_thread):
    from cascade.harness.cascade_speed import CONFIGURATIONS

    out = tmp_path / "cascade.json"
    assert bench_tool.main(["--cascade", "--quick", "--stages", "base32,sr64", "--mixed", "base32", "--threads", "1",
                            "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["images"] == 1 and report["stages"] == ["base32", "sr64"] and report["threads"] == 1
    assert report["cpu"] and report["precision"] in ("fp32", "bf16")
    rows = {r["configuration"]: r for r in report["configurations"]}
    assert tuple(rows) == CONFIGURATIONS
    distilled = {"teachers": set(), "students": {"base32", "sr64"}, "mixed": {"base32"}}
    for name, row in rows.items():
        for stage, s in row["stages"].items():
            want = _planned_nfe(stage, stage in distilled[name])
            assert s["nfe_per_image"] == s["nfe_counted_per_image"] == want, (name, stage)
            assert s["weights"] == ("student" if stage in distilled[name] else "teacher")
            assert s["seconds_per_image"] > 0
        assert row["nfe_per_image"] == sum(s["nfe_per_image"] for s in row["stages"].values())
        assert row["images_per_s"] == pytest.approx(1 / row["seconds_per_image"])
        assert row["speedup"] == pytest.approx(rows["teachers"]["seconds_per_image"] / row["seconds_per_image"])
    # today's defaults: base32 ddim 25 at w = 1 and sr64 ddpm 25 at w = 1 (guided: 2 each); students 4 and 2 steps
    assert [rows[c]["nfe_per_image"] for c in CONFIGURATIONS] == [50 + 50, 4 + 2, 4 + 50]
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [line.split(":")[0] for line in table[1:]] == ["| teachers", "| students", "| mixed"]
    assert "s per 64² image" in table[0] and table[1].endswith("| 1.0× |")


@pytest.mark.parametrize("args, message", [
    (["--cascade", "--stages", "base32,sr64", "--mixed", "sr128"], "--mixed: sr128 is not in the chain"),
    (["--cascade", "--stages", "base32,sr128"], "stage sr128: takes 64x64 inputs but base32 makes 32x32"),
    (["--cascade", "--trainer"], "--trainer does not apply to --cascade"),
    (["--cascade", "--images", "0"], "--images must be an integer >= 1"),
    (["--images", "2"], "--images applies to --cascade only"),
    (["--distill-method", "step"], "--distill-method applies to --cascade only"),
])
def test_cascade_speed_bad_options_are_one_line_errors(bench_tool, tmp_path, capsys, args, message):
    assert bench_tool.main(args + ["--json", str(tmp_path / "b.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bench: error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "b.json").exists()

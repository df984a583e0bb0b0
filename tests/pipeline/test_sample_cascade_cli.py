"""tools/sample_cascade.py: outputs on disk, and one-line errors with exit code 2 for every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_tool
from PIL import Image

import stages
from cascade.cli import parse_ckpt_pairs, parse_stage_values, steps_value
from cascade.pipeline.cascade_pipeline import CascadeConfigError
from cascade.pipeline.outputs import sample_stem
from cascade.summary import read_summary

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "sample_cascade.py"


sample_cascade = load_tool("sample_cascade")


def test_command_writes_final_images_stages_grid_and_settings(runs_root, tmp_path):
    out = tmp_path / "samples"
    result = subprocess.run(
        [sys.executable, str(TOOL), "--classes", "0,2", "--w", "base32=3,sr64=1", "--steps", "1",
         "--runs", str(runs_root), "--out", str(out), "--seed", "4"],
        check=False, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr  # stderr is a pipe: no progress bar, a clean log
    settings = json.loads((out / "settings.json").read_text())
    for stem in (sample_stem(c, 0, settings["class_names"]) for c in (0, 2)):
        assert Image.open(out / f"{stem}.png").size == (256, 256)
        for stage, res in (("base32", 32), ("sr64", 64), ("sr128", 128), ("sr256", 256)):
            assert Image.open(out / stage / f"{stem}.png").size == (res, res)
    grid = Image.open(out / "grid.png")
    assert grid.size[0] > 4 * 256 and grid.size[1] > 2 * 256  # 4 stage columns + labels, 2 rows + header
    assert settings["classes"] == [0, 2] and settings["seed"] == 4
    assert settings["stages"]["base32"]["w"] == 3.0 and settings["stages"]["sr128"]["w"] == 0.0
    assert all(s["num_steps"] == 1 for s in settings["stages"].values())
    assert Path(settings["checkpoints"]["sr256"]["path"]).is_relative_to(runs_root / "sr256")
    assert "sr256" in result.stderr  # a progress bar per stage


def test_stages_option_stops_the_chain_early(runs_root, tmp_path, capsys):
    out = tmp_path / "samples"
    code = sample_cascade.main(["--classes", "2", "--num-per-class", "2", "--stages", "base32,sr64",
                                "--steps", "base32=3,sr64=ddim2", "--sampler", "sr64=ddim", "--truncate",
                                "--aug-level", "sr64=0.4", "--runs", str(runs_root),
                                "--out", str(out)])
    assert code == 0
    settings = json.loads((out / "settings.json").read_text())
    stems = [sample_stem(2, i, settings["class_names"]) for i in (0, 1)]
    assert sorted(p.name for p in out.glob("*.png")) == sorted([f"{s}.png" for s in stems] + ["grid.png"])
    assert Image.open(out / f"{stems[1]}.png").size == (64, 64)
    assert not (out / "sr128").exists()
    assert settings["stages"]["sr64"]["truncate"] and settings["stages"]["base32"]["stop_at_index"] is not None
    own = stages.get_stage("base32", "tiny").sampling.sampler  # the runs' preset: the base stage keeps its own
    assert [settings["stages"][n]["sampler"] for n in ("base32", "sr64")] == [own, "ddim"]


def _error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--stages", "base32,sr128"], "stage sr128: takes 64x64 inputs but base32 makes 32x32"),
        (["--w", "base32=3,sr64="], "--w: malformed item"),
    ],
)
def test_bad_input_in_a_subprocess_gives_one_line_and_exit_2(runs_root, tmp_path, args, expected):
    result = subprocess.run(
        [sys.executable, str(TOOL), "--classes", "1", "--runs", str(runs_root),
         "--out", str(tmp_path / "o"), *args],
        check=False, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert result.returncode == 2
    assert expected in _error_line(result.stderr)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--classes", "1,3"], "stage base32: class 3 is out of range"),
        (["--classes", "1,x"], "--classes: malformed"),
        (["--classes", "1,7,1"], "class 1 is listed twice"),
        (["--stages", "base32,sr32"], "--stages: unknown stage 'sr32'"),
        (["--w", "-1"], "stage base32: w must be >= 0"),
        (["--w", "base32=abc"], "--w: bad value 'abc'"),
        (["--w", "sr999=1"], "'sr999' is not in the chain"),
        (["--steps", "-4"], "stage base32: steps must be a positive"),
        (["--steps", "sr64=-1"], "stage sr64: steps must be a positive"),
        (["--aug-level", "sr64=2"], "stage sr64: aug_level must be in"),
        (["--ckpt", "sr64"], "--ckpt: malformed 'sr64'"),
        (["--ckpt", "sr64=/nonexistent/run"], "stage sr64:"),
        (["--runs", "/nonexistent/runs"], "stage base32:"),
        (["--classifier-scale", "2"], "needs a classifier checkpoint"),
        (["--eta", "0.5", "--sampler", "ddpm"], "eta 0.5 applies to the ddim sampler only"),
        (["--eta", "2", "--sampler", "ddim"], "eta must be in [0.0, 1.0]"),
        (["--w", "inf"], "w must be finite"),
        (["--num-per-class", "two"], "--num-per-class: must be an integer >= 1, got 'two'"),
        (["--precision", "fp8"], "precision 'fp8' is unknown"),
        (["--sampler", "euler"], "sampler 'euler' is unknown"),
        (["--sampler", "sr64=euler"], "stage sr64: sampler 'euler' is unknown"),
        (["--sampler", "sr64=ddim,sr64=ddpm"], "--sampler: stage sr64 is given twice"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(runs_root, tmp_path, capsys, args, expected):
    argv = ["--classes", "1", "--runs", str(runs_root), "--out", str(tmp_path / "o"), *args]
    try:
        code = sample_cascade.main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    assert expected in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_stage_value_lists_parse_per_stage_and_keep_commas_inside_values():
    assert parse_stage_values("3.0", float, "--w") == 3.0
    assert parse_stage_values("base32=3,sr64=1", float, "--w") == {"base32": 3.0, "sr64": 1.0}
    assert parse_stage_values("base32=10,5,sr64=ddim4", steps_value, "--steps") == {"base32": "10,5", "sr64": "ddim4"}
    assert parse_stage_values("sr64=25", steps_value, "--steps") == {"sr64": 25}
    assert parse_ckpt_pairs(["base32=runs/a", "sr64=/b/c"]) == {"base32": "runs/a", "sr64": "/b/c"}
    for bad in ("base32=1,base32=2", "=1", "base32=", "base32=1,junk"):
        with pytest.raises(CascadeConfigError, match="--w"):
            parse_stage_values(bad, float, "--w")


def test_no_sampling_flags_use_each_checkpoints_own_settings(runs_root, tmp_path, monkeypatch):
    """`--classes` alone: every stage samples with the SamplingSettings stored in its checkpoint."""
    from cascade.checkpoint import load_config
    from cascade.config import StageConfig

    out = tmp_path / "samples"
    stored = {}
    for name in ("base32", "sr64"):
        stage = StageConfig.from_dict(load_config(runs_root / name)["stage"])
        stored[name] = stage.sampling.to_dict()
    assert stored["base32"]["w"] > 0 and stored["sr64"]["steps"] == 25  # each stage's own defaults
    assert sample_cascade.main(["--classes", "1", "--stages", "base32,sr64", "--runs", str(runs_root),
                                "--out", str(out)]) == 0
    settings = json.loads((out / "settings.json").read_text())
    for name, want in stored.items():
        got = settings["stages"][name]
        assert {k: got[k] for k in want} == want, name


@pytest.mark.parametrize(
    ("w_option", "expected_w", "marked"),
    [
        ("2.5", {"base32": 2.5, "sr64": None}, "base32"),  # bare: the chain's first stage only
        ("sr64=2", {"base32": None, "sr64": 2.0}, "sr64"),  # named: that stage only
    ],
)
def test_guidance_changes_only_the_stage_it_names_and_the_summary_marks_it(runs_root, tmp_path, capsys, w_option,
                                                                            expected_w, marked):
    from cascade.checkpoint import load_config
    from cascade.config import StageConfig

    own = {name: StageConfig.from_dict(load_config(runs_root / name)["stage"]).sampling.w
           for name in ("base32", "sr64")}
    out = tmp_path / "samples"
    assert sample_cascade.main(["--classes", "1", "--stages", "base32,sr64", "--w", w_option, "--steps", "1",
                                "--runs", str(runs_root), "--out", str(out)]) == 0
    settings = json.loads((out / "settings.json").read_text())
    for name, want in expected_w.items():
        assert settings["stages"][name]["w"] == (own[name] if want is None else want), name
    rows = read_summary(capsys.readouterr().err)
    assert rows["device"] == "cpu" and rows["seed"] == "0" and rows["out"] == str(out)
    for name in ("base32", "sr64"):
        row = rows[name]
        w = settings["stages"][name]["w"]
        assert f"step {settings['checkpoints'][name]['step']}" in row
        assert f"{settings['stages'][name]['sampler']} 1 steps (--steps)" in row  # a bare --steps is every stage's
        assert (f"w={w:g} (--w)" in row) == (name == marked), row
        assert f"w={w:g}" in row
        assert f"{2 if w > 0 else 1} NFE/image" in row  # one step, doubled by guidance
    assert "s=0.03 ·" in rows["sr64"]  # the checkpoint's own level, unmarked


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp2m", "heun"])
@pytest.mark.parametrize(("w", "interval", "stop"), [(0.0, None, None), (2.0, None, None), (2.0, "mid", None),
                                                     (1.0, None, 2)])
def test_network_evaluations_count_what_each_sampler_calls(sampler, w, interval, stop):
    """NFE per image from the settings alone equals the images the network sees in a real sampler run."""
    import stages
    from cascade.config import SamplingSettings
    from cascade.diffusion.guidance import classifier_free_guidance
    from cascade.diffusion.samplers import SAMPLERS
    from cascade.nets.build import build_diffusion
    from cascade.pipeline.plan import network_evaluations, respaced_timesteps

    stage = stages.get_stage("base32", "tiny", num_classes=3)
    diffusion = build_diffusion(stage)
    timesteps = respaced_timesteps("base32", diffusion.num_timesteps, 6)
    guidance_interval = (timesteps[1], timesteps[3]) if interval == "mid" else None
    settings = SamplingSettings(sampler=sampler, steps=6, w=w, guidance_interval=guidance_interval)
    seen = []

    def network(x, t, **kwargs):
        seen.append(x.shape[0])
        return torch.zeros_like(x)

    model = classifier_free_guidance(network, w, 3, guidance_interval, diffusion.num_timesteps) if w else network
    batch = 2
    SAMPLERS[sampler](model, diffusion.respace(timesteps), x_T=torch.randn(batch, 3, 4, 4),
                      model_kwargs={"y": torch.zeros(batch, dtype=torch.long)}, stop_at_index=stop)
    assert network_evaluations(settings, timesteps, stop) == sum(seen) / batch
    steps_run = 6 if stop is None else 6 - 1 - stop
    # Heun: a correction on every step but the first and the one to clean data (EDM Algorithm 1)
    assert len(seen) == (steps_run if sampler != "heun" else 2 * steps_run - (2 if stop is None else 1))

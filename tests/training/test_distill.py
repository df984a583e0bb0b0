"""Distilling a stage (cascade.training.distill, tools/distill_stage.py) and sampling the student, on CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_tool, one_line, tiny_run_config

from cascade import checkpoint
from cascade.training.trainer_config import DistillSettings

ROOT = Path(__file__).resolve().parents[2]


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "CASCADE_DEBUG")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(tool: str, *args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "tools" / f"{tool}.py"), *map(str, args)], check=False, cwd=cwd,
                          env=_env(), capture_output=True, text=True, timeout=240)


def _student(teacher_run: Path, **settings):
    from cascade.training.distill import student_stage

    path = checkpoint.resolve_checkpoint(teacher_run)
    return student_stage(checkpoint.load_stage_config(path), path, DistillSettings(**settings))


def test_a_student_starts_as_its_teachers_conditional_model(tiny_runs):
    from cascade.nets.build import build_model, example_inputs
    from cascade.training.distill import init_student

    for name in ("base32", "sr64"):
        student = _student(tiny_runs[name], levels=4)
        _, teacher, _ = checkpoint.load_stage(tiny_runs[name])
        model = build_model(student)
        init_student(model, student.distill.teacher)
        model.eval()
        inputs = example_inputs(student, 2, generator=torch.Generator().manual_seed(0))
        w = inputs.pop("w")
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs, w=w), teacher(**inputs))
            torch.testing.assert_close(model(**inputs, w=w * 0 + 1.5), teacher(**inputs))
        with pytest.raises(ValueError, match="needs w"):
            model(**inputs)


def test_distill_command_writes_a_checkpoint_that_samples_with_no_flags(synthetic_shards, tiny_runs, tmp_path):
    run_dir = tmp_path / "base32-distilled"
    done = _run("distill_stage", "stage=base32", f"teacher={tiny_runs['base32']}", f"data.root={synthetic_shards}",
                f"run_dir={run_dir}", "trainer.max_steps=2", "trainer.batch_size=2", "trainer.warmup_steps=0",
                "trainer.progress=false", "trainer.eval_every=0", "trainer.ema_sigma_rels=[]",
                "data.num_workers=0", "data.shuffle_buffer=8")
    assert done.returncode == 0, done.stderr
    assert "guided step distillation: 4 DDIM steps for the teacher's 16, from teacher" in done.stderr  # the summary
    record = checkpoint.load_config(run_dir)
    assert record["stage"]["distill"]["method"] == "step" and record["stage"]["distill"]["teacher_steps"] == 16
    assert record["stage"]["sampling"]["sampler"] == "ddim" and record["stage"]["sampling"]["steps"] == 4
    grids = sorted((run_dir / "samples").glob("*.png"))
    assert grids, "a student's run writes sample grids with its own sampler"

    out = tmp_path / "samples"
    sampled = _run("sample_cascade", "--classes", "0,1", "--stages", "base32", "--ckpt", f"base32={run_dir}",
                   "--out", out)
    assert sampled.returncode == 0, sampled.stderr
    assert "ddim 4 steps · eta=0 · w=1 (distilled) · 4 NFE/image" in sampled.stderr
    assert len(list(out.glob("*.png"))) >= 2

    evaluated = _run("eval_fid", "--data", synthetic_shards, "--stages", "base32", "--ckpt", f"base32={run_dir}",
                     "--num-samples", 4, "--out", tmp_path / "eval")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "sampler=ddim steps=4 eta=0.0 w=1.0" in evaluated.stderr  # the student's own settings, no new flag

    too_many = _run("sample_cascade", "--classes", "0", "--stages", "base32", "--ckpt", f"base32={run_dir}",
                    "--steps", "5", "--out", tmp_path / "bad")
    assert too_many.returncode == 2
    assert "step-distilled to 4 DDIM steps: sample it with sampler ddim, eta 0 and steps 4, not ddim 5" in one_line(
        too_many.stderr)


def test_a_cascade_mixes_distilled_and_undistilled_stages(synthetic_shards, tiny_runs, tmp_path):
    from cascade.pipeline.cascade_pipeline import CascadePipeline
    from cascade.training.trainer import train_stage

    student = _student(tiny_runs["sr64"], levels=4, method="consistency")
    assert student.sampling.steps == 2 and student.sampling.aug_level == pytest.approx(0.03)
    run = tmp_path / "sr64-distilled"
    train_stage(student, tiny_run_config(run, synthetic_shards, max_steps=1))
    pipe = CascadePipeline.from_checkpoints({"base32": tiny_runs["base32"], "sr64": run})
    plan = pipe.validate([0, 1])
    images = pipe.run(plan, progress=False)
    assert images["sr64"].shape == (2, 3, 64, 64) and torch.isfinite(images["sr64"]).all()
    rows = dict(pipe.describe(plan))
    assert "consistency 2 steps" in rows["sr64"] and "2 NFE/image" in rows["sr64"]


def test_a_distillation_run_resumes_exactly(synthetic_shards, tiny_runs, tmp_path):
    from cascade.training.trainer import train_stage

    student = _student(tiny_runs["base32"], levels=4)
    ref, resumed = tmp_path / "ref", tmp_path / "resumed"
    train_stage(student, tiny_run_config(ref, synthetic_shards, max_steps=4, ckpt_every=2, keep_last=5))
    # the run stopped after its step-2 checkpoint, then resumed from it
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    train_stage(student, tiny_run_config(resumed, synthetic_shards, max_steps=4, ckpt_every=2, keep_last=5))
    losses = {}
    for run in (ref, resumed):
        records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        losses[run] = {r["step"]: r["loss"] for r in records if r["step"] > 2}
    assert losses[ref] == pytest.approx(losses[resumed], rel=1e-6) and sorted(losses[ref]) == [3, 4]
    for which in ("model", "ema"):
        a, b = checkpoint.load_weights(ref, which), checkpoint.load_weights(resumed, which)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from cascade.harness.hydra_tool import CONFIG_DIR
    from stages.hydra_store import register

    register()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None, job_name="distill_stage"):
        return compose("distill", overrides=overrides)


def _retargeted(run: Path, tmp_path: Path, **stage) -> Path:
    """A copy of ``run``'s newest checkpoint whose config.json says other stage settings."""
    src = checkpoint.resolve_checkpoint(run)
    dst = tmp_path / "other" / "checkpoints" / src.name
    shutil.copytree(src, dst)
    record = json.loads((dst / "config.json").read_text())
    record["stage"].update(stage)
    (dst / "config.json").write_text(json.dumps(record))
    return dst


@pytest.mark.parametrize("case, message", [
    ("missing", "teacher is required: teacher=RUN"),
    ("nowhere", "does not exist; pass teacher=RUN, a run folder of tools/train_stage.py"),
    ("guidance steps", "distill.steps applies to methods step and consistency; a guidance student samples with"),
    ("other stage", "is a base32 checkpoint (32x32), not sr64; pass stage=base32 or a teacher of sr64"),
    ("other resolution", "generates 128x128 from 64x64, stage sr64 here 64x64"),
    ("stage override", "stage.unet was changed, but a student's stage settings are its teacher's"),
    ("classifier", "is a classifier; distil a base or sr stage"),
    ("steps", r"distill.steps must be 0 (the stage kind's default) or in [1, distill.levels = 4], got 5"),
    ("teacher steps", "distill.teacher_steps must be a multiple of the student's 2 steps larger than 2 (4, 6, ...), got 5"),
    ("w_max", "distill.w_max 0.5 is below the teacher's default w 1; raise distill.w_max"),
    ("distilled teacher", "is itself step-distilled"),
])
def test_bad_distillation_settings_are_one_line_errors(case, message, synthetic_shards, tiny_runs, tmp_path, capsys):
    from cascade.harness.hydra_tool import run_training

    tool = load_tool("distill_stage")
    args = {"stage": "sr64", "teacher": tiny_runs["sr64"]}
    extra = []
    if case == "missing":
        del args["teacher"]
    elif case == "nowhere":
        args["teacher"] = tmp_path / "nowhere"
    elif case == "other stage":
        args["teacher"] = tiny_runs["base32"]
    elif case == "other resolution":
        args["teacher"] = _retargeted(tiny_runs["sr64"], tmp_path, resolution=128, low_resolution=64)
    elif case == "stage override":
        extra = ["stage.unet.model_channels=16"]
    elif case == "classifier":
        args = {"stage": "classifier32", "teacher": tiny_runs["classifier32"]}
    elif case == "steps":
        extra = ["distill.method=consistency", "distill.levels=4", "distill.steps=5"]
    elif case == "guidance steps":
        extra = ["distill.method=guidance", "distill.steps=3"]
    elif case == "teacher steps":
        extra = ["distill.teacher_steps=5"]
    elif case == "w_max":
        extra = ["distill.w_max=0.5"]
    elif case == "distilled teacher":
        student = _student(tiny_runs["sr64"], levels=4)
        args["teacher"] = _retargeted(tiny_runs["sr64"], tmp_path, distill=student.to_dict()["distill"],
                                      sampling=student.to_dict()["sampling"])
    overrides = [f"{k}={v}" for k, v in args.items()] + [f"data.root={synthetic_shards}",
                                                          f"run_dir={tmp_path / 'run'}", *extra]
    if case == "steps":  # a DistillSettings value: refused when the settings are built, before any teacher is read
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            DistillSettings(method="consistency", levels=4, steps=5)
    code = run_training(_compose(overrides), tool.TOOL)
    assert code == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("distill_stage: error: ") and message in line, line
    assert not (tmp_path / "run" / "checkpoints").exists()

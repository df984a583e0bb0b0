"""Damaged and mismatched checkpoints: a missing or unreadable file of a step folder, weights that do not fit
their config.json and invalid settings in it are one line naming the file, in sampling and resume alike; a
resume=auto run steps back past them to the newest intact checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import stages
from cascade import checkpoint
from cascade.nets.build import build_model
from cascade.training.resume import read_resume_point

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def stage():
    return stages.get_stage("base32", "tiny", num_classes=3)


@pytest.fixture(scope="module")
def model(stage):
    torch.manual_seed(0)
    return build_model(stage)


def _run_with_checkpoints(run_dir: Path, stage, model, steps=(2, 4)) -> list[Path]:
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    return [checkpoint.save_checkpoint(run_dir, step, weights={"model": weights, "ema": weights},
                                       training_state={"step": step}, config={"stage": stage.to_dict()})
            for step in steps]


def _edit_stage(step_dir: Path, edit) -> None:
    file = step_dir / "config.json"
    record = json.loads(file.read_text())
    edit(record["stage"])
    file.write_text(json.dumps(record))


def _one_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize("victim", ["ema.safetensors", "model.safetensors", "training_state.pt", "config.json"])
def test_resume_auto_steps_back_past_a_missing_file(tmp_path, stage, model, victim, capsys):
    older, newest = _run_with_checkpoints(tmp_path, stage, model)
    (newest / victim).unlink()
    point = read_resume_point(tmp_path, "auto", stage, CPU, main_process=True, model=model)
    assert point.path == older and point.state == {"step": 2}
    err = capsys.readouterr().err
    assert f"checkpoint file {newest / victim} is missing" in err and f"older checkpoint {older}" in err
    with pytest.raises(checkpoint.CheckpointError, match=f"checkpoint file {newest / victim} is missing"):
        read_resume_point(tmp_path, str(newest), stage, CPU, main_process=True, model=model)
    with pytest.raises(checkpoint.CheckpointError, match=f"{newest / victim} is missing"):
        checkpoint.verify_checkpoint(newest) if victim != "config.json" else checkpoint.load_stage(newest)


def test_weights_that_do_not_fit_their_config_are_one_line_in_load_stage_and_resume(tmp_path, stage, model):
    for step_dir in _run_with_checkpoints(tmp_path, stage, model):
        _edit_stage(step_dir, lambda s: s["unet"].update(model_channels=64))
    newest = checkpoint.latest_checkpoint(tmp_path)
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.load_stage(newest)
    message = str(err.value)
    assert message.startswith(f"{newest / 'ema.safetensors'} does not match {newest / 'config.json'}: ")
    assert "tensors differ in shape, 0 missing, 0 unexpected" in message and "\n" not in message
    wide = stage.with_overrides({"unet": {"model_channels": 64}})  # the run's settings agree with config.json
    wide_model = build_model(wide)
    with pytest.raises(checkpoint.CheckpointError, match="model.safetensors does not match"):
        read_resume_point(tmp_path, str(newest), wide, CPU, main_process=False, model=wide_model)
    with pytest.raises(ValueError, match="every checkpoint in .* is damaged"):
        read_resume_point(tmp_path, "auto", wide, CPU, main_process=False, model=wide_model)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(num_classes=5), r"2 tensors differ in shape, 0 missing, 0 unexpected"),
    (lambda s: s["unet"].update(channel_mult=[1, 2, 2, 2]), r"missing, \d+ unexpected"),
    (lambda s: s["unet"].update(model_channels="32"), "unet.model_channels must be int, got '32'"),
    (lambda s: s["unet"].update(model_channels=32.5), "unet.model_channels must be int, got 32.5"),
    (lambda s: s["unet"].update(channel_mult="124"), "unet.channel_mult must be a list of int, got '124'"),
    (lambda s: s["diffusion"].update(num_timesteps=10**9), r"diffusion.num_timesteps must be an integer in \[1, 100000\]"),
    (lambda s: s.update(resolution=8192), r"resolution must be an integer in \[1, 4096\]"),
])
def test_a_mismatched_or_invalid_config_is_one_checkpoint_error(tmp_path, stage, model, edit, message):
    (step_dir,) = _run_with_checkpoints(tmp_path, stage, model, steps=(2,))
    _edit_stage(step_dir, edit)
    with pytest.raises(checkpoint.CheckpointError, match=message) as err:
        checkpoint.load_stage(step_dir)
    assert str(step_dir / "config.json") in str(err.value) and "\n" not in str(err.value)


def test_sample_cascade_names_the_damaged_file_in_one_line_exit_2(tmp_path, stage, model):
    missing, mismatched = (_run_with_checkpoints(tmp_path / name, stage, model, steps=(2,))[0]
                           for name in ("missing", "mismatched"))
    (missing / "ema.safetensors").unlink()
    _edit_stage(mismatched, lambda s: s["unet"].update(model_channels=64))
    for step_dir, expected in ((missing, f"checkpoint file {missing / 'ema.safetensors'} is missing"),
                               (mismatched, f"{mismatched / 'ema.safetensors'} does not match")):
        done = subprocess.run([sys.executable, str(ROOT / "tools" / "sample_cascade.py"), "--classes", "1",
                               "--stages", "base32", "--ckpt", f"base32={step_dir}", "--steps", "2", "--out",
                               str(tmp_path / "out")], capture_output=True, text=True, timeout=120, check=False,
                              env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
        assert done.returncode == 2, done.stderr
        assert expected in _one_line(done.stderr)

"""One source of configuration: hydra's composed defaults are the dataclasses' and presets', and
`SamplingSettings` checks every value once, in its constructor."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import stages
from cascade.config import SamplingSettings, StageConfig, StageKind
from cascade.training.trainer_config import DataConfig, TrainerConfig
from stages.hydra_store import register

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _compose(*overrides: str) -> dict:
    register()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose(config_name="train", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=False)


@pytest.mark.parametrize("name", stages.STAGE_NAMES)
@pytest.mark.parametrize("size", stages.SIZES)
def test_composed_stage_is_the_preset(name, size):
    composed = _compose(f"stage={name}", f"size={size}")["stage"]
    assert composed["num_classes"] == "???"  # taken from the shards by the command line
    preset = stages.get_stage(name, size, num_classes=7)
    assert StageConfig.from_dict({**composed, "num_classes": 7}) == preset


def test_composed_trainer_and_data_defaults_are_the_dataclasses():
    paper = _compose("size=paper")
    assert paper["trainer"] == {k: list(v) if isinstance(v, tuple) else v
                                for k, v in dataclasses.asdict(TrainerConfig()).items()}
    defaults = {f.name: f.default for f in dataclasses.fields(DataConfig) if f.name != "root"}
    assert {k: v for k, v in paper["data"].items() if k != "root"} == defaults
    assert paper["data"]["root"] == "???"
    tiny = _compose()["trainer"]
    tiny_yaml = OmegaConf.to_container(OmegaConf.load(CONFIGS / "size" / "tiny.yaml"))["trainer"]
    changed = {k for k in tiny if tiny[k] != paper["trainer"][k]}
    assert changed == set(tiny_yaml)  # the size file holds exactly what differs, nothing repeated


def test_stage_trainer_files_change_only_their_stage_and_size():
    """configs/stage_trainer/<stage>_<size>.yaml: what one stage at one size changes in its size's trainer settings
    (optional in the defaults list, so a misnamed file would be silently ignored: each name must be a real pair)."""
    files = sorted((CONFIGS / "stage_trainer").glob("*.yaml"))
    assert [f.stem for f in files] == ["sr64_tiny"]
    for f in files:
        name, size = f.stem.rsplit("_", 1)
        assert name in stages.STAGE_NAMES and size in stages.SIZES
        changes = OmegaConf.to_container(OmegaConf.load(f))
        plain = _compose(f"stage={name}", f"size={size}", "~stage_trainer")["trainer"]  # the size's values alone
        composed = _compose(f"stage={name}", f"size={size}")["trainer"]
        assert {k for k in composed if composed[k] != plain[k]} == set(changes)  # nothing repeated, all applied
        assert {k: composed[k] for k in changes} == changes
    assert _compose("stage=sr64")["trainer"]["lr"] == 1e-3 and _compose("stage=sr128")["trainer"]["lr"] == 2e-4
    assert _compose("stage=sr64", "size=paper")["trainer"]["lr"] == TrainerConfig().lr
    assert _compose("stage=sr64", "trainer.lr=3e-4")["trainer"]["lr"] == 3e-4  # the command line still wins


def test_overrides_are_type_checked_at_composition():
    from hydra.errors import ConfigCompositionException

    assert _compose("stage=sr64", "stage.sampling.w=2.5")["stage"]["sampling"]["w"] == 2.5
    for bad in ("stage.sampling.w=abc", "trainer.max_stepz=2", "stage.unet.widht=3"):
        with pytest.raises(ConfigCompositionException):
            _compose(bad)


def test_sampling_settings_defaults_and_coercion():
    s = SamplingSettings(steps="25", w=3, guidance_interval=[100, 800])
    assert s.steps == 25 and s.w == 3.0 and isinstance(s.w, float) and s.guidance_interval == (100.0, 800.0)
    assert SamplingSettings(steps="ddim25").steps == "ddim25"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.w = 1.0  # frozen: changed copies come from dataclasses.replace


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sampler": "euler"}, "sampler 'euler' is unknown"),
    ({"steps": 0}, "steps must be a positive number"),
    ({"steps": "ddim-x"}, "bad steps 'ddim-x'"),
    ({"steps": 2.5}, "steps must be a count"),
    ({"eta": -0.1, "sampler": "ddim"}, "eta must be in [0.0, 1.0]"),
    ({"eta": 2.0, "sampler": "ddim"}, "eta must be in [0.0, 1.0]"),  # √(1 − ᾱ − σ²) would be NaN
    ({"eta": 0.5}, "eta 0.5 applies to the ddim sampler only"),
    ({"w": float("inf")}, "w must be finite"),
    ({"classifier_scale": float("nan"), "classifier": "c"}, "classifier_scale must be finite"),
    ({"classifier": "runs/classifier32"}, "given with classifier_scale 0"),
    ({"w": -1}, "w must be >= 0.0"),
    ({"w": "3"}, "w must be a number"),
    ({"aug_level": 1.5}, "aug_level must be in [0.0, 1.0]"),
    ({"dynamic_threshold": 0.0}, "dynamic_threshold must be in (0, 1]"),
    ({"classifier_scale": 2.0}, "needs a classifier checkpoint"),
    ({"guidance_interval": (800, 100)}, "guidance_interval must be (t_lo, t_hi)"),
    ({"guidance_interval": (1, 2, 3)}, "guidance_interval must be (t_lo, t_hi)"),
])
def test_sampling_settings_reject_bad_values_in_one_line(kwargs, message):
    with pytest.raises(ValueError) as err:
        SamplingSettings(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_sampling_settings_checked_against_the_stage():
    sr64, base = stages.get_stage("sr64"), stages.get_stage("base32")
    with pytest.raises(ValueError, match="stage base32: sampling steps 25 exceeds its 10 training timesteps"):
        base.with_overrides({"diffusion": {"num_timesteps": 10}})
    assert sr64.kind is StageKind.sr and sr64.kind == "sr"  # a str enum: JSON and old comparisons still work
    with pytest.raises(ValueError, match="stage sr64: an SR stage needs sampling.aug_level"):
        sr64.with_overrides({"sampling": {"aug_level": None}})
    with pytest.raises(ValueError, match="stage base32 is the base stage and takes no conditioning"):
        base.with_overrides({"sampling": {"aug_level": 0.1}})
    with pytest.raises(ValueError, match="truncate applies to SR stages only"):
        base.with_overrides({"sampling": {"truncate": True}})
    with pytest.raises(ValueError, match=r"guidance_interval \[0.0, 1000.0\] must lie in \[0, 1000\)"):
        base.with_overrides({"sampling": {"guidance_interval": [0, 1000]}})


def test_old_records_keep_their_sampling_level():
    """A checkpoint record from before SamplingSettings keeps its level s (then under aug.sample_aug_level)."""
    record = stages.get_stage("sr64").to_dict()
    del record["sampling"]
    record["aug"]["sample_aug_level"] = 0.2
    assert StageConfig.from_dict(record).sampling.aug_level == 0.2


# ----------------------------------------------------------------------------------------------- the command line

TRAIN_TOOL = Path(__file__).resolve().parents[1] / "tools" / "train_stage.py"
# Wording of hydra's and OmegaConf's messages that the tool must never match: it reads their attributes instead.
HYDRA_WORDING = ("To append to your config use", "is not in struct", "Available options", "Could not override",
                 "Error merging override", "full_key:", "Config search path", "See https://hydra.cc", "not in '")


def _train_tool():
    spec = importlib.util.spec_from_file_location("train_stage_tool", TRAIN_TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", [TRAIN_TOOL, TRAIN_TOOL.parent / "distill_stage.py",
                                  TRAIN_TOOL.parents[1] / "cascade" / "harness" / "hydra_tool.py"])
def test_train_tool_uses_hydras_public_surface_only(path):
    """No module of hydra's `_internal` package (imported by name or by string), and no hydra message text matched:
    a hydra release may change both (the tools and their shared edge, `cascade.harness.hydra_tool`)."""
    tree = ast.parse(path.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    if path.name == "hydra_tool.py":
        assert {m for m in imported if m.split(".")[0] in ("hydra", "omegaconf")}, "the tools' edge is a hydra app"
    assert not [m for m in imported if "_internal" in m]
    strings = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    assert not [s for s in strings if "_internal" in s or s == "'"]  # no import_module("hydra._internal…"), no split("'")
    assert not [(s, w) for s in strings for w in HYDRA_WORDING if w in s]


@pytest.mark.parametrize("argv, message", [
    (["trainer.max_stepz=2"], "unknown key 'trainer.max_stepz'; check its spelling (python tools/train_stage.py"),
    (["trainer.max_stepz=2"], "--cfg job lists every key), or add a new key with +trainer.max_stepz=2"),
    (["hydra.job.foo=1"], "unknown key 'hydra.job.foo'"),
    (["size=huge"], "In 'train': Could not find 'size/huge'; valid options: paper, tiny"),
    (["hydra/launcher=nope"], "valid options: basic"),
    (["trainer.lr=abc"], "Error merging override trainer.lr=abc; Value 'abc' of type 'str' could not be"),
    (["stage.unet.channel_mult.5=1"], "stage.unet.channel_mult[5]: Error merging override stage.unet.channel_"),
    (["trainer.lr=${size}"], "trainer.lr: While dereferencing interpolation '${size}'"),
    (["+trainer.lr=1"], "An item is already at 'trainer.lr'; Either remove + prefix: 'trainer.lr=1'"),
    (["~trainer.foo"], "'trainer.foo' does not exist"),
    (["trainer.lr=[1,", "-m"], "override 'trainer.lr=[1,' is malformed (no viable alternative at input '[1,'); "),
    (["trainer.lr=[1,"], "; see https://hydra.cc/docs/advanced/override_grammar/basic/"),
    (["--bogus"], "unrecognized arguments: --bogus (overrides are KEY=VALUE, e.g. trainer.max_steps=1000)"),
    (["--cfg"], "argument --cfg/-c: expected one argument"),
    (["-m", "--cfg", "job"], "give one of --run, --multirun, --cfg, --info and --shell-completion"),
    (["--config-name=nope"], "Cannot find primary config 'nope'. Check that it's in your config search path"),
    (["stage=sr64", "preset=sr128_tiny"], "preset=sr128_tiny does not match stage=sr64 size=tiny; choose the stage"),
])
def test_train_tool_composition_errors_are_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.delenv("CASCADE_DEBUG", raising=False)
    tool = _train_tool()
    with pytest.raises(SystemExit) as done:
        tool.check_command_line(["data.root=x", f"run_dir={tmp_path / 'r'}", *argv])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train_stage: error: ") and message in err, err
    assert not (tmp_path / "r").exists()


def _run_train_tool(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "CASCADE_DEBUG")}
    return subprocess.run([sys.executable, str(TRAIN_TOOL), *map(str, args)], check=False, cwd=cwd,
                          env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=180)


def test_train_tool_help_and_resolved_config_come_from_hydra(tmp_path):
    shown = _run_train_tool("--help", cwd=tmp_path)
    assert shown.returncode == 0 and "stage: base32, classifier32, sr128, sr256, sr64" in shown.stdout
    assert "size: paper, tiny" in shown.stdout and not shown.stderr
    resolved = _run_train_tool("stage=sr64", "data.root=x", "--cfg", "job", "--resolve", cwd=tmp_path)
    assert resolved.returncode == 0, resolved.stderr
    job = OmegaConf.to_container(OmegaConf.create(resolved.stdout))
    assert job["run_dir"] == "runs/sr64" and job["trainer"]["lr"] == 1e-3 and job["stage"]["name"] == "sr64"
    assert job == {**_compose("stage=sr64", "data.root=x"), "run_dir": "runs/sr64"}
    assert not (tmp_path / "runs").exists() and not (tmp_path / "outputs").exists()


def test_train_tool_multirun_runs_each_job(tmp_path):
    """hydra's sweeps still run: each job is composed by hydra, and the first failing job ends the sweep in one
    line with exit code 2 (here: no shards), its outputs under run_dir/hydra/multirun-<date>."""
    done = _run_train_tool("-m", "stage=base32,sr64", f"data.root={tmp_path / 'none'}", f"run_dir={tmp_path / 'r'}",
                           cwd=tmp_path)
    assert done.returncode == 2 and "Launching 2 jobs locally" in done.stdout
    assert done.stderr.strip() == f"train_stage: error: dataset folder not found: {tmp_path / 'none'}"
    (sweep,) = (tmp_path / "r" / "hydra").glob("multirun-*")
    assert (sweep / "0" / ".hydra" / "overrides.yaml").is_file()


@pytest.mark.parametrize("override, message", [
    ({"unet": {"model_channels": "32"}}, "unet.model_channels must be int, got '32'"),
    ({"unet": {"model_channels": 32.5}}, "unet.model_channels must be int, got 32.5"),
    ({"unet": {"model_channels": True}}, "unet.model_channels must be int, got True"),
    ({"unet": {"channel_mult": "124"}}, "unet.channel_mult must be a list of int, got '124'"),
    ({"unet": {"num_res_blocks": True}}, "unet.num_res_blocks must be an int or a list of ints, got True"),
    ({"unet": {"dropout": True}}, "unet.dropout must be float, got True"),
    ({"unet": {"attention_resolutions": [8.0]}}, "unet.attention_resolutions must be a list of int"),
    ({"aug": {"blur_sigma": [0.4, "x"]}}, "aug.blur_sigma must be a list of 2 float"),
    ({"sampling": {"truncate": "yes"}}, "sampling.truncate must be bool, got 'yes'"),
    ({"num_classes": 5.0}, "num_classes must be int, got 5.0"),
    ({"name": 3}, "name must be str, got 3"),
    # bounds: generous, but nothing that exhausts the machine before the first step
    ({"diffusion": {"num_timesteps": 10**9}}, "diffusion.num_timesteps must be an integer in [1, 100000]"),
    ({"resolution": 8192}, "resolution must be an integer in [1, 4096]"),
    ({"num_classes": 10**7}, "num_classes must be an integer in [1, 100000]"),
    ({"unet": {"model_channels": 10**6}}, "unet.model_channels must be an integer in [1, 2048]"),
    ({"unet": {"channel_mult": [1] * 11}}, "unet.channel_mult must be 1 to 10 integers in [1, 64]"),
    ({"unet": {"num_res_blocks": 1000}}, "unet.num_res_blocks must be an int in [0, 32]"),
    ({"unet": {"head_channels": 0}}, "unet.head_channels must be an integer in [1, 4096]"),
    ({"aug": {"blur_kernel": 10**5 + 1}}, "aug.blur_kernel must be an odd integer in [1, 99]"),
    ({"diffusion": {"vlb_weight": float("inf")}}, "diffusion.vlb_weight must be a number in [0, 1e+06]"),
])
def test_stage_settings_are_type_checked_and_bounded_in_one_line(override, message):
    with pytest.raises(ValueError) as err:
        stages.get_stage("base32", "tiny").with_overrides(override)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_ints_are_floats_and_lists_are_tuples():
    cfg = stages.get_stage("sr64", "tiny").with_overrides({"unet": {"dropout": 0, "channel_mult": [1, 2, 2, 2]},
                                                           "aug": {"blur_sigma": [1, 2]}})
    assert cfg.unet.dropout == 0.0 and isinstance(cfg.unet.dropout, float)
    assert cfg.unet.channel_mult == (1, 2, 2, 2) and cfg.aug.blur_sigma == (1.0, 2.0)
    assert StageConfig.from_dict(cfg.to_dict()) == cfg


def test_library_validators_refuse_bools_as_numbers():
    import torch

    from cascade.diffusion.gaussian import GaussianDiffusion
    from cascade.diffusion.guidance import (
        check_guidance_interval,
        classifier_free_guidance,
        classifier_guidance,
    )
    from cascade.diffusion.schedules import make_betas, space_timesteps

    model = torch.nn.Identity()
    checks = [
        (lambda: check_guidance_interval((True, 5), 1000), "guidance_interval must be a pair"),
        (lambda: check_guidance_interval((0, 5), True), "num_timesteps must be an integer"),
        (lambda: classifier_free_guidance(model, w=True, null_class=3), "guidance weight w must be a finite number"),
        (lambda: classifier_free_guidance(model, w=float("nan"), null_class=3), "w must be a finite number"),
        (lambda: classifier_free_guidance(model, w=1.0, null_class=True), "null_class must be a class index"),
        (lambda: classifier_guidance(model, model, [0.5], scale=True), "scale must be a finite number"),
        (lambda: make_betas("cosine", True), "num_timesteps must be an integer >= 1"),
        (lambda: space_timesteps(True, "1"), "num_timesteps must be an integer >= 1"),
        (lambda: GaussianDiffusion(make_betas("cosine", 4), vlb_weight=True), "vlb_weight must be >= 0"),
    ]
    for call, message in checks:
        with pytest.raises(ValueError, match=message):
            call()
    assert check_guidance_interval((0, 5), 1000) == (0.0, 5.0)
    assert classifier_free_guidance(model, w=2, null_class=3).w == 2.0

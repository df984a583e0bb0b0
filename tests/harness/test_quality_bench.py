"""tools/quality_bench.py and its library (cascade.harness.quality_bench, quality_recipes, quality_samplers,
quality_report, judge): recipes, teachers and their distilled students, and the trainer's time budget."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_tool

from cascade.evaluation.judge import JudgeSettings, get_judge, train_judge
from cascade.harness.quality_recipes import BenchError, Recipe, apply_recipe
from cascade.harness.quality_report import BASE_COLUMNS, BASE_NFE_COLUMNS, SR_COLUMNS, table_columns
from cascade.harness.quality_samplers import parse_samplers, sample_images

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tool():
    return load_tool("quality_bench")


@pytest.fixture
def shards(synthetic_shards, tmp_path) -> Path:
    """A private copy of the session's synthetic shards (the judge and statistics caches are written into it)."""
    copy = tmp_path / "shards"
    shutil.copytree(synthetic_shards, copy)
    return copy


def _table(md: str) -> tuple[list[str], list[list[str]]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    split = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return split[0], split[2:]


def test_quick_base_run_writes_table_json_and_grids(tool, shards, tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    code = tool.main(["--stage", "base32", "--data", str(shards), "--out", str(out), "--quick",
                      "--recipes", "today,eps-simple", "--workers", "0"])
    assert code == 0
    md = (out / "quality.md").read_text()
    header, rows = _table(md)
    assert tuple(header) == BASE_COLUMNS
    assert [(r[0], r[1]) for r in rows] == [("real images", "–"), ("today", "ddim3"), ("eps-simple", "ddim3")]
    assert "bf16 native:" in md and f"torch {torch.__version__}" in md
    document = json.loads((out / "quality.json").read_text())
    assert document["meta"]["machine"]["torch"] == torch.__version__
    assert isinstance(document["meta"]["machine"]["cpu_bf16_native"], bool)
    trained = [r for r in document["rows"] if not r.get("reference")]
    for row in trained:
        assert row["train_steps"] == 3 and row["nfe_per_image"] == 6  # 3 guided steps: 2 evaluations each
        assert 0.0 <= row["class_accuracy"] <= 1.0 and row["fd"] >= 0 and row["kid_std"] >= 0
        assert 0.0 <= row["precision"] <= 1.0 and 0.0 <= row["recall"] <= 1.0  # k-NN manifolds, k = 3
        assert "cas_top1" not in row  # CAS only with --cas
        assert (out / row["grid"]).is_file()
    assert document["meta"]["judge"]["from_cache"] is False
    assert md in capsys.readouterr().out


def test_quick_sr_run_reports_psnr_and_detail_beside_bicubic(tool, shards, tmp_path, one_thread):
    out = tmp_path / "out"
    assert tool.main(["--stage", "sr64", "--data", str(shards), "--out", str(out), "--quick", "--recipes", "today",
                      "--samplers", "ddim2:s=0.05", "--workers", "0"]) == 0
    header, rows = _table((out / "quality.md").read_text())
    assert tuple(header) == SR_COLUMNS
    assert [r[0] for r in rows] == ["bicubic", "today"]
    document = json.loads((out / "quality.json").read_text())
    bicubic, today = document["rows"]
    assert bicubic["consistency_psnr"] > 25 and bicubic["detail_ratio"] < 1  # bicubic keeps its input, adds none
    assert today["aug_level"] == 0.05 and today["nfe_per_image"] == 4  # w = 1 by default for SR stages
    assert {"consistency_psnr", "psnr", "detail_ratio"} <= set(today)


def test_judge_is_deterministic_and_cached(shards, monkeypatch, one_thread):
    settings = JudgeSettings(epochs=2, batch_size=8, seed=3)
    images = torch.rand(12, 3, 32, 32) * 2 - 1
    labels = torch.arange(3).repeat(4)
    a, b = (train_judge(images, labels, 3, settings).state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    first = get_judge(shards, 32, settings)
    assert not first.from_cache and first.path.is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("the cached judge should have been reused")

    monkeypatch.setattr("cascade.evaluation.judge.train_judge", no_training)
    again = get_judge(shards, 32, settings)
    assert again.from_cache and again.path == first.path and again.val_accuracy == first.val_accuracy
    assert again.features.fingerprint() == first.features.fingerprint()
    with pytest.raises(AssertionError, match="cached judge"):  # other settings: another judge, trained anew
        get_judge(shards, 32, JudgeSettings(epochs=2, batch_size=8, seed=4))


@pytest.mark.parametrize("args, message", [
    (["--stage", "base99"], "--stage: unknown stage 'base99'"),
    (["--recipes", "today,nope"], "--recipes: unknown recipe 'nope'"),
    (["--data", "{missing}"], "--data: dataset folder not found"),
    (["--samplers", "euler10"], "--samplers: bad item 'euler10'"),
    (["--samplers", "ddim10:q=1"], "--samplers: bad option 'q=1'"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--samplers", "consistency2"], "--samplers: consistency2: stage base32: the consistency sampler needs a"),
    (["--student-samplers", "consistency2"], "--student-samplers applies to distilled students: add --distill"),
    (["--distill-levels", "4"], "--distill-levels applies to distilled students"),
    (["--distill-method", "step"], "--distill-method applies to distilled students"),
    (["--distill-steps", "0"], "--distill-steps must be >= 1"),
    (["--distill-steps", "2", "--student-samplers", "ddim8"],
     "--student-samplers: ddim8: stage base32 is step-distilled to 4 DDIM steps: sample it with sampler ddim"),
    (["--distill-steps", "2", "--student-samplers", "consistency2"],
     "--student-samplers: consistency2: stage base32 is step-distilled to 4 DDIM steps: sample it with sampler ddim, eta 0 and steps 4, not consistency 2"),
    (["--distill-steps", "2", "--distill-levels", "4"],
     "--distill-levels applies to --distill-method consistency only, not step"),
    (["--distill-steps", "2", "--distill-teacher-steps", "6"],
     "recipe today: --distill-teacher-steps must be a multiple of the student's 4 steps larger than 4 (8, 12, ...), got 6"),
    (["--distill-steps", "2", "--distill-method", "guidance", "--distill-teacher-steps", "8"],
     "--distill-teacher-steps applies to --distill-method step only, not guidance"),
    (["--distill-steps", "2", "--distill-method", "consistency", "--student-samplers", "ddim4"],
     "--student-samplers: ddim4: stage base32 is consistency-distilled: sample it with sampler consistency"),
    (["--distill-steps", "2", "--distill-method", "consistency", "--student-samplers", "consistency20"],
     "--student-samplers: consistency20: stage base32: its consistency student was trained on 16 levels"),
    (["--distill-steps", "2", "--distill-method", "consistency", "--distill-levels", "4", "--student-samplers",
      "consistency8"], "--student-samplers: consistency8: stage base32: its consistency student was trained on 4 levels"),
    (["--distill-steps", "2", "--distill-method", "consistency", "--distill-levels", "1"],
     "--distill-levels must be an integer in [2, 1000]"),
    (["--distill-steps", "2", "--distill-w-max", "0.5"], "recipe today: --distill-w-max 0.5 is below the teacher's"),
    (["--distill-steps", "2", "--w", "3"],
     "--student-samplers: ddim4: stage base32: its distilled student was trained for w in [0, 2]"),
])
def test_bad_options_are_one_line_errors(tool, shards, tmp_path, capsys, args, message):
    argv = {"--stage": "base32", "--data": str(shards), "--out": str(tmp_path / "out"), "--recipes": "today",
            "--steps": "2"}
    for key, value in zip(args[::2], args[1::2]):
        argv[key] = value.format(missing=tmp_path / "missing")
    assert tool.main([x for kv in argv.items() for x in kv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"quality_bench: error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # nothing ran


def test_samples_per_class_default_to_the_val_split_and_an_empty_class_is_refused(tool, shards, tmp_path, capsys):
    import functools

    import stages
    from cascade.harness.quality_bench import prepare

    presets = {name: functools.partial(stages.get_stage, name) for name in stages.STAGE_NAMES}

    def prepared(*extra):
        args = tool.build_parser().parse_args(["--stage", "base32", "--data", str(shards), "--out",
                                               str(tmp_path / "out"), "--steps", "2", *extra])
        return prepare(tool.config_from_args(args), presets).config

    info_path = shards / "dataset.json"
    info = json.loads(info_path.read_text())
    val_counts = info["counts"]["val"]["per_class"]
    assert prepared().per_class == min(val_counts) >= 1  # as many samples as real val images per class
    info["counts"]["val"]["per_class"] = [3, 1, *val_counts[2:]]  # the smallest class decides
    info_path.write_text(json.dumps(info))
    assert prepared().per_class == 1
    assert prepared("--per-class", "3").per_class == 3
    info["counts"]["val"]["per_class"][2] = 0
    info_path.write_text(json.dumps(info))
    assert prepared("--per-class", "3").per_class == 3  # an explicit count needs no val images of every class
    assert tool.main(["--stage", "base32", "--data", str(shards), "--out", str(tmp_path / "out"), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"--data: class {info['class_names'][2]!r} has no val images; rewrite the shards with a larger " \
           "--val-fraction or pass --per-class N" in err
    del info["counts"]["val"]["per_class"]
    info_path.write_text(json.dumps(info))
    assert tool.main(["--stage", "base32", "--data", str(shards), "--out", str(tmp_path / "out"), "--steps", "2"]) == 2
    assert "does not count the val images per class; rewrite the shards" in capsys.readouterr().err


def test_recipe_with_a_key_the_configuration_lacks_names_it():
    import stages
    from cascade.training.trainer_config import TrainerConfig

    stage = stages.get_stage("base32", "tiny", 3)
    recipes = {"future": Recipe("x", {"diffusion": {"loss": "simple", "no_such_key": 5}}),
               "fast": Recipe("y", trainer={"no_such_setting": 1}),
               "ok": Recipe("z", {"diffusion": {"loss": "simple", "model_var_type": "fixed_small"}}, {"lr": 1e-3})}
    with pytest.raises(BenchError, match=r"^recipe future: stage setting diffusion.no_such_key is unknown"):
        apply_recipe("future", stage, TrainerConfig(), recipes)
    with pytest.raises(BenchError, match=r"^recipe fast: trainer setting no_such_setting is unknown"):
        apply_recipe("fast", stage, TrainerConfig(), recipes)
    new_stage, trainer = apply_recipe("ok", stage, TrainerConfig(), recipes)
    assert new_stage.diffusion.model_var_type == "fixed_small" and trainer.lr == 1e-3


def test_sampler_specs_and_network_evaluations(tiny_runs, one_thread):
    from cascade.checkpoint import latest_checkpoint, load_stage

    settings = parse_samplers("ddim2,ddpm3:w=0,ddim2:eta=0.5:w=1.5", default_w=3.0)
    assert [(s.sampler, s.steps, s.w, s.eta) for s in settings] == [("ddim", 2, 3.0, 0.0), ("ddpm", 3, 0.0, 0.0),
                                                                    ("ddim", 2, 1.5, 0.5)]
    with pytest.raises(BenchError, match="sampler ddpm takes no eta"):
        parse_samplers("ddpm5:eta=1", 0.0)
    cfg, model, diffusion = load_stage(latest_checkpoint(tiny_runs["base32"]))
    labels = torch.tensor([0, 1, 2])
    images, nfe = sample_images(model, diffusion, cfg, settings[1], labels, batch_size=2)
    assert images.shape == (3, 3, 32, 32) and nfe == 3
    again, nfe = sample_images(model, diffusion, cfg, settings[0], labels, batch_size=2)
    assert nfe == 4  # guided: conditional and null-class halves
    assert torch.equal(sample_images(model, diffusion, cfg, settings[0], labels, batch_size=2)[0], again)


def test_trainer_time_budget_stops_with_a_final_checkpoint(synthetic_shards, tmp_path, one_thread):
    from conftest import tiny_run_config

    import stages
    from cascade.checkpoint import latest_checkpoint
    from cascade.training.trainer import StageTrainer
    from cascade.training.trainer_config import TrainerConfig

    stage = stages.get_stage("base32", "tiny", num_classes=3)
    trainer = StageTrainer(stage, tiny_run_config(tmp_path / "run", synthetic_shards, max_steps=50, ckpt_every=0,
                                                  max_seconds=1e-9))
    final = trainer.run()
    assert trainer.step == 1 and final == latest_checkpoint(tmp_path / "run")  # the first step exceeds 1 ns
    with pytest.raises(ValueError, match="trainer.max_seconds must be >= 0"):
        TrainerConfig(max_seconds=-1.0)


def test_cas_scores_samples_beside_the_real_ceiling(shards, tmp_path, one_thread):
    """score(..., cas=...): real train images as "samples" score near their own ceiling; noise near chance."""
    from cascade.evaluation.cas import CASSettings
    from cascade.evaluation.judge import JudgeSettings, get_judge, load_split, score

    judge = get_judge(shards, 32, JudgeSettings(epochs=1, seed=0), log=lambda m: None)
    images, labels = load_split(shards, "train", 32)
    cas = CASSettings(steps=30, batch_size=8, width=8)
    real = score(judge, images, labels, cas=cas)
    assert 0.0 <= real["cas_top1"] <= 1.0 and real["cas_top1"] == real["cas_real_top1"]  # same images, same seed
    noise = score(judge, torch.rand(images.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1, labels,
                  cas=cas)
    assert noise["cas_real_top1"] == real["cas_real_top1"]  # the ceiling does not depend on the samples


def test_recipe_changes_apply_trainer_and_stage_keys_and_name_bad_ones():
    import stages
    from cascade.harness.quality_recipes import resolve_recipe
    from cascade.training.trainer_config import TrainerConfig

    stage = stages.get_stage("base32", "tiny", 3)
    new_stage, trainer = apply_recipe("v-minsnr5+lr=1e-3+batch_size=16+diffusion.min_snr_gamma=1", stage,
                                      TrainerConfig())
    assert trainer.lr == 1e-3 and trainer.batch_size == 16  # YAML 1.1 reads "1e-3" as text: taken as a number
    assert new_stage.diffusion.prediction == "v" and new_stage.diffusion.min_snr_gamma == 1
    assert "changed: lr=1e-3" in resolve_recipe("v-minsnr5+lr=1e-3").description
    for spec, message in [("nope+lr=1", "--recipes: unknown recipe 'nope'"),
                          ("today+lr", "--recipes: bad change 'lr' in 'today+lr'"),
                          ("today+=3", "--recipes: bad change '=3'"),
                          ("today+diffusion.no_such_key=1", ("recipe today+diffusion.no_such_key=1: stage setting "
                                                             "diffusion.no_such_key is unknown")),
                          ("today+no_such_setting=1", ("recipe today+no_such_setting=1: trainer setting "
                                                       "no_such_setting is unknown")),
                          ("today+lr=-1", "recipe today+lr=-1: ")]:
        with pytest.raises(BenchError, match="^" + message.replace("+", r"\+").replace(".", r"\.")):
            apply_recipe(spec, stage, TrainerConfig())


def test_guidance_interval_item_runs_fewer_network_evaluations(tiny_runs, one_thread):
    from cascade.checkpoint import latest_checkpoint, load_stage

    full, inside = parse_samplers("ddim4,ddim4:gi=0-500", default_w=3.0)
    assert full.guidance_interval is None and inside.guidance_interval == (0.0, 500.0)
    for bad in ("ddim4:gi=500-100", "ddim4:gi=a-b", "ddim4:gi=5"):
        with pytest.raises(BenchError, match="gi in .* must be LO-HI timesteps"):
            parse_samplers(bad, 3.0)
    cfg, model, diffusion = load_stage(latest_checkpoint(tiny_runs["base32"]))
    labels = torch.tensor([0, 1])
    _, nfe_full = sample_images(model, diffusion, cfg, full, labels)
    _, nfe_inside = sample_images(model, diffusion, cfg, inside, labels)
    assert nfe_full == 8 and 4 < nfe_inside < 8  # guided (2 evaluations) only at the steps with t <= 500


def test_reuse_samples_a_trained_run_without_training_it_again(tool, shards, tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    common = ["--stage", "base32", "--data", str(shards), "--out", str(out), "--quick", "--recipes", "eps-simple",
              "--workers", "0"]
    assert tool.main(common) == 0
    checkpoint_bytes = {p: p.read_bytes() for p in (out / "runs").rglob("*.safetensors")}
    assert checkpoint_bytes
    capsys.readouterr()
    assert tool.main(common + ["--reuse", "--samplers", "ddim2"]) == 0
    assert "reusing base32 recipe eps-simple: 3 steps" in capsys.readouterr().err  # progress goes to stderr
    assert {p: p.read_bytes() for p in (out / "runs").rglob("*.safetensors")} == checkpoint_bytes
    rows = json.loads((out / "quality.json").read_text())["rows"]
    assert [(r["recipe"], r["sampler"], r.get("train_steps")) for r in rows[1:]] == [("eps-simple", "ddim2", 3)]
    assert tool.main(common + ["--reuse", "--steps", "5"]) == 2  # another budget: not the same run
    assert "was trained with budget" in capsys.readouterr().err
    assert tool.main(common + ["--reuse", "--overwrite"]) == 2
    assert "--reuse and --overwrite exclude each other" in capsys.readouterr().err


def test_distilled_students_are_scored_beside_their_teacher_and_reused(tool, shards, tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    common = ["--stage", "base32", "--data", str(shards), "--out", str(out), "--quick", "--recipes", "today",
              "--workers", "0", "--distill-steps", "2"]
    assert tool.main(common) == 0  # step students (the default method), sampled at their own ddim4
    md = (out / "quality.md").read_text()
    assert "guided step distillation: 4 DDIM steps, each reproducing 4 guided DDIM steps of the teacher" in md
    tables = [t for t in md.split("\n\n") if t.startswith("|")]
    assert len(tables) == 2  # every row, then quality against NFE
    header, rows = _table(tables[0])
    assert tuple(header) == table_columns("base", True)
    assert header.index("weights") == 1 and header.index("distill s") == header.index("distill steps") + 1
    assert [(r[0], r[1], r[2]) for r in rows] == [("real images", "–", "–"), ("today", "teacher", "ddim3"),
                                                  ("today", "student", "ddim4")]
    header, rows = _table(tables[1])
    assert tuple(header) == BASE_NFE_COLUMNS
    assert [(r[1], r[4]) for r in rows[1:]] == [("student", "4"), ("teacher", "6")]  # by NFE
    document = json.loads((out / "quality.json").read_text())
    assert document["meta"]["distill"] == {"budget": {"steps": 2}, "method": "step", "w_max": 2.0, "steps": 0,
                                           "teacher_steps": 0, "levels": 16, "student_samplers": ["ddim4"]}
    teacher, student = document["rows"][1:]
    assert teacher["weights"] == "teacher" and "distill_steps" not in teacher
    assert student["weights"] == "student" and student["nfe_per_image"] == 4  # w is an input: 1 evaluation a step
    assert (student["sampler_name"], student["steps"], student["w"]) == ("ddim", 4, 1.0)
    assert student["distill_steps"] == 2 and student["distill_seconds"] > 0 and student["train_steps"] == 3
    assert 0.0 <= student["class_accuracy"] <= 1.0 and (out / student["grid"]).is_file()
    assert "-distilled" in student["grid"]
    assert student["distill_checkpoint"].startswith(str(out / "runs" / "today-distilled"))
    checkpoint_bytes = {p: p.read_bytes() for p in (out / "runs").rglob("*.safetensors")}
    capsys.readouterr()
    assert tool.main(common + ["--reuse", "--student-samplers", "ddim4:w=0.5"]) == 0
    assert "reusing the distillation of base32 recipe today: 2 steps" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in (out / "runs").rglob("*.safetensors")} == checkpoint_bytes
    rows = json.loads((out / "quality.json").read_text())["rows"]
    assert [(r["weights"], r["sampler"], r["w"], r["nfe_per_image"]) for r in rows[1:]] == [
        ("teacher", "ddim3", 1.0, 6), ("student", "ddim4:w=0.5", 0.5, 4)]
    assert tool.main(common[:-1] + ["3", "--reuse"]) == 2  # another distillation budget: not the same student
    assert "was distilled with budget" in capsys.readouterr().err
    assert tool.main(common) == 2  # the runs are there: neither --reuse nor --overwrite
    assert "already holds a trained run" in capsys.readouterr().err


def test_consistency_students_sample_in_one_two_and_their_own_steps(tool, shards, tmp_path, one_thread):
    out = tmp_path / "out"
    assert tool.main(["--stage", "base32", "--data", str(shards), "--out", str(out), "--quick", "--recipes", "today",
                      "--workers", "0", "--distill-steps", "1", "--distill-method", "consistency",
                      "--distill-levels", "8"]) == 0
    document = json.loads((out / "quality.json").read_text())
    assert document["meta"]["distill"]["method"] == "consistency" and document["meta"]["distill"]["levels"] == 8
    assert [(r["weights"], r["sampler"], r["nfe_per_image"]) for r in document["rows"][1:]] == [
        ("teacher", "ddim3", 6), ("student", "consistency1", 1), ("student", "consistency2", 2),
        ("student", "consistency4", 4)]
    assert "guided consistency distillation on 8 levels" in (out / "quality.md").read_text()


@pytest.mark.parametrize("stage, method, labels", [
    ("base32", "step", ["ddim4"]), ("sr64", "step", ["ddim2"]),
    ("base32", "consistency", ["consistency1", "consistency2", "consistency4"]),
    ("sr64", "consistency", ["consistency1", "consistency2"]),
    ("base32", "guidance", ["ddim25"]),  # the teacher's own sampler and steps
])
def test_default_student_samplers_are_the_students_own_settings(stage, method, labels):
    import stages
    from cascade.harness.quality_samplers import default_student_samplers, stage_settings
    from cascade.training.distill import student_stage
    from cascade.training.trainer_config import DistillSettings

    student = student_stage(stages.get_stage(stage, "tiny", 3), "teacher", DistillSettings(method=method))
    settings = default_student_samplers(student)
    assert [s.label for s in settings] == labels and all(s.w is None for s in settings)
    for setting in settings:
        stage_settings(student, setting)  # each suits the student
    assert [s.w for s in default_student_samplers(student, 0.5)] == [0.5] * len(labels)
    assert parse_samplers(",".join(labels), None) == settings

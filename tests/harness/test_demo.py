"""The demo's --quick mode end to end: every report section is filled, and finished stages are kept."""

import math
import re

import pytest

from cascade.harness import demo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """The quick demo with `mixed_precision=auto` resolving to full precision on every machine (the same code
    path on a CPU with and without native bf16; emulated bf16 would make this test minutes slower on AVX2).
    Changing precision within one process is `test_train.test_precisions_change_between_runs_in_one_process`'s
    job, and the session's tiny runs train one stage in bf16 among fp32 ones."""
    from cascade import device

    out = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(device, "native_bf16", lambda device: False)
        return demo.run_demo(out, demo.QUICK, _tiny_configs(), seed=0, progress=False)


def _tiny_configs():
    import stages

    return {name: stages.get_stage(name, "tiny") for name in demo.TRAIN_ORDER}


def test_auto_precision_resolved_as_pinned(quick_demo):
    from cascade import checkpoint

    for name, ckpt in quick_demo.checkpoints.items():
        assert checkpoint.load_config(ckpt)["train"]["mixed_precision_resolved"] == "no", name


def test_report_has_every_section(quick_demo):
    html = quick_demo.report_html.read_text()
    md = quick_demo.report_md.read_text()
    for heading in ("Samples", "Metrics", "What the numbers mean", "Training", "Timings"):
        assert f">{heading}</h" in html and f"# {heading}" in md
    images = re.findall(r"<img src='([^']+)'", html)
    expected = {f"grid-{name}.png" for name in demo.CHAIN} | {"grid-real.png", "samples/grid.png",
                                                              "training-curves.png"}
    assert expected <= set(images)
    for rel in images:
        assert (quick_demo.out_dir / rel).stat().st_size > 0, rel


def test_metrics_cover_every_stage_and_mode(quick_demo):
    baselines = [f"{stage} (bicubic)" for stage in demo.CHAIN[1:]]
    assert set(quick_demo.metrics) == set(demo.CHAIN) | set(baselines)
    for stage in demo.CHAIN:
        for mode in ("teacher-forced", "cascaded"):
            entry = quick_demo.metrics[stage][mode]
            assert entry["features"]["classifier32-features"]["fid"] >= 0
            assert entry["features"]["classifier32-features-patch32"]["fid"] >= 0
            assert 0.0 <= entry["class_accuracy"] <= 1.0
            if stage != "base32":
                assert "consistency_psnr" in entry and entry["detail_ratio"] > 0
    for row in baselines:
        assert set(quick_demo.metrics[row]) == {"teacher-forced"}
    html = quick_demo.report_html.read_text()
    for stage in (*demo.CHAIN, *baselines):
        assert f"<td>{stage}</td>" in html
    assert "detail ratio" in html and "bicubic-upsampled input" in html


def test_final_images_at_256(quick_demo):
    from PIL import Image

    finals = sorted(p for p in (quick_demo.out_dir / "samples").glob("*.png") if p.name != "grid.png")
    assert len(finals) == 10 * demo.QUICK.num_per_class  # every photo class
    assert all(Image.open(p).size == (256, 256) for p in finals)


def test_finished_stage_is_not_retrained(quick_demo):
    out = quick_demo.out_dir
    ckpt = quick_demo.checkpoints["sr64"]
    before = (ckpt / "ema.safetensors").stat().st_mtime_ns
    import stages

    stage = stages.get_stage("sr64", "tiny", num_classes=10)
    again = demo.train_demo_stage(stage, out / "data", out / "runs", demo.QUICK, 0, progress=False)
    assert again == ckpt
    assert (ckpt / "ema.safetensors").stat().st_mtime_ns == before


def test_time_budget_trains_by_the_clock_then_keeps_the_stage(quick_demo, tmp_path):
    """A stage with train_seconds stops by the clock well before its step cap, and is not retrained after."""
    import dataclasses
    import json

    import stages
    from cascade import checkpoint

    budget = dataclasses.replace(demo.QUICK, train_seconds={"base32": 0.5},
                                 train_steps={**demo.QUICK.train_steps, "base32": 100_000})
    stage = stages.get_stage("base32", "tiny", num_classes=10)
    final = demo.train_demo_stage(stage, quick_demo.out_dir / "data", tmp_path / "runs", budget, 0, progress=False)
    steps = checkpoint.load_training_state(final)["step"]
    assert 1 <= steps < 100_000
    marker = json.loads((tmp_path / "runs" / "base32" / demo.DONE_FILE).read_text())
    assert marker == {"train_steps": 100_000, "train_seconds": 0.5, "batch_size": budget.batch_size["base32"]}
    before = (final / "ema.safetensors").stat().st_mtime_ns
    assert demo.train_demo_stage(stage, quick_demo.out_dir / "data", tmp_path / "runs", budget, 0,
                                 progress=False) == final
    assert (final / "ema.safetensors").stat().st_mtime_ns == before
    # an unreadable marker (or another budget's) is no marker: the stage trains again and is marked anew
    (tmp_path / "runs" / "base32" / demo.DONE_FILE).write_text("{trunc")
    again = demo.train_demo_stage(stage, quick_demo.out_dir / "data", tmp_path / "runs", budget, 0, progress=False)
    assert checkpoint.load_training_state(again)["step"] > steps
    assert json.loads((tmp_path / "runs" / "base32" / demo.DONE_FILE).read_text()) == marker


@pytest.fixture(scope="module")
def distilled_demo(quick_demo, tmp_path_factory):
    """The quick demo with distillation of base32 and sr64 (`QUICK_DISTILLED`), run on a copy of `quick_demo`'s
    shards and trained stages (the training budget is the same, so no stage trains again)."""
    import shutil

    from cascade import device

    out = tmp_path_factory.mktemp("demo_distilled")
    for part in ("data", "runs"):
        shutil.copytree(quick_demo.out_dir / part, out / part)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(device, "native_bf16", lambda device: False)
        return demo.run_demo(out, demo.QUICK_DISTILLED, _tiny_configs(), seed=0, progress=False)


def test_distilled_demo_keeps_the_trained_stages_and_distils_two(quick_demo, distilled_demo):
    from cascade import checkpoint

    for name, ckpt in distilled_demo.checkpoints.items():  # trained with the same budget: kept as they were
        assert ckpt.relative_to(distilled_demo.out_dir) == quick_demo.checkpoints[name].relative_to(quick_demo.out_dir)
        assert f"train {name}" in distilled_demo.seconds
    assert set(distilled_demo.students) == {"base32", "sr64"}
    for name, student in distilled_demo.students.items():
        assert student.parent.parent == distilled_demo.out_dir / "runs" / f"{name}-distilled"
        cfg = checkpoint.load_stage_config(student)
        assert cfg.distill.method == demo.DISTILL.method
        assert cfg.distill.teacher == str(distilled_demo.checkpoints[name])
        assert checkpoint.load_training_state(student)["step"] == demo.QUICK_DISTILLED.distill_steps[name]


def test_distilled_demo_samples_each_stage_with_the_better_weights(distilled_demo):
    import json

    from cascade import checkpoint

    rows = {row["stage"]: row for row in distilled_demo.distillation}
    assert set(rows) == {"base32", "sr64"}
    for name, row in rows.items():
        teacher, student = row["teacher"], row["student"]
        assert row["used"] == ("student" if student["score"] >= teacher["score"] else "teacher")
        assert distilled_demo.weights[name] == row["used"]
        sampler = checkpoint.load_stage_config(student["checkpoint"]).sampling.sampler
        assert student["sampler"].startswith(f"{sampler} ") and student["nfe_per_image"] < teacher["nfe_per_image"]
        assert teacher["sample_seconds"] > 0 and student["sample_seconds"] > 0
        assert student["num_samples"] == teacher["num_samples"] == demo.QUICK.eval_samples
    assert rows["base32"]["metric"] == "KID teacher-forced [classifier32-features]"
    assert rows["sr64"]["metric"] == "detail ratio teacher-forced (consistency ≥ 30 dB)"
    sr = rows["sr64"]["teacher"]
    assert sr["score"] == (sr["metric"] if sr["consistency_db"] >= 30 else -math.inf) and sr["metric_std"] is None
    assert {distilled_demo.weights[n] for n in ("sr128", "sr256")} == {"teacher"}
    assert json.loads((distilled_demo.out_dir / "distillation.json").read_text()) == distilled_demo.distillation
    # the cascade's samples came from the weights chosen per stage
    record = json.loads((distilled_demo.out_dir / "samples" / "settings.json").read_text())
    for name, used in distilled_demo.weights.items():
        path = record["checkpoints"][name]["path"]
        assert ("-distilled" in path) == (used == "student"), (name, path)


def test_distilled_demo_report_shows_teacher_and_student(distilled_demo):
    html = distilled_demo.report_html.read_text()
    md = distilled_demo.report_md.read_text()
    assert ">Distillation</h" in html and "# Distillation" in md
    for row in distilled_demo.distillation:
        name = row["stage"]
        for side in ("teacher", "student"):
            used = "yes" if row["used"] == side else "no"
            cells = re.search(rf"<tr><td>{name}</td><td>{side}</td>(.*?)</tr>", html)
            assert cells is not None, (name, side)
            assert cells.group(1).rstrip().endswith(f"<td>{used}</td>"), cells.group(1)
            assert f"{row[side]['nfe_per_image']:g}" in cells.group(1)
    assert "weights per stage: base32 " in html and "distillation steps" in html
    assert "<td>distill base32</td>" in html and "<td>teacher or student</td>" in html


def test_finished_student_is_not_distilled_again_and_a_new_teacher_restarts_it(distilled_demo, tmp_path):
    import shutil

    from cascade import checkpoint

    out = distilled_demo.out_dir
    student, teacher = distilled_demo.students["base32"], distilled_demo.checkpoints["base32"]
    before = (student / "ema.safetensors").stat().st_mtime_ns
    again = demo.distill_demo_stage("base32", teacher, out / "data", out / "runs", demo.QUICK_DISTILLED, 0,
                                    progress=False)
    assert again == student
    assert (student / "ema.safetensors").stat().st_mtime_ns == before
    # the stage trained again (another teacher checkpoint): its student starts afresh from the new teacher
    runs = tmp_path / "runs"
    shutil.copytree(out / "runs" / "base32-distilled", runs / "base32-distilled")
    new_teacher = tmp_path / "teacher" / teacher.name
    shutil.copytree(teacher, new_teacher)
    fresh = demo.distill_demo_stage("base32", new_teacher, out / "data", runs, demo.QUICK_DISTILLED, 0, progress=False)
    assert checkpoint.load_stage_config(fresh).distill.teacher == str(new_teacher)
    assert checkpoint.load_training_state(fresh)["step"] == demo.QUICK_DISTILLED.distill_steps["base32"]

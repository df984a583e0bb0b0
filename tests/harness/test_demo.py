"""The demo's --quick mode end to end: every report section is filled, and finished stages are kept."""

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

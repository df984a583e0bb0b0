"""cascade.evaluation.evaluate, tools/eval_fid.py and tools/sweep.py on the tiny trained checkpoints."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cascade.evaluation import generation
from cascade.evaluation.cas import CASSettings
from cascade.evaluation.evaluate import evaluate
from cascade.evaluation.generation import plan_for
from cascade.evaluation.inputs import load_for_evaluation
from cascade.evaluation.reference_stats import reference_stats_path
from cascade.evaluation.sample_lists import CASCADED, TEACHER_FORCED, process_slice
from cascade.evaluation.scoring import stage_metrics
from cascade.evaluation.settings import MetricSettings
from cascade.imageops import uint8_to_float
from cascade.pipeline.cascade_pipeline import CascadeConfigError

ROOT = Path(__file__).resolve().parents[2]
NET = "classifier32-features"
CHAIN = ("base32", "sr64")
FAST = {"num_samples": 4, "batch_size": 2, "seed": 1}


def _settings(pipe, **overrides):
    """Every stage at 2 respaced steps (fast), plus ``overrides``."""
    return pipe.settings(steps=2, **overrides)


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


eval_fid, sweep_tool = _load_tool("eval_fid"), _load_tool("sweep")


@pytest.fixture(scope="module")
def shards(synthetic_shards, tmp_path_factory) -> Path:
    """A private copy of the shards: the reference-statistics cache is written next to them."""
    return Path(shutil.copytree(synthetic_shards, tmp_path_factory.mktemp("eval") / "shards"))


@pytest.fixture(scope="module")
def loaded(runs_root):
    return load_for_evaluation(runs_root, CHAIN)


def _cli_args(runs_root: Path, shards: Path, out: Path, *extra: str) -> list[str]:
    return ["--runs", str(runs_root), "--data", str(shards), "--stages", ",".join(CHAIN), "--num-samples", "4",
            "--batch-size", "2", "--steps", "2", "--device", "cpu", "--out", str(out), *extra]


def _finite(x) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def test_process_slices_are_whole_batches_and_cover_every_sample():
    for n, batch, world in ((8, 3, 2), (5, 2, 3), (3, 4, 2), (10, 1, 4)):
        slices = [process_slice(n, batch, rank, world) for rank in range(world)]
        assert [i for s in slices for i in s] == list(range(n))
        assert all(s.start % batch == 0 for s in slices if len(s))


def test_slices_sampled_apart_equal_the_whole_run_and_sample_stage_equals_run(loaded):
    pipe = loaded[0]
    labels = [2, 0, 1, 1, 0]
    settings = pipe.settings(steps=2, w=1.0, aug_level=0.2)
    run = {"seed": 3, "batch_size": 2}
    whole = pipe.run(pipe.validate(labels, settings, **run), progress=False)
    parts = [pipe.run(pipe.validate(labels[s], settings, **run), progress=False, start_index=s.start)
             for s in (slice(0, 2), slice(2, 5))]
    for name in CHAIN:
        assert torch.equal(whole[name], torch.cat([p[name] for p in parts]))
    # One SR stage on given inputs (teacher forcing) takes run()'s code path: the same images.
    alone = pipe.sample_stage("sr64", labels, whole["base32"], settings["sr64"], **run)
    assert torch.equal(alone, whole["sr64"])
    with pytest.raises(CascadeConfigError, match="x_low must be float images of shape"):
        pipe.sample_stage("sr64", labels, whole["base32"][:, :, :16, :16], settings["sr64"], **run)
    with pytest.raises(CascadeConfigError, match="stage sr128: not in the chain"):
        pipe.sample_stage("sr128", labels)


def test_one_plan_per_evaluation_validated_once_and_cut_into_chunks(loaded, shards, monkeypatch):
    """Every chunk of the sample list and of the CAS list samples from the one plan `evaluate` validated."""
    pipe, nets, classifier = loaded
    settings = _settings(pipe, w=1.0)
    plan = pipe.validate([0, 1, 2], settings, batch_size=2, seed=1)
    labels = torch.tensor([2, 0, 1, 1, 0])
    part = plan_for(plan, labels[2:5])  # a chunk's plan: the same as validating the chunk's labels
    assert part.to_dict() == pipe.validate(labels[2:5].tolist(), settings, batch_size=2, seed=1).to_dict()
    whole = pipe.run(plan_for(plan, labels), progress=False)
    assert torch.equal(pipe.run(part, start_index=2, progress=False)["sr64"], whole["sr64"][2:5])

    validated = []
    validate = pipe.validate
    monkeypatch.setattr(pipe, "validate", lambda *a, **k: validated.append(a) or validate(*a, **k))
    monkeypatch.setattr(generation, "CHUNK_BATCHES", 1)  # 4 samples, batches of 2: two chunks per list
    metrics = MetricSettings(pr_k=0, cas_per_class=2, cas=CASSettings(steps=1, batch_size=4, width=8))
    result = evaluate(pipe, shards, feature_nets=nets, classifier=classifier, modes=[CASCADED], settings=settings,
                      metrics=metrics, **FAST)
    assert len(validated) == 1 and sorted(validated[0][0]) == [0, 1, 2]
    assert result.meta["sampler"]["stages"]["base32"]["w"] == 1.0 and "cas" in result.results["sr64"][CASCADED]


def test_teacher_forced_plans_are_validated_once_per_stage_not_per_chunk(loaded, shards, monkeypatch):
    """Teacher forcing samples each stage alone from one plan per stage (`plan_alone`), cut into chunks; a
    chunk's images equal `sample_stage`'s for the same labels and inputs."""
    pipe, nets, classifier = loaded
    settings = _settings(pipe, w=1.0)
    labels, x_low = torch.tensor([2, 0, 1, 1]), torch.rand(4, 3, 32, 32) * 2 - 1
    plan = pipe.plan_alone("sr64", [0, 1, 2], settings["sr64"], batch_size=2, seed=3)
    chunk = pipe.run_stage(plan_for(plan, labels[2:]), "sr64", x_low[2:], start_index=2)
    whole = pipe.sample_stage("sr64", labels, x_low, settings["sr64"], seed=3, batch_size=2)
    assert torch.equal(chunk, whole[2:])

    validated = []
    validate = pipe.validate
    monkeypatch.setattr(pipe, "validate", lambda *a, **k: validated.append(a) or validate(*a, **k))
    monkeypatch.setattr(generation, "CHUNK_BATCHES", 1)  # 4 samples, batches of 2: two chunks
    evaluate(pipe, shards, feature_nets=nets, classifier=classifier, modes=[TEACHER_FORCED], settings=settings,
             metrics=MetricSettings(pr_k=0), **FAST)
    assert len(validated) == 1 + len(CHAIN)  # the evaluation's plan, then one plan per stage alone


def test_both_modes_report_finite_metrics_and_the_cache_is_reused(loaded, runs_root, shards, tmp_path,
                                                                  capsys):
    pipe, nets, classifier = loaded
    result = evaluate(pipe, shards, feature_nets=nets, classifier=classifier, settings=_settings(pipe, w=1.0), **FAST)
    for stage in CHAIN:
        for mode in (TEACHER_FORCED, CASCADED):
            metrics = result.results[stage][mode]
            fid = metrics["features"][NET]
            assert _finite(fid["fid"]) and _finite(fid["kid_mean"]) and fid["num_fake"] == 4
            assert 0.0 <= metrics["class_accuracy"] <= 1.0
            assert ("consistency_psnr" in metrics) == (stage == "sr64")
    assert result.results["sr64"][TEACHER_FORCED]["consistency_psnr"] > 0
    assert _finite(result.results["sr64"][CASCADED]["consistency_psnr"])
    json_path, md_path = result.write(tmp_path / "lib")
    saved = json.loads(json_path.read_text())
    assert saved["results"]["sr64"][CASCADED]["features"][NET]["fid"] == result.results["sr64"][CASCADED][
        "features"][NET]["fid"]
    header = md_path.read_text().split("| stage |")[1].splitlines()[0]
    for label in (f"FID teacher-forced [{NET}]", f"FID cascaded [{NET}]", "consistency PSNR (dB) cascaded",
                  "class acc teacher-forced"):
        assert label in header

    cache = {r: reference_stats_path(shards, "val", r, NET) for r in (32, 64)}
    stamps = {r: p.stat().st_mtime_ns for r, p in cache.items()}
    out = tmp_path / "cli"
    assert eval_fid.main(_cli_args(runs_root, shards, out, "--modes", "cascaded", "--w", "1", "--seed", "1")) == 0
    assert {r: p.stat().st_mtime_ns for r, p in cache.items()} == stamps  # reused, not recomputed
    cli = json.loads((out / "results.json").read_text())
    assert set(cli["results"]["sr64"]) == {CASCADED}
    # the same samples (seed, batch size) as the library run above: the same numbers
    assert cli["results"]["sr64"][CASCADED]["features"][NET]["fid"] == pytest.approx(
        result.results["sr64"][CASCADED]["features"][NET]["fid"], rel=1e-6)
    assert f"FID cascaded [{NET}]" in capsys.readouterr().out

    shard = next(shards.glob("val-*.tar"))  # the data changes: the statistics are recomputed
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    fake = uint8_to_float(torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8))
    stage_metrics(fake, torch.tensor([0, 1, 2, 0]), data_root=shards, feature_nets=nets, classifier=classifier)
    assert cache[32].stat().st_mtime_ns != stamps[32]


def test_patch_fid_and_bicubic_baseline_rows(runs_root, shards, tmp_path):
    pipe, nets, classifier = load_for_evaluation(runs_root, CHAIN, patch_features=True)
    assert [n.name for n in nets] == [NET, f"{NET}-patch32"]
    result = evaluate(pipe, shards, feature_nets=nets, classifier=classifier, modes=[TEACHER_FORCED],
                      metrics=MetricSettings(baselines=True), settings=_settings(pipe), **FAST)
    assert list(result.results) == ["base32", "sr64", "sr64 (bicubic)"]
    patch = result.results["sr64"][TEACHER_FORCED]["features"][f"{NET}-patch32"]
    assert patch["num_fake"] == 4 * 4 and _finite(patch["fid"]) and "is_mean" not in patch  # 2×2 patches of 64²
    baseline = result.results["sr64 (bicubic)"][TEACHER_FORCED]
    assert set(baseline["features"]) == {NET, f"{NET}-patch32"}
    assert baseline["consistency_psnr"] > 35  # bicubic up, antialiased down: almost the input itself
    assert baseline["detail_ratio"] < 0.5  # a smooth upsampling has little detail above the input's size
    assert result.results["sr64"][TEACHER_FORCED]["detail_ratio"] > 0
    assert "detail_ratio" not in result.results["base32"][TEACHER_FORCED]
    assert 0.0 <= baseline["class_accuracy"] <= 1.0
    _, md_path = result.write(tmp_path)
    assert "| sr64 (bicubic) |" in md_path.read_text()
    out = tmp_path / "cli"
    assert eval_fid.main(_cli_args(runs_root, shards, out, "--modes", "teacher-forced", "--patch-fid",
                                   "--baselines", "--seed", "1")) == 0
    cli = json.loads((out / "results.json").read_text())
    assert cli["results"]["sr64 (bicubic)"][TEACHER_FORCED]["features"][f"{NET}-patch32"]["fid"] == pytest.approx(
        baseline["features"][f"{NET}-patch32"]["fid"], rel=1e-6)


def test_truncated_chain_leaves_out_the_noisy_handover(loaded, shards):
    pipe, nets, classifier = loaded
    result = evaluate(pipe, shards, feature_nets=nets, classifier=classifier, modes=[CASCADED],
                      settings=_settings(pipe, truncate=True, aug_level=0.5), **FAST)
    assert set(result.results) == {"sr64"} and "consistency_psnr" not in result.results["sr64"][CASCADED]
    assert "base32: cascaded metrics left out" in result.meta["notes"][0]


def test_cas_memorisation_precision_recall_and_bootstrap(loaded, runs_root, shards, tmp_path):
    pipe, nets, classifier = loaded
    metrics = MetricSettings(bootstrap=5, cas_per_class=2, cas=CASSettings(steps=3, batch_size=4, width=8),
                             memorisation=True)
    run = dict(feature_nets=nets, classifier=classifier, settings=_settings(pipe), modes=[CASCADED], metrics=metrics,
               **FAST)
    first, again = evaluate(pipe, shards, **run), evaluate(pipe, shards, **run)
    assert first.results == again.results  # deterministic for a seed, CAS training included
    for stage in CHAIN:
        metrics = first.results[stage][CASCADED]
        fid = metrics["features"][NET]
        assert fid["fid_biased"] and fid["num_fake"] == 4 and fid["fid_ci"][0] <= fid["fid_ci"][1]
        assert 0 <= fid["precision"] <= 1 and 0 <= fid["recall"] <= 1 and fid["pr_k"] == 3
        cas = metrics["cas"]
        assert (cas["num_train"], cas["num_test"]) == (3 * 2, 6) and 0 <= cas["top1"] <= 1
        assert 0 <= cas["real_top1"] <= 1 and "top5" not in cas  # 3 classes: top-1 only
        memo = metrics["memorisation"]
        assert memo["feature_net"] == NET and memo["threshold_pixel"] > 0 and 0 <= memo["fraction_pixel"] <= 1
        assert 0 <= memo["val_fraction_feature"] <= 1
    _, md_path = first.write(tmp_path)
    md = md_path.read_text()
    assert md.index("## base32") < md.index("## Full table") and "(n=4, biased)" in md and "KID ± std" in md
    assert "CAS top-1" in md and "memorised" in md
    for name in ("memorisation-base32.png", "memorisation-sr64.png"):
        assert (tmp_path / name).stat().st_size > 0
    out = tmp_path / "cli"
    assert eval_fid.main(_cli_args(runs_root, shards, out, "--modes", "cascaded", "--cas", "2", "--cas-steps", "3",
                                   "--memorisation", "--pr-k", "2")) == 0
    cli = json.loads((out / "results.json").read_text())
    assert cli["results"]["sr64"][CASCADED]["features"][NET]["pr_k"] == 2
    assert set(cli["results"]["sr64"][CASCADED]["cas"]) >= {"top1", "real_top1"}
    assert (out / "memorisation-sr64.png").is_file() and (out / "results.png").is_file()


def test_sweep_writes_table_plot_and_best_flags(runs_root, shards, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = _cli_args(runs_root, shards, out, "--w", "0,2", "--aug-level", "sr64=0,0.3")
    args[args.index("--steps") + 1] = "1"
    assert sweep_tool.main(args) == 0
    saved = json.loads((out / "sweep.json").read_text())
    settings = {(r["stage"], r["w"], r["aug_level"]) for r in saved["records"]}
    assert settings == {("base32", 0.0, None), ("base32", 2.0, None)} | {
        ("sr64", w, s) for w in (0.0, 2.0) for s in (0.0, 0.3)}
    assert all(_finite(r["fid"]) and r["feature_net"] == NET for r in saved["records"])
    assert set(saved["best"]) == set(CHAIN) and saved["best"]["sr64"]["aug_level"] in (0.0, 0.3)
    assert (out / "sweep.png").stat().st_size > 0
    assert "★" in (out / "sweep.md").read_text()
    printed = capsys.readouterr().out
    assert f"best settings: {saved['flags']}" in printed and saved["flags"].startswith("--w base32=")
    assert all(0 <= r["precision"] <= 1 and r["num_samples"] == 4 for r in saved["records"])


def test_sweep_ranks_by_cas(runs_root, shards, tmp_path):
    out = tmp_path / "sweep"
    args = _cli_args(runs_root, shards, out, "--w", "0,2", "--cas", "2", "--cas-steps", "2", "--rank-metric",
                     "cas_top1", "--mode", "cascaded")
    args[args.index("--steps") + 1] = "1"
    assert sweep_tool.main(args) == 0
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["meta"]["rank_metric"] == "cas_top1" and len(saved["records"]) == 4
    for stage, best in saved["best"].items():
        tried = [r["cas_top1"] for r in saved["records"] if r["stage"] == stage]
        assert best["cas_top1"] == max(tried) and best["cas"]["real_top1"] >= 0
    assert "CAS top-1 (real)" in (out / "sweep.md").read_text()


def _error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_missing_inception_weights_is_one_line_in_a_subprocess(runs_root, shards, tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "eval_fid.py"),
         *_cli_args(runs_root, shards, tmp_path / "o", "--inception-weights", "/nonexistent/inception.pth")],
        check=False, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert result.returncode == 2
    line = _error_line(result.stderr)
    assert line.startswith("eval_fid: error: Inception weights file not found: /nonexistent/inception.pth")
    assert "nothing is downloaded" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--stages", "base32,sr32"], "--stages: unknown stage 'sr32'"),
        (["--num-samples", "-3"], "argument --num-samples: must be an integer >= 2, got '-3'"),
        (["--data", "/nonexistent/shards"], "data: dataset folder not found: /nonexistent/shards"),
        (["--modes", "teacher-forced,dreamed"], "--modes: unknown mode 'dreamed'"),
        (["--classifier", "/nonexistent/clf"], "classifier: checkpoint path /nonexistent/clf does not exist"),
        (["--w", "base32=-1"], "stage base32: w must be >= 0"),
        (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1"),
        (["--pr-k", "4"], "--pr-k: precision/recall with k=4 needs more than 4 samples per stage, got 4"),
        (["--cas", "0"], "--cas: needs at least 1 generated image per class, got 0"),
        (["--cas", "50"], "fewer than the 50 per class the real ceiling needs; pass --cas"),
        (["--bootstrap", "1"], "--bootstrap must be 0 (off) or >= 2 resamples"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(runs_root, shards, tmp_path, capsys, args, expected):
    argv = _cli_args(runs_root, shards, tmp_path / "o")
    for flag, value in zip(args[::2], args[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    try:
        code = eval_fid.main(argv)
    except SystemExit as exc:  # argparse refuses a malformed value itself (exit 2)
        code = exc.code
    assert code == 2
    assert expected in _error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_a_mostly_unreadable_val_split_is_refused_naming_the_flag(runs_root, synthetic_shards, tmp_path, capsys):
    damaged = Path(shutil.copytree(synthetic_shards, tmp_path / "damaged"))
    vals = sorted(damaged.glob("val-*.tar"))
    for path in vals[:-1]:  # 6 val images in 2 shards of 4 and 2: only the last 2 stay readable
        path.write_bytes(b"not a tar file" * 8)
    with pytest.warns(RuntimeWarning):
        assert eval_fid.main(_cli_args(runs_root, damaged, tmp_path / "o")) == 2
    line = _error_line(capsys.readouterr().err)
    assert "only 2 of 6 val images" in line and "--allow-damaged-val" in line and not (tmp_path / "o").exists()


def test_sweep_rejects_a_bad_grid(runs_root, shards, tmp_path, capsys):
    args = _cli_args(runs_root, shards, tmp_path / "o", "--aug-level", "sr64=0,1.5")
    assert sweep_tool.main(args) == 2
    assert "stage sr64: aug_level must be in [0.0, 1.0], got 1.5" in _error_line(capsys.readouterr().err)


@pytest.mark.slow
def test_two_processes_give_the_single_process_numbers(runs_root, shards, tmp_path):
    """`accelerate launch` on CPU (gloo): each process samples its batches, the main one computes the metrics."""
    args = _cli_args(runs_root, shards, tmp_path / "two", "--modes", "cascaded", "--w", "1")
    args[args.index("--num-samples") + 1] = "6"  # 3 batches: one process gets 1, the other 2
    args[args.index("--steps") + 1] = "1"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "0", str(ROOT / "tools" / "eval_fid.py"), *args]
    result = subprocess.run(launch, check=False, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    args[args.index("--out") + 1] = str(tmp_path / "one")
    assert eval_fid.main(args) == 0
    two, one = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("two", "one"))
    assert (two["meta"]["num_processes"], one["meta"]["num_processes"]) == (2, 1)
    for stage in CHAIN:
        a, b = two["results"][stage][CASCADED], one["results"][stage][CASCADED]
        assert a["class_accuracy"] == b["class_accuracy"]
        for key in ("fid", "kid_mean", "is_mean"):
            assert a["features"][NET][key] == pytest.approx(b["features"][NET][key], rel=1e-5, abs=1e-6)
    assert two["results"]["sr64"][CASCADED]["consistency_psnr"] == pytest.approx(
        one["results"]["sr64"][CASCADED]["consistency_psnr"], rel=1e-5)

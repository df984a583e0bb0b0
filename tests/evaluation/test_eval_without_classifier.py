"""tools/eval_fid.py without a trained classifier32: the judge of --data stands in for it, trained once and
cached beside the shards, and the results name it."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def base_only(tiny_runs, synthetic_shards, tmp_path_factory) -> tuple[Path, Path]:
    """(a runs folder holding only base32, a private copy of the shards for the judge's cache)."""
    folder = tmp_path_factory.mktemp("no_classifier")
    runs = folder / "runs"
    shutil.copytree(tiny_runs["base32"], runs / "base32")
    return runs, Path(shutil.copytree(synthetic_shards, folder / "shards"))


def _args(runs: Path, shards: Path, out: Path, *extra: str) -> list[str]:
    return ["--runs", str(runs), "--data", str(shards), "--stages", "base32", "--modes", "cascaded",
            "--num-samples", "4", "--steps", "2", "--device", "cpu", "--out", str(out), *extra]


def test_eval_fid_falls_back_to_the_judge_and_names_it(base_only, tmp_path, capsys, one_thread):
    runs, shards = base_only
    assert _load_tool("eval_fid").main(_args(runs, shards, tmp_path / "eval")) == 0
    err = capsys.readouterr().err
    assert f"no {runs / 'classifier32'}: the judge of {shards} stands in for classifier32" in err
    assert "features judge32-" in err and "sampling base32" in err and "checkpoint base32" in err  # the summary
    meta = json.loads((tmp_path / "eval" / "results.json").read_text())["meta"]
    judge = meta["class_accuracy_by"]
    assert judge.startswith("judge32-") and meta["features"][judge].startswith(f"judge (trained on {shards} train")
    assert "% on val" in meta["features"][judge]
    assert f"- features: {judge}: judge (trained on" in (tmp_path / "eval" / "results.md").read_text()
    assert list((shards / "judge").glob("judge32-*.safetensors"))  # cached for the next run


def test_an_explicit_missing_classifier_is_still_an_error(base_only, tmp_path, capsys):
    runs, shards = base_only
    argv = _args(runs, shards, tmp_path / "eval", "--classifier", str(tmp_path / "nowhere"))
    assert _load_tool("eval_fid").main(argv) == 2
    assert "classifier:" in capsys.readouterr().err

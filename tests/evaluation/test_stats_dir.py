"""Where eval_fid.py and sweep.py cache the real-image statistics: --stats-dir, <data>/fid_stats, or <out>/fid_stats
when the data folder is read-only; chosen and checked before any sampling.

Tests run as root, where chmod does not stop writes: a read-only data folder is simulated by
`os.access(data, W_OK)` answering False (what a read-only mount answers, also for root)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from cascade.errors import OutputNotWritable
from cascade.evaluation import reference_stats
from cascade.evaluation.reference_stats import STATS_DIR_NAME, stats_folder

ROOT = Path(__file__).resolve().parents[2]


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_stats_dir", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def read_only(monkeypatch):
    """Make the given folders (and everything under them) answer os.access(W_OK) with False."""
    folders: list[Path] = []
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and any(Path(path).absolute().is_relative_to(f) for f in folders):
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(reference_stats.os, "access", access)
    return lambda folder: folders.append(Path(folder).absolute())


def test_the_cache_goes_beside_the_data_when_writable_else_to_the_output_folder(tmp_path, read_only):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    assert stats_folder(data, None, out) == (data / STATS_DIR_NAME, False)
    read_only(data)
    assert stats_folder(data, None, out) == (out / STATS_DIR_NAME, True)
    assert stats_folder(data, tmp_path / "mine", out) == (tmp_path / "mine", False)
    assert not out.exists() and not (tmp_path / "mine").exists()  # chosen, nothing created


def test_an_unwritable_stats_dir_is_one_line_naming_the_flag(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OutputNotWritable, match=r"^--stats-dir .*a-file/stats cannot be created"):
        stats_folder(tmp_path, blocker / "stats", tmp_path / "out")


@pytest.mark.parametrize("tool", ["eval_fid", "sweep"])
def test_the_tools_refuse_an_unwritable_stats_dir_before_sampling(tool, synthetic_shards, tmp_path, capsys,
                                                                   monkeypatch):
    module = _load_tool(tool)
    monkeypatch.setattr(module, "load_evaluation_inputs", lambda *a, **k: pytest.fail("loaded before the check"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = ["--data", str(synthetic_shards), "--out", str(tmp_path / "out"), "--stats-dir", str(blocker / "s"),
            "--device", "cpu"]
    assert module.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{tool}: error: --stats-dir ")


def test_eval_fid_on_a_read_only_data_folder_caches_in_the_output_folder(runs_root, synthetic_shards, tmp_path,
                                                                         capsys, read_only):
    data = Path(shutil.copytree(synthetic_shards, tmp_path / "data"))
    read_only(data)
    out = tmp_path / "out"
    argv = ["--runs", str(runs_root), "--data", str(data), "--stages", "base32", "--modes", "cascaded",
            "--num-samples", "4", "--batch-size", "2", "--steps", "2", "--device", "cpu", "--out", str(out)]
    assert _load_tool("eval_fid").main(argv) == 0
    assert not (data / STATS_DIR_NAME).exists()
    assert sorted(p.suffix for p in (out / STATS_DIR_NAME).iterdir()) == [".json", ".safetensors"]
    assert f"the real-image statistics are cached in {out / STATS_DIR_NAME}" in capsys.readouterr().err

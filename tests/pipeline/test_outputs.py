"""cascade.pipeline.outputs and sample_cascade's --out: one file per sample whatever the class names, the count
printed is the files written, a run owns its --out (earlier outputs replaced, others' files refused, a second
run at the same time refused)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cascade.locks import LOCK_NAME, FolderLock
from cascade.pipeline.outputs import MANIFEST, claim_out_dir, file_safe, sample_stem, write_outputs

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("sample_cascade_tool", ROOT / "tools" / "sample_cascade.py")
sample_cascade = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sample_cascade)


@pytest.mark.parametrize("names", [["狗", "猫", "кот"], ["a b", "a/b", "a-b"], ["Cat", "cat", "CAT"], ["", "?", "…"],
                                   ["x" * 300, "x" * 300 + "y", ".hidden"]])
def test_stems_are_one_to_one_whatever_the_class_names(names):
    stems = [sample_stem(c, i, names) for c in range(len(names)) for i in range(2)]
    assert len({s.lower() for s in stems}) == len(stems)  # distinct on case-insensitive file systems too
    assert all(len(s.encode()) < 200 and "/" not in s and not s.startswith(".") for s in stems)
    assert sample_stem(0, 0, ["狗"]) == "0-狗_0" and sample_stem(4, 1) == "4_1"
    assert file_safe("кот / 猫") == "кот-猫"


def _plan(labels, resolutions=(32,)):
    stages = [SimpleNamespace(name=f"s{r}", resolution=r, stop_at_index=None) for r in resolutions]
    indices = [labels[:i].count(c) for i, c in enumerate(labels)]  # 0, 1, ... within each class
    return SimpleNamespace(labels=torch.tensor(labels), indices=indices, stages=stages)


def test_unicode_class_names_give_one_file_each_and_the_count_is_the_files(tmp_path):
    plan = _plan([0, 1, 2])
    outputs = {"s32": torch.zeros(3, 3, 32, 32)}
    written = write_outputs(outputs, plan, tmp_path / "o", record={}, class_names=["狗", "猫", "кот"])
    assert written.final_images == 3
    finals = sorted(p.name for p in (tmp_path / "o").glob("*.png") if p.name != "grid.png")
    assert finals == ["0-狗_0.png", "1-猫_0.png", "2-кот_0.png"]
    assert len(list((tmp_path / "o" / "s32").iterdir())) == 3


def test_a_new_run_replaces_the_earlier_runs_outputs_and_keeps_other_files(tmp_path):
    out = tmp_path / "o"
    write_outputs({"s32": torch.zeros(4, 3, 32, 32), "s64": torch.zeros(4, 3, 64, 64)}, _plan([1, 1, 7, 7], (32, 64)),
                  out, record={"classes": [1, 7]})
    (out / "notes.txt").write_text("mine")
    write_outputs({"s32": torch.zeros(1, 3, 32, 32)}, _plan([2]), out, record={"classes": [2]})
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == sorted([MANIFEST, "2_0.png", "s32/2_0.png", "grid.png", "settings.json", "notes.txt"])
    assert json.loads((out / "settings.json").read_text())["classes"] == [2]


def test_two_samples_with_one_file_name_are_refused_before_writing(tmp_path):
    with pytest.raises(RuntimeError, match="share file names"):
        write_outputs({"s32": torch.zeros(2, 3, 32, 32)}, SimpleNamespace(
            labels=torch.tensor([0, 0]), indices=[0, 0], stages=_plan([0]).stages), tmp_path, record={})
    assert not list(tmp_path.iterdir())


def test_a_folder_of_other_files_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "photo.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^--out .* holds files that no sampling run wrote \(photo.png\); .*--overwrite"):
        claim_out_dir(tmp_path)
    (tmp_path / "settings.json").write_text("{}")  # an older run's: the folder is incomplete until rewritten
    assert claim_out_dir(tmp_path, overwrite=True) == [] and (tmp_path / "photo.png").exists()
    assert not (tmp_path / "settings.json").exists()


def test_sampling_command_owns_its_out(runs_root, tmp_path, capsys):
    out = tmp_path / "O"
    args = ["--runs", str(runs_root), "--steps", "1", "--out", str(out)]
    assert sample_cascade.main(["--classes", "1,2", "--num-per-class", "2", "--stages", "base32,sr64", *args]) == 0
    assert sample_cascade.main(["--classes", "2", "--stages", "base32", *args]) == 0
    printed = capsys.readouterr().out
    assert "wrote 4 images of 64x64" in printed and "wrote 1 image of 32x32" in printed
    names = json.loads((out / "settings.json").read_text())["class_names"]
    stem = sample_stem(2, 0, names)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == sorted([MANIFEST, f"{stem}.png", f"base32/{stem}.png", "grid.png", "settings.json"])

    # A second run into --out while one holds it: one line, exit code 2, nothing written.
    with FolderLock(out, "--out"):
        assert sample_cascade.main(["--classes", "1", "--stages", "base32", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"sample_cascade: error: --out {out} is in use by another run (pid ") and "\n" not in err
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted([*files, LOCK_NAME])


def test_a_failed_sampling_run_leaves_the_earlier_outputs(runs_root, tmp_path, monkeypatch):
    """The folder is checked before sampling, and earlier images are replaced only by complete new ones (the
    folder stops claiming to be complete: no settings.json)."""
    out = tmp_path / "O"
    args = ["--runs", str(runs_root), "--steps", "1", "--out", str(out), "--stages", "base32"]
    assert sample_cascade.main(["--classes", "1", *args]) == 0
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())

    def diverged(self, plan, **kwargs):
        raise RuntimeError("sampling failed")

    monkeypatch.setattr(sample_cascade.CascadePipeline, "run", diverged)
    assert sample_cascade.main(["--classes", "2", *args]) == 1  # a failure: one line, exit 1
    after = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != LOCK_NAME)
    assert after == [name for name in before if name != "settings.json"]

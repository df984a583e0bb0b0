"""tools/make_shards.py: the bad-input policy on a folder of awkward files, and one-line errors."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cascade.data.loader import iterate_split
from cascade.imageops import float_to_uint8

ROOT = Path(__file__).resolve().parents[2]


def _load_tool():
    spec = importlib.util.spec_from_file_location("make_shards_tool", ROOT / "tools" / "make_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def make_shards():
    return _load_tool()


def _awkward_folder(root: Path) -> dict[str, tuple[int, int, int]]:
    """Class folders of uniform images in awkward formats; returns file → expected RGB colour."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    expected = {}
    Image.new("L", (80, 70), 50).save(root / "a" / "gray.png")
    expected["a/gray.png"] = (50, 50, 50)
    Image.new("RGBA", (70, 70), (255, 0, 0, 0)).save(root / "a" / "clear.png")  # transparent → white
    expected["a/clear.png"] = (255, 255, 255)
    palette = Image.new("P", (70, 70), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30])
    palette.save(root / "a" / "palette.png")
    expected["a/palette.png"] = (10, 200, 30)
    Image.new("CMYK", (72, 72), (0, 255, 255, 0)).save(root / "a" / "cmyk.jpg", quality=95)
    expected["a/cmyk.jpg"] = (255, 0, 0)
    Image.fromarray(np.full((70, 75), 32768, np.uint16)).save(root / "a" / "deep16.png")  # I;16 → 128
    expected["a/deep16.png"] = (128, 128, 128)
    Image.new("RGB", (90, 66), (0, 0, 250)).save(root / "b" / "photo.jpg", quality=95)
    expected["b/photo.jpg"] = (0, 0, 250)
    Image.new("RGB", (40, 40), (200, 100, 0)).save(root / "b" / "small.png")  # < max_res 64: upscaled
    expected["b/small.png"] = (200, 100, 0)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "b" / "tiny.png")  # < min_size 16: skipped
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 90, 3), dtype=np.uint8)).save(buf, "PNG")
    (root / "b" / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "b" / "notes.txt").write_text("not an image")
    (root / "README.txt").write_text("outside the class folders")
    return expected


def test_bad_input_policy_converts_upscales_skips_and_reports(tmp_path, make_shards, capsys):
    expected = _awkward_folder(tmp_path / "src")
    info = make_shards.main(["--source", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--max-res", "64",
                             "--val-fraction", "0", "--shard-size", "3", "--no-progress"])
    out = capsys.readouterr().out
    report = info["bad_input"]
    assert report["converted"] == {
        "CMYK": {"count": 1, "files": ["a/cmyk.jpg"]}, "I;16": {"count": 1, "files": ["a/deep16.png"]},
        "L": {"count": 1, "files": ["a/gray.png"]}, "P": {"count": 1, "files": ["a/palette.png"]},
        "RGBA": {"count": 1, "files": ["a/clear.png"]}}
    assert report["upscaled"] == {"count": 1, "files": ["b/small.png"]}
    assert report["skipped_too_small"]["files"] == ["b/tiny.png"]
    assert report["skipped_unreadable"]["files"] == ["b/truncated.png"]
    assert report["skipped_not_image"]["files"] == ["b/notes.txt"]
    assert report["ignored_outside_class_folders"]["files"] == ["README.txt"]
    assert info["class_names"] == ["a", "b"] and info["counts"]["train"]["per_class"] == [5, 2]
    for name in ("b/truncated.png", "b/tiny.png", "b/notes.txt", "a/cmyk.jpg", "README.txt"):
        assert name in out
    colours = sorted(tuple(int(c) for c in float_to_uint8(s["images"][64]).numpy().reshape(-1, 3).mean(0).round())
                     for s in iterate_split(tmp_path / "out", "train", [32, 64]))
    assert len(colours) == len(expected)  # every valid file landed, with the right colour
    for got, want in zip(colours, sorted(expected.values())):
        assert np.abs(np.array(got) - np.array(want)).max() <= 3, (got, want)
    assert json.loads((tmp_path / "out" / "dataset.json").read_text()) == info


def test_synthetic_cli_writes_requested_counts(tmp_path, make_shards, capsys):
    info = make_shards.main(["--source", "synthetic", "--out", str(tmp_path), "--num-classes", "2",
                             "--images-per-class", "2", "--max-res", "32", "--val-fraction", "0.5", "--no-progress"])
    assert info["counts"]["train"]["total"] == 2 and info["counts"]["val"]["total"] == 2
    assert "bad input: none" in capsys.readouterr().out


def _exit_code(main, argv) -> int:
    """The exit code of a tool's main: its return value, or the code of the SystemExit argparse raises."""
    try:
        result = main(argv)
    except SystemExit as exc:
        return exc.code
    return result if isinstance(result, int) else 0


@pytest.mark.parametrize("args, message", [
    (["--source", "{missing}"], "source folder not found"),
    (["--source", "{empty}"], "no class sub-folders"),
    (["--source", "synthetic", "--val-fraction", "1.5"], "argument --val-fraction: must be a number in [0, 1)"),
    (["--source", "synthetic", "--shard-size", "0"], "argument --shard-size: must be an integer >= 1"),
    (["--source", "photos", "--num-classes", "3"], "--num-classes (num_classes) applies only to the synthetic"),
    (["--source", "{empty}", "--images-per-class", "3"], "--images-per-class (images_per_class) applies only"),
])
def test_errors_are_one_line(tmp_path, make_shards, args, message, capsys):
    (tmp_path / "empty").mkdir()
    args = [a.format(missing=tmp_path / "missing", empty=tmp_path / "empty") for a in args]
    assert _exit_code(make_shards.main, args + ["--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("make_shards: error: ") and message in err[0]


def test_a_dataset_already_in_out_names_the_flag_and_counts_are_pluralised(tmp_path, make_shards, capsys):
    args = ["--source", "synthetic", "--num-classes", "1", "--images-per-class", "2", "--val-fraction", "0.5",
            "--max-res", "32", "--out", str(tmp_path / "out"), "--no-progress"]
    assert _exit_code(make_shards.main, args) == 0
    assert "wrote 1 train / 1 val sample of 1 class at [32]" in capsys.readouterr().out
    assert _exit_code(make_shards.main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("pass --overwrite (overwrite=True) to replace it")


def test_cli_error_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "--source",
                             str(tmp_path / "missing"), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"make_shards: error: source folder not found: {tmp_path / 'missing'}"]


def test_single_transparent_colour_is_composited_on_white_and_reported(tmp_path, make_shards, capsys):
    """PNG tRNS in RGB, L and 16-bit L (I;16): the transparent colour becomes white, decided from the stored
    values before the 16 → 8-bit conversion, and each file is listed in the bad-input report."""
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    rgb = np.full((64, 64, 3), (10, 20, 30), np.uint8)
    rgb[:, 32:] = (200, 100, 50)
    Image.fromarray(rgb).save(src / "rgb.png", transparency=(10, 20, 30))
    gray = np.full((64, 64), 40, np.uint8)
    gray[:, 32:] = 90
    Image.fromarray(gray).save(src / "gray.png", transparency=40)
    deep = np.full((64, 64), 1000, np.uint16)  # 1000/257 → 4 after conversion: only the 16-bit value matches
    deep[:, 32:] = 60000
    Image.fromarray(deep).save(src / "deep.png", transparency=1000)
    info = make_shards.main(["--source", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--max-res", "64",
                             "--val-fraction", "0", "--no-progress"])
    out = capsys.readouterr().out
    assert info["bad_input"]["converted"] == {
        "I;16+transparency": {"count": 1, "files": ["a/deep.png"]},
        "L+transparency": {"count": 1, "files": ["a/gray.png"]},
        "RGB+transparency": {"count": 1, "files": ["a/rgb.png"]}}
    assert "converted from RGB+transparency to RGB: 1 (a/rgb.png)" in out
    images = [float_to_uint8(s["images"][64]).numpy() for s in iterate_split(tmp_path / "out", "train", [64])]
    halves = sorted((tuple(int(c) for c in im[32, 8]), tuple(int(c) for c in im[32, 56])) for im in images)
    assert halves == sorted([((255, 255, 255), (200, 100, 50)), ((255, 255, 255), (90, 90, 90)),
                             ((255, 255, 255), (233, 233, 233))])


def test_interrupted_write_is_never_a_dataset_and_a_rerun_finishes_it(tmp_path, make_shards, capsys, monkeypatch):
    from cascade.data import shards

    args = ["--source", "synthetic", "--num-classes", "2", "--images-per-class", "4", "--max-res", "32",
            "--shard-size", "2", "--val-fraction", "0.5", "--no-progress"]
    reference = make_shards.main(args + ["--out", str(tmp_path / "ref")])
    calls = {"n": 0}
    real = shards._ShardSink.write

    def interrupted_write(self, files):  # Ctrl-C while the third sample is being written
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real(self, files)

    monkeypatch.setattr(shards._ShardSink, "write", interrupted_write)
    out = tmp_path / "out"
    assert make_shards.main(args + ["--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("make_shards: interrupted;") and "Traceback" not in err[0]
    assert not (out / "dataset.json").exists() and (out / ".incomplete").exists()
    with pytest.raises(FileNotFoundError, match="no dataset.json"):
        next(iterate_split(out, "train", [32]))
    monkeypatch.undo()
    assert make_shards.main(args + ["--out", str(out)]) == reference  # same command, no --overwrite
    for name in ["dataset.json"] + reference["shards"]["train"] + reference["shards"]["val"]:
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert not (out / ".incomplete").exists() and not list(out.glob(".*.tmp"))


def test_digits_source_writes_real_digits_as_gray_rgb(tmp_path, make_shards, capsys):
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    info = make_shards.main(["--source", "digits", "--out", str(tmp_path), "--images-per-class", "4",
                             "--max-res", "64", "--val-fraction", "0.25", "--no-progress"])
    assert info["class_names"] == [str(c) for c in range(10)]
    assert info["counts"]["train"]["total"] == 30 and info["counts"]["val"]["total"] == 10
    assert info["hflip"] is False  # a mirrored 3 is no 3: training must not flip digits
    out = capsys.readouterr().out
    assert "bad input: none" in out and "training flips images never (mirror images are not of their class)" in out
    digits = sklearn_datasets.load_digits()
    seen = 0
    for sample in iterate_split(tmp_path, "train", [32, 64]):
        image = float_to_uint8(sample["images"][32]).numpy().astype(int)
        assert image.shape == (32, 32, 3)
        assert (image[..., 0] == image[..., 1]).all() and (image[..., 0] == image[..., 2]).all()  # gray as RGB
        # the 32² image is its 8×8 digit upscaled: 4×4 block means give back the digit (0..16 → 0..255)
        blocks = image[..., 0].reshape(8, 4, 8, 4).mean(axis=(1, 3)) * 16 / 255
        errors = np.abs(digits.images[digits.target == sample["y"]][:4] - blocks[None]).mean(axis=(1, 2))
        assert errors.min() < 1.0, (sample["key"], errors)  # one of its class's first 4 digits
        seen += 1
    assert seen == 30


def test_no_hflip_declares_a_folder_dataset_not_mirror_symmetric(tmp_path, make_shards, capsys):
    for name in ("a", "b"):
        (tmp_path / "src" / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32), (40 * i, 200, 100)).save(tmp_path / "src" / name / f"{i}.png")
    common = ["--source", str(tmp_path / "src"), "--max-res", "32", "--val-fraction", "0.5", "--no-progress"]
    assert make_shards.main(common + ["--out", str(tmp_path / "flip")])["hflip"] is True
    assert "training flips images at random" in capsys.readouterr().out
    assert make_shards.main(common + ["--out", str(tmp_path / "noflip"), "--no-hflip"])["hflip"] is False


def test_digits_source_without_scikit_learn_is_one_line(tmp_path, make_shards, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails as if not installed
    assert _exit_code(make_shards.main, ["--source", "digits", "--out", str(tmp_path), "--no-progress"]) == 2
    assert capsys.readouterr().err == ("make_shards: error: the 'digits' source needs scikit-learn: pip install -e "
                                       ".[demo]\n")


def test_writing_in_process_keeps_the_callers_thread_count(tmp_path):
    """workers=1 processes images in this process on one torch thread, then gives the caller its threads back
    (the demo and `bench.py --trainer` write shards and then train in the same process)."""
    import torch

    from cascade.data.shards import write_shards
    from cascade.data.sources import SyntheticSource

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        write_shards(SyntheticSource(num_classes=2, images_per_class=2, seed=0), tmp_path / "s", shard_size=4,
                     val_fraction=0.25, max_res=32)
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="no valid images"):  # and on a way out by an error
            write_shards(SyntheticSource(num_classes=2, images_per_class=2, seed=0), tmp_path / "t", max_res=32,
                         min_size=100_000)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)

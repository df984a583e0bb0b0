"""The shard writer's pixel cap: an image declaring too many pixels is skipped from its header, never decoded."""

from __future__ import annotations

import json
import warnings

import pytest
from PIL import Image

from cascade.data import bad_input
from cascade.data.bad_input import BadInputReport, SkipImage, open_image
from cascade.data.shards import write_shards
from cascade.data.sources import FolderSource


@pytest.fixture
def small_cap(monkeypatch):
    monkeypatch.setattr(bad_input, "MAX_SOURCE_PIXELS", 64 * 64)


def test_open_image_refuses_more_pixels_than_the_cap_without_pillows_warning(tmp_path, small_cap):
    Image.new("L", (65, 64)).save(tmp_path / "big.png")
    Image.new("L", (64, 64)).save(tmp_path / "ok.png")
    with pytest.raises(SkipImage, match="65×64 pixels exceeds") as err:
        open_image(tmp_path / "big.png")
    assert err.value.category == "skipped_too_large"
    with open_image(tmp_path / "ok.png") as image:
        assert image.size == (64, 64)


def test_pillows_own_bomb_limit_is_reported_as_too_large(tmp_path, monkeypatch):
    Image.new("L", (64, 64)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40)  # 64² > 2× the limit: Pillow raises at open
    with pytest.raises(SkipImage, match="decompression bomb") as err:
        open_image(tmp_path / "bomb.png")
    assert err.value.category == "skipped_too_large"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60 * 60)  # between 1× and 2×: Pillow only warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_image(tmp_path / "bomb.png").close()


def test_shard_writer_skips_a_too_large_image_and_reports_it(tmp_path, small_cap, capsys):
    for cls in ("a", "b"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 40), (40 * i, 9, 200)).save(tmp_path / "src" / cls / f"ok{i}.png")
    Image.new("L", (200, 100)).save(tmp_path / "src" / "a" / "huge.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing of Pillow's reaches the user
        write_shards(FolderSource(root=str(tmp_path / "src")), tmp_path / "out", shard_size=4, val_fraction=0.0,
                     max_res=32, min_size=16, workers=1)
    report = json.loads((tmp_path / "out" / "dataset.json").read_text())["bad_input"]
    assert report["skipped_too_large"] == {"count": 1, "files": ["a/huge.png"]}
    lines = BadInputReport.from_dict(report).summary_lines()
    assert any(line.startswith("skipped: too large") and "a/huge.png" in line for line in lines)
    del report["skipped_too_large"]  # a report written before the category existed still reads
    assert BadInputReport.from_dict(report).skipped_too_large == []

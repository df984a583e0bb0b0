"""Data errors reach the user as one line, whichever process met them: a loader worker's error is the main
process's, missing shards are named before any work starts, a damaged val split is counted, flagged and,
when most of it is unreadable, refused unless allowed."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from cascade.data.loader import iterate_split, make_stage_loader
from cascade.data.shards import write_shards
from cascade.data.sources import SyntheticSource
from cascade.data.splits import read_split
from cascade.data.workers import WorkerFailure
from cascade.evaluation.report import sweep_markdown, write_report
from cascade.evaluation.sample_lists import load_eval_data
from cascade.pipeline.cascade_pipeline import CascadeConfigError, CascadePipeline
from cascade.pipeline.chain import LoadedStage
from cascade.training.data_stream import check_train_shards


@pytest.fixture
def shards(tmp_path) -> Path:
    """2 classes × 10 images at 32², half of each class in val, one image per shard: 10 train and 10 val shards."""
    out = tmp_path / "shards"
    write_shards(SyntheticSource(num_classes=2, images_per_class=10, seed=0), out, shard_size=1, val_fraction=0.5,
                 max_res=32)
    return out


def _corrupt(paths) -> None:
    for path in paths:
        path.write_bytes(b"not a tar file" * 8)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_corrupt_train_split_gives_the_same_one_message_with_or_without_workers(shards, num_workers):
    _corrupt(shards.glob("train-*.tar"))
    loader = make_stage_loader(shards, resolution=32, batch_size=2, num_workers=num_workers, epoch_length=2)
    with warnings.catch_warnings(), pytest.raises(RuntimeError) as exc:
        warnings.simplefilter("ignore")
        next(iter(loader))
    message = str(exc.value)
    assert message.startswith("cascade.data.loader: 1000 consecutive unreadable shards/samples")
    assert "Traceback" not in message and "Caught" not in message and "\n" not in message


def test_a_worker_failure_raises_the_original_exception_or_names_its_type():
    with pytest.raises(FileNotFoundError, match="^gone$"):
        WorkerFailure(FileNotFoundError("gone")).reraise()

    class Local(Exception):  # defined in a function: cannot be pickled
        pass

    with pytest.raises(RuntimeError, match="^Local: odd$"):
        WorkerFailure(Local("odd")).reraise()


def test_missing_shards_listed_in_dataset_json_are_named_before_reading(shards):
    (shards / "train-000003.tar").unlink()
    (shards / "val-000001.tar").unlink()
    (shards / "val-000004.tar").unlink()
    with pytest.raises(FileNotFoundError, match=r"lists 1 train shard that is missing \(train-000003.tar\)"):
        check_train_shards(str(shards))
    with pytest.raises(FileNotFoundError, match="lists 1 train shard"):
        make_stage_loader(shards, resolution=32, batch_size=2, num_workers=0)
    with pytest.raises(FileNotFoundError, match=r"lists 2 val shards that are missing \(val-000001.tar, val-000004"):
        next(iter(iterate_split(shards, "val", [32])))


def _pipeline() -> CascadePipeline:
    """An untrained tiny base stage: enough for the data checks, which never sample."""
    import stages
    from cascade.nets.build import build_model

    config = stages.get_stage("base32", "tiny", num_classes=2)
    return CascadePipeline([LoadedStage("base32", config, build_model(config), None, Path("none"), 0)])


def test_a_damaged_val_split_is_counted_flagged_and_refused_below_half(shards, tmp_path):
    pipeline = _pipeline()
    vals = sorted(shards.glob("val-*.tar"))
    _corrupt(vals[:4])  # 6 of 10 readable: counted, allowed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        split = read_split(shards, "val", [32])
        data = load_eval_data(shards, pipeline, num_samples=None, batch_size=4)
    assert (split.read, split.skipped) == (6, 4)
    assert data.val_images == {"read": 6, "skipped": 4} and data.num_samples == 6
    meta = {"val_images": data.val_images}
    write_report({}, tmp_path / "r.json", tmp_path / "r.md", meta=meta)
    assert "**Warning: damaged val split.** 6 of 10 val images were readable" in (tmp_path / "r.md").read_text()
    markdown = sweep_markdown([], {}, {"ranked_by": "x", "mode": "cascaded", **meta})
    assert "6 of 10 val images were readable (4 skipped" in markdown

    _corrupt(vals[4:7])  # 3 of 10 readable: refused in one line unless allowed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CascadeConfigError) as exc:
            load_eval_data(shards, pipeline, num_samples=None, batch_size=4)
        data = load_eval_data(shards, pipeline, num_samples=None, batch_size=4, allow_damaged_val=True)
    assert str(exc.value).startswith(f"data: only 3 of 10 val images in {shards} are readable (7 skipped")
    assert "--allow-damaged-val" in str(exc.value) and "\n" not in str(exc.value)
    assert data.val_images == {"read": 3, "skipped": 7}


def test_an_intact_split_reports_nothing_skipped(shards, tmp_path):
    split = read_split(shards, "val", [32])
    labels, images = split
    assert (split.read, split.skipped) == (10, 0) and images == {} and labels.dtype == torch.long
    write_report({}, tmp_path / "r.json", tmp_path / "r.md", meta={"val_images": {"read": 10, "skipped": 0}})
    assert "damaged" not in (tmp_path / "r.md").read_text()


def test_the_allow_damaged_val_flag_reaches_the_metric_settings():
    import argparse

    from cascade.cli import add_metric_arguments, metric_settings

    parser = argparse.ArgumentParser()
    add_metric_arguments(parser)
    assert metric_settings(parser.parse_args(["--allow-damaged-val"])).allow_damaged_val is True
    assert metric_settings(parser.parse_args([])).allow_damaged_val is False

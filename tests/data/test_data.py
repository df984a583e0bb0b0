"""Shard writer, sources and stage loader: round trip, splits across ranks/workers, corruption, determinism."""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from cascade.data.loader import iterate_split, make_stage_loader
from cascade.data.shard_folder import read_dataset_info
from cascade.data.shards import write_shards
from cascade.data.sources import FolderSource, PhotoSource, SyntheticSource, get_source
from cascade.data.workers import assign_shards
from cascade.imageops import downsample, float_to_uint8

PNG_STEP = 1.0 / 127.5 + 1e-6  # one 8-bit level in [-1, 1]


@pytest.fixture(scope="module")
def synthetic():
    return SyntheticSource(num_classes=3, images_per_class=4, seed=0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, synthetic):
    """3 classes × 4 images; 6 train + 6 val samples in 3 + 3 shards of 2."""
    root = tmp_path_factory.mktemp("synthetic")
    write_shards(synthetic, root, shard_size=2, val_fraction=0.5, seed=0)
    return root


def _all_keys(root, split):
    return [s["key"] for s in iterate_split(root, split, [32])]


def test_round_trip_every_sample_class_and_pyramid(dataset, synthetic):
    info = read_dataset_info(dataset)
    assert info["resolutions"] == [32, 64, 128, 256] and info["num_classes"] == 3
    assert info["counts"]["train"] == {"total": 6, "per_class": [2, 2, 2]}
    assert info["counts"]["val"] == {"total": 6, "per_class": [2, 2, 2]}
    assert len(info["shards"]["train"]) == 3 and len(info["shards"]["val"]) == 3
    rendered = {hashlib.sha1(synthetic.render(c, i).tobytes()).hexdigest(): c
                for c in range(3) for i in range(4)}
    seen = {}
    for split in ("train", "val"):
        for sample in iterate_split(dataset, split, [32, 64, 128, 256]):
            images = sample["images"]
            full = float_to_uint8(images[256]).numpy()
            digest = hashlib.sha1(full.tobytes()).hexdigest()
            assert rendered[digest] == sample["y"]  # the stored 256² image is the source image, class right
            seen[digest] = sample["key"]
            for res in (32, 64, 128):  # smaller sizes = the project's downsampling of the largest
                expected = downsample(images[256][None], res)[0].clamp(-1, 1)
                assert torch.allclose(images[res], expected, atol=PNG_STEP / 2)  # 8-bit rounding only
    assert len(seen) == 12  # every source image exactly once
    batches = list(iterate_split(dataset, "val", [32], batch_size=4))
    assert [len(b["key"]) for b in batches] == [4, 2] and batches[1]["images"][32].shape == (2, 3, 32, 32)
    assert [k for b in batches for k in b["key"]] == _all_keys(dataset, "val")  # same deterministic order


def test_batches_have_stage_sizes_and_consistent_flips(dataset):
    originals = {s["key"]: s["images"] for s in iterate_split(dataset, "train", [32, 64])}
    loader = make_stage_loader(dataset, resolution=64, low_resolution=32, batch_size=4, num_workers=0,
                               shuffle_buffer=4, epoch_length=6, keep_keys=True)
    flips = []
    for batch in loader:
        assert batch["x"].shape == (4, 3, 64, 64) and batch["x_low"].shape == (4, 3, 32, 32)
        assert batch["y"].dtype == torch.long and batch["x"].dtype == torch.float32
        assert batch["x"].min() >= -1 and batch["x"].max() <= 1
        for key, x, x_low in zip(batch["key"], batch["x"], batch["x_low"]):
            flipped = not torch.equal(x, originals[key][64])
            if flipped:
                assert torch.equal(x, originals[key][64].flip(-1))
            assert torch.equal(x_low, originals[key][32].flip(-1) if flipped else originals[key][32])
            flips.append(flipped)
    assert any(flips) and not all(flips)
    base = next(iter(make_stage_loader(dataset, resolution=32, batch_size=2, num_workers=0, epoch_length=1)))
    assert set(base) == {"x", "y"} and base["x"].shape == (2, 3, 32, 32)


def test_flips_follow_the_datasets_declaration(dataset, tmp_path):
    import json
    import shutil

    from cascade.data.shard_folder import dataset_hflip

    assert dataset_hflip({"hflip": False}) is False and dataset_hflip({"hflip": True}) is True
    assert dataset_hflip({}) is True and dataset_hflip(None) is True  # older shards and bare url lists
    assert dataset_hflip({"hflip": True}, False) is False and dataset_hflip({"hflip": False}, True) is True
    with pytest.raises(ValueError, match="hflip must be auto, true or false, got 'yes'"):
        dataset_hflip({}, "yes")
    assert json.loads((dataset / "dataset.json").read_text())["hflip"] is True  # synthetic shapes: mirror-safe
    mirrored = tmp_path / "no-flip"
    shutil.copytree(dataset, mirrored)
    info = json.loads((mirrored / "dataset.json").read_text())
    (mirrored / "dataset.json").write_text(json.dumps({**info, "hflip": False}))
    originals = {s["key"]: s["images"][32] for s in iterate_split(mirrored, "train", [32])}

    def flips(root, hflip):
        loader = make_stage_loader(root, resolution=32, batch_size=4, num_workers=0, shuffle_buffer=4, epoch_length=6,
                                   keep_keys=True, hflip=hflip)
        return [not torch.equal(x, originals[k]) for b in loader for k, x in zip(b["key"], b["x"])]

    assert not any(flips(mirrored, "auto"))  # declared not mirror-symmetric: never flipped
    assert any(flips(mirrored, True)) and any(flips(dataset, "auto")) and not any(flips(dataset, False))


@pytest.mark.parametrize("num_workers", [1, 2])  # 3 val shards: whole shards per slot (1), samples (2)
def test_val_two_ranks_read_every_sample_once(dataset, num_workers):
    keys = []
    for rank in range(2):
        loader = make_stage_loader(dataset, split="val", resolution=32, batch_size=4, num_workers=num_workers,
                                   rank=rank, world_size=2, keep_keys=True)
        keys.append([k for batch in loader for k in batch["key"]])
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(_all_keys(dataset, "val"))


def test_train_shards_disjoint_per_rank_and_worker(dataset):
    urls = [f"s{i}" for i in range(10)]
    slices = [assign_shards(urls, r, 2, w, 2) for r in range(2) for w in range(2)]
    assert sorted(u for s in slices for u in s) == sorted(urls)
    assert all(not set(a) & set(b) for i, a in enumerate(slices) for b in slices[i + 1:])
    keys = []
    for rank in range(2):  # 3 train shards, 2 ranks × 1 worker: disjoint slices of whole shards
        loader = make_stage_loader(dataset, resolution=32, batch_size=2, num_workers=0, rank=rank, world_size=2,
                                   epoch_length=4, keep_keys=True, shuffle_buffer=2)
        keys.append({k for batch in loader for k in batch["key"]})
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    with pytest.warns(UserWarning, match="resamples from all shards"):
        make_stage_loader(dataset, resolution=32, batch_size=2, num_workers=2, rank=0, world_size=2)


def test_train_stream_is_reproducible_for_a_seed(dataset):
    def epochs(seed, num_workers=2):
        loader = make_stage_loader(dataset, resolution=64, low_resolution=32, batch_size=3, num_workers=num_workers,
                                   seed=seed, shuffle_buffer=4, epoch_length=4)
        return [[b for b in loader] for _ in range(2)]

    first, again, other = epochs(seed=7), epochs(seed=7), epochs(seed=8)
    for a, b in zip(first[0] + first[1], again[0] + again[1]):
        assert all(torch.equal(a[k], b[k]) for k in ("x", "x_low", "y"))
    assert not all(torch.equal(a["x"], b["x"]) for a, b in zip(first[0], first[1]))  # epochs differ
    assert not all(torch.equal(a["x"], b["x"]) for a, b in zip(first[0], other[0]))  # seeds differ


def test_writer_output_is_deterministic(tmp_path):
    source = SyntheticSource(num_classes=2, images_per_class=3, seed=3)
    for name, workers in (("a", 1), ("b", 2)):
        write_shards(source, tmp_path / name, shard_size=2, val_fraction=0.34, seed=5, workers=workers, max_res=64)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir()) and "dataset.json" in files
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert not np.array_equal(source.render(0, 0), SyntheticSource(num_classes=2, seed=4).render(0, 0))
    assert read_dataset_info(tmp_path / "a")["resolutions"] == [32, 64]


def _png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_corrupt_shards_and_samples_are_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(0)

    def sample(key, cls=b"1", bad_image=False):
        files = {"__key__": key, "64.png": _png(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
                 "32.png": b"\x89PNG not really" if bad_image else _png(rng.integers(0, 256, (32, 32, 3),
                                                                                     dtype=np.uint8))}
        if cls is not None:
            files["cls"] = cls
        return files

    shards = {"good": [sample("g0"), sample("g1")], "badimg": [sample("b0", bad_image=True), sample("b1")],
              "nocls": [sample("n0", cls=None), sample("n1"), sample("n2", cls=b"x")],
              "trunc": [sample("t0"), sample("t1"), sample("t2")]}
    urls = []
    for name, samples in shards.items():
        path = tmp_path / f"{name}.tar"
        with wds.TarWriter(str(path), mtime=0, encoder=False) as writer:
            for s in samples:
                writer.write(s)
        urls.append(str(path))
    data = (tmp_path / "trunc.tar").read_bytes()
    with tarfile.open(tmp_path / "trunc.tar") as tar:
        cut = [m for m in tar.getmembers() if m.name.startswith("t1")][1].offset_data + 100
    (tmp_path / "trunc.tar").write_bytes(data[:cut])  # t0 whole, t1 cut inside its second file

    loader = make_stage_loader(urls, split="val", resolution=64, low_resolution=32, batch_size=8,
                               num_workers=0, keep_keys=True)
    with pytest.warns(RuntimeWarning, match="cascade.data.loader: skipped"):
        keys = sorted(k for batch in loader for k in batch["key"])
    assert keys == ["b1", "g0", "g1", "n1", "t0"]
    counts = loader.stats.as_dict()
    assert counts["corrupt_images"] == 1 and counts["bad_class"] == 1
    assert counts["missing_fields"] >= 1 and counts["shard_errors"] >= 1  # n0; truncated shard (and t1)

    # training carries on over the same shards; the counters are shared by the worker processes
    train = make_stage_loader(urls, resolution=64, low_resolution=32, batch_size=4, num_workers=2,
                              epoch_length=4, shuffle_buffer=4)
    assert sum(1 for _ in train) == 4
    assert train.stats.total > 0


def test_clear_errors(tmp_path, dataset):
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        read_dataset_info(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not found"):
        make_stage_loader(str(tmp_path / "missing"), resolution=32, batch_size=2)
    with pytest.raises(ValueError, match="low_resolution"):
        make_stage_loader(dataset, resolution=64, low_resolution=64, batch_size=2)
    small = tmp_path / "small"
    write_shards(SyntheticSource(num_classes=2, images_per_class=1), small, shard_size=4, val_fraction=0.0,
                 max_res=32)
    with pytest.raises(ValueError, match=r"has resolutions \[32\].*needs \[64, 32\]"):
        make_stage_loader(small, resolution=64, low_resolution=32, batch_size=2)
    with pytest.raises(ValueError, match="no val shards"):
        make_stage_loader(small, split="val", resolution=32, batch_size=2)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_shards(SyntheticSource(num_classes=2, images_per_class=1), small, max_res=32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        FolderSource(root=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="source folder not found"):
        get_source(str(tmp_path / "nowhere"))
    (tmp_path / "junk" / "cat").mkdir(parents=True)
    (tmp_path / "junk" / "cat" / "a.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no valid images"):
        write_shards(get_source(str(tmp_path / "junk")), tmp_path / "out", shard_size=4)
    assert not list((tmp_path / "out").glob("*.tar"))


def test_photo_source_is_deterministic():
    pytest.importorskip("skimage")
    pytest.importorskip("sklearn")
    source = PhotoSource(images_per_class=2, seed=1)
    assert {"astronaut", "coffee", "china", "flower"} <= set(source.class_names)
    items = source.items_per_class()
    a, b = (np.asarray(source.load(items[0][1])) for _ in range(2))
    assert a.shape == (256, 256, 3) and np.array_equal(a, b)
    assert not np.array_equal(a, np.asarray(source.load(items[0][0])))


def test_url_patterns_pass_through(dataset, tmp_path):
    pattern = str(dataset / "val-{000000..000002}.tar")
    keys = [k for b in make_stage_loader(pattern, split="val", resolution=32, batch_size=8, num_workers=0,
                                         keep_keys=True) for k in b["key"]]
    assert sorted(keys) == sorted(_all_keys(dataset, "val"))
    moved = tmp_path / "copy.tar"  # no dataset.json next to it: epoch_length must be given
    shutil.copy(dataset / "train-000000.tar", moved)
    with pytest.raises(ValueError, match="epoch_length is required"):
        make_stage_loader([str(moved)], resolution=32, batch_size=2)
    pipe = [f"pipe:cat {moved}"]
    batch = next(iter(make_stage_loader(pipe, resolution=32, batch_size=2, num_workers=0, epoch_length=1,
                                        shuffle_buffer=2)))
    assert batch["x"].shape == (2, 3, 32, 32)


def test_num_workers_auto_leaves_the_compute_threads_their_cores(monkeypatch):
    """data.num_workers=auto: on CPU the cores the torch threads leave free (at most 4); with an accelerator all
    cores but one (at most 8); integers as given; anything else one clear error from DataConfig."""
    import os

    from cascade.data.settings import DataConfig
    from cascade.data.workers import resolve_num_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert resolve_num_workers("auto", torch.device("cpu")) == 0  # 2 cores, 2 threads: measured best
        torch.set_num_threads(1)
        assert resolve_num_workers("auto", torch.device("cpu")) == 1
        assert resolve_num_workers("auto", torch.device("cuda")) == 1
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
        assert resolve_num_workers("auto", torch.device("cpu")) == 4
        assert resolve_num_workers("auto", torch.device("cuda")) == 8
    finally:
        torch.set_num_threads(threads)
    assert resolve_num_workers(3, torch.device("cpu")) == 3 and DataConfig(root="x").num_workers == "auto"
    for bad in (-1, "two", True, 1.5):
        with pytest.raises(ValueError, match="num_workers must be auto or an integer >= 0"):
            DataConfig(root="x", num_workers=bad)

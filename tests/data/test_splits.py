"""cascade.data.splits: a split read whole equals the split read batch by batch and the loader's own images."""

from __future__ import annotations

import pytest
import torch

from cascade.data.loader import iterate_split
from cascade.data.splits import read_split, split_batches


def test_read_split_holds_every_image_as_the_loader_decodes_it(synthetic_shards):
    labels, images = read_split(synthetic_shards, "val", [32], keep=[32, 64])
    samples = list(iterate_split(synthetic_shards, "val", [32, 64]))
    assert labels.tolist() == [s["y"] for s in samples] and labels.dtype == torch.long
    for r in (32, 64):
        assert images[r].shape == (len(samples), 3, r, r) and images[r].dtype == torch.float32
        assert torch.equal(images[r], torch.stack([s["images"][r] for s in samples]))
    assert images[32].min() >= -1 and images[32].max() <= 1
    assert torch.equal(torch.cat(list(split_batches(synthetic_shards, "val", 64, batch_size=4))), images[64])


def test_read_split_reads_labels_alone_and_names_a_missing_resolution(synthetic_shards, tmp_path):
    labels, images = read_split(synthetic_shards, "train", [32])
    assert len(labels) == 12 and images == {}
    with pytest.raises(ValueError, match="asked for"):
        read_split(synthetic_shards, "train", [512])
    with pytest.raises(FileNotFoundError):
        read_split(tmp_path / "none", "train", [32])

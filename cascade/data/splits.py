"""A shard folder's train / val split read whole, or batch by batch: the one reader of every consumer that needs
a split's real images (evaluation's sample lists, CAS, memorisation, reference statistics, the quality judge).

Images are float B×3×R×R in [-1, 1], as `cascade.data.loader.iterate_split` decodes them from the shards'
uint8 PNGs (exact: every value lies on the uint8 grid); labels are class indices (long). Errors are those of
`iterate_split`: FileNotFoundError for a missing folder, split or shard, ValueError for a resolution the shards
lack. Unreadable images are skipped (with a RuntimeWarning each); `Split.skipped` says how many of the images
dataset.json lists could not be read, so that a consumer can report a shrunken reference or refuse it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cascade.data.loader import iterate_split
from cascade.data.shard_folder import read_dataset_info

READ_BATCH = 64  # images decoded per batch while reading a split


@dataclass(frozen=True)
class Split:
    """Every readable image of a split: labels N (long) and {resolution: N×3×R×R float in [-1, 1]}; unpacks as
    ``labels, images``. expected: the split's image count in dataset.json (None for a folder without one)."""

    labels: torch.Tensor
    images: dict[int, torch.Tensor]
    expected: int | None = None

    def __iter__(self) -> Iterator:
        return iter((self.labels, self.images))

    @property
    def read(self) -> int:
        """Images read (≥ 0)."""
        return len(self.labels)

    @property
    def skipped(self) -> int:
        """Images dataset.json lists that could not be read (unreadable shards or samples); 0 when unknown."""
        return 0 if self.expected is None else max(self.expected - self.read, 0)


def split_batches(root: str | Path, split: str, resolution: int, batch_size: int = READ_BATCH
                  ) -> Iterator[torch.Tensor]:
    """The split's images at `resolution`, B×3×R×R float in [-1, 1] per batch, in shard order (the last batch
    partial): an image source that never holds the whole split."""
    return (batch["images"][resolution] for batch in iterate_split(root, split, [resolution], batch_size=batch_size))


def read_split(root: str | Path, split: str, resolutions: Sequence[int], keep: Sequence[int] = ()) -> Split:
    """The labels of every image of a split (decoding `resolutions`, which must exist in the shards), the
    images at the resolutions in `keep` (those absent when the split has no readable image) and how many images
    were read and skipped (`Split.read`, `Split.skipped`)."""
    labels: list[torch.Tensor] = []
    images: dict[int, list[torch.Tensor]] = {r: [] for r in keep}
    for batch in iterate_split(root, split, sorted(set(resolutions) | set(keep)), batch_size=READ_BATCH):
        labels.append(batch["y"])
        for r in keep:
            images[r].append(batch["images"][r])
    empty = torch.empty(0, dtype=torch.long)
    expected = None
    if Path(root).is_dir():
        expected = int(read_dataset_info(root)["counts"].get(split, {}).get("total", 0))
    return Split(torch.cat(labels) if labels else empty,
                 {r: torch.cat(parts) for r, parts in images.items() if parts}, expected)

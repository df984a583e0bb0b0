"""`DataConfig`: where a run's shards are and how they are read (the `data` section of a run's settings).

No torch import here: the command line validates its configuration before loading the heavy libraries.
"""

from __future__ import annotations

from dataclasses import dataclass

from cascade.checks import check_num_workers, coerce_fields, is_auto_or_bool


@dataclass(frozen=True)
class DataConfig:
    """Where the shards are and how they are read; validated here, trusted by the loader.

    Raises ValueError (one line naming the setting) for an empty root, a num_workers that is neither auto nor
    an integer ≥ 0, a shuffle_buffer < 1 or an hflip that is neither auto, true nor false.
    """

    root: str  # required: the shard folder written by tools/make_shards.py
    # loader worker processes per training process, or auto (`cascade.data.workers.resolve_num_workers`): on CPU
    # the cores the torch threads leave free, at most 4 (measured: docs/results/2026-12-02.md); with an
    # accelerator all cores but one, at most 8
    num_workers: int | str = "auto"
    shuffle_buffer: int = 1000  # samples in the shuffle buffer
    # random horizontal flips of training images: auto follows the shards' dataset.json "hflip" (false for digits,
    # whose mirror images are other shapes; true for photographs and for shards that do not say)
    hflip: str | bool = "auto"

    def __post_init__(self) -> None:
        coerce_fields(self, "data")
        if not self.root:
            raise ValueError("data.root is required: the shard folder written by tools/make_shards.py")
        check_num_workers(self.num_workers)
        if self.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer must be >= 1 (1 disables shuffling), got {self.shuffle_buffer}")
        if not is_auto_or_bool(self.hflip):
            raise ValueError(f"data.hflip must be auto, true or false, got {self.hflip!r}")

"""Sample lists of an evaluation: which class every generated sample has, which process samples it, and
for teacher-forced SR stages its real low-resolution input.

The main list (`load_eval_data`) follows the val split: sample i has the class of val image i mod N and, in
teacher forcing, that image's low-resolution version as its input. The CAS lists are built by
`cascade.evaluation.training_data_metrics.CASData.sample_list`. Images are float B×3×R×R in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cascade.checks import is_int_at_least
from cascade.data.shard_folder import read_dataset_info
from cascade.data.splits import read_split
from cascade.errors import plural
from cascade.pipeline.cascade_pipeline import CascadeConfigError, CascadePipeline

TEACHER_FORCED, CASCADED = "teacher-forced", "cascaded"
MODES = (TEACHER_FORCED, CASCADED)
SPLIT = "val"  # the real images the metrics compare against (never trained on)
MIN_READABLE_VAL = 0.5  # below this share of readable val images an evaluation refuses (--allow-damaged-val)


def check_int(what: str, value: Any, low: int) -> int:
    """``value`` when it is an integer >= low; else CascadeConfigError naming `what`."""
    if not is_int_at_least(value, low):
        raise CascadeConfigError(f"{what} must be an integer >= {low}, got {value!r}")
    return value


def process_slice(num_samples: int, batch_size: int, rank: int, world_size: int) -> range:
    """This process's contiguous run of whole batches of the sample list (possibly empty)."""
    num_batches = -(-num_samples // batch_size)
    first, last = rank * num_batches // world_size, (rank + 1) * num_batches // world_size
    return range(min(first * batch_size, num_samples), min(last * batch_size, num_samples))


@dataclass
class EvalData:
    """A sample list: the class of every sample and, for this process's samples, the real images at the
    resolutions SR stages take as input (teacher forcing)."""

    root: Path
    labels: torch.Tensor  # num_samples: class of each sample
    num_val: int  # val images read (the real side of the metrics)
    samples: range  # this process's samples
    low_res: dict[int, torch.Tensor] = field(default_factory=dict)  # res -> len(samples)×3×res×res in [-1, 1]
    val_skipped: int = 0  # val images dataset.json lists that could not be read

    @property
    def val_images(self) -> dict[str, int]:
        """{"read": N, "skipped": M}: the val images behind the metrics, as results record them."""
        return {"read": self.num_val, "skipped": self.val_skipped}

    @property
    def num_samples(self) -> int:
        return len(self.labels)


def check_data(root: str | Path, pipeline: CascadePipeline, low_resolutions: Sequence[int] = ()) -> dict:
    """The dataset info of `root`, checked against the pipeline (classes, resolutions); errors name the fix."""
    try:
        info = read_dataset_info(Path(root))
    except (FileNotFoundError, ValueError) as err:
        raise CascadeConfigError(f"data: {err}; pass a shard folder with a val split (--data DIR)") from None
    base = pipeline.stages[0]
    if len(info["class_names"]) != base.config.num_classes:
        raise CascadeConfigError(
            f"data: {root} has {plural(len(info['class_names']), 'class', 'classes')} but {base.name} was trained "
            f"with {base.config.num_classes}; evaluate on the data the cascade was trained on"
        )
    needed = sorted({s.config.resolution for s in pipeline.stages} | set(low_resolutions))
    lacking = [r for r in needed if r not in info["resolutions"]]
    if lacking:
        raise CascadeConfigError(f"data: {root} has resolutions {sorted(info['resolutions'])} but the stages "
                                 f"need {needed}; rewrite the shards with --max-res {max(needed)}")
    return info


def load_eval_data(root: str | Path, pipeline: CascadePipeline, *, num_samples: int | None, batch_size: int,
                   rank: int = 0, world_size: int = 1, low_resolutions: Sequence[int] = (),
                   allow_damaged_val: bool = False) -> EvalData:
    """The main sample list: sample i has the class of val image i mod N (N readable val images), so generated
    classes follow the held-out distribution, and teacher-forced SR stages take that image's low-resolution
    version. num_samples None: one sample per val image. Raises CascadeConfigError (one line naming the data
    folder and the fix) for bad data, and when fewer than `MIN_READABLE_VAL` of the val images dataset.json
    lists are readable unless ``allow_damaged_val`` (--allow-damaged-val)."""
    root = Path(root)
    check_data(root, pipeline, low_resolutions)
    try:
        split = read_split(root, SPLIT, sorted(low_resolutions) or [pipeline.stages[0].config.resolution],
                           keep=low_resolutions)
    except (FileNotFoundError, ValueError) as err:  # a message that names its fix keeps it alone
        fix = "" if "make_shards" in str(err) else "; pass a shard folder with a val split (--data DIR)"
        raise CascadeConfigError(f"data: {err}{fix}") from None
    val_labels, images = split
    if not len(val_labels):
        raise CascadeConfigError(f"data: {root} has no readable val images")
    num_val = len(val_labels)
    if split.skipped and num_val < MIN_READABLE_VAL * (num_val + split.skipped) and not allow_damaged_val:
        raise CascadeConfigError(
            f"data: only {num_val} of {plural(num_val + split.skipped, 'val image')} in {root} are readable "
            f"({split.skipped} skipped as corrupt); metrics against so few would mislead: repair or rewrite the "
            "shards (tools/make_shards.py --overwrite), or pass --allow-damaged-val to evaluate against the "
            "readable ones")
    num_samples = num_val if num_samples is None else check_int("num_samples", num_samples, 2)
    samples = process_slice(num_samples, batch_size, rank, world_size)
    order = torch.arange(num_samples) % num_val
    low_res = {r: images[r][order[samples.start : samples.stop]] for r in low_resolutions}
    return EvalData(root, val_labels[order], num_val, samples, low_res, split.skipped)

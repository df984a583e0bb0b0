"""Sample lists of an evaluation and the one loop that generates them: chunk → sample → gather.

A sample list (`EvalData`) gives each sample its class and, for teacher-forced SR stages, its real
low-resolution input. `evaluate`, `sweep` and the CAS sample lists all go through `generate`.

Processes (accelerate): the sample list is cut into batches and every process samples a contiguous run of
whole batches with the pipeline's per-sample seeds (`start_index`), so the union equals the single-process
result; images are gathered with `gather_for_metrics` and only the main process receives them.
Generated images are quantised to uint8 (as saved PNGs would be, like the real images) for the metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cascade.data.loader import iterate_split, read_dataset_info
from cascade.evaluation.metrics import consistency_psnr
from cascade.imageops import float_to_uint8, uint8_to_float
from cascade.pipeline.cascade_pipeline import CascadeConfigError, CascadePipeline

TEACHER_FORCED, CASCADED = "teacher-forced", "cascaded"
MODES = (TEACHER_FORCED, CASCADED)
SPLIT = "val"
CHUNK_BATCHES = 8  # batches sampled per chunk: bounds the float images held at once

Key = tuple[str, str]  # (mode, stage)


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
    num_val: int  # val images (the real side of the metrics)
    samples: range  # this process's samples
    low_res: dict[int, torch.Tensor] = field(default_factory=dict)  # res -> len(samples)×3×res×res

    @property
    def num_samples(self) -> int:
        return len(self.labels)


def check_int(what: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise CascadeConfigError(f"{what} must be an integer >= {low}, got {value!r}")
    return value


def read_split(root: Path, split: str, resolutions: Sequence[int], keep: Sequence[int] = ()
               ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """(labels, {res: uint8 N×res×res×3}) of every image of a split, reading `resolutions` and keeping the
    images of those in `keep` (uint8 is exact: the shards hold uint8)."""
    labels, images = [], {r: [] for r in keep}
    for batch in iterate_split(root, split, sorted(set(resolutions) | set(keep)), batch_size=64):
        labels.append(batch["y"])
        for r in keep:
            images[r].append(float_to_uint8(batch["images"][r]))
    empty = torch.empty(0, dtype=torch.long)
    return (torch.cat(labels) if labels else empty), {r: torch.cat(parts) for r, parts in images.items() if parts}


def check_data(root: str | Path, pipeline: CascadePipeline, low_resolutions: Sequence[int] = ()) -> dict:
    """The dataset info of `root`, checked against the pipeline (classes, resolutions); errors name the fix."""
    try:
        info = read_dataset_info(Path(root))
    except (FileNotFoundError, ValueError) as err:
        raise CascadeConfigError(f"data: {err}; pass a shard folder with a val split (--data DIR)") from None
    base = pipeline.stages[0]
    if len(info["class_names"]) != base.config.num_classes:
        raise CascadeConfigError(
            f"data: {root} has {len(info['class_names'])} classes but {base.name} was trained with "
            f"{base.config.num_classes}; evaluate on the data the cascade was trained on"
        )
    needed = sorted({s.config.resolution for s in pipeline.stages} | set(low_resolutions))
    lacking = [r for r in needed if r not in info["resolutions"]]
    if lacking:
        raise CascadeConfigError(f"data: {root} has resolutions {sorted(info['resolutions'])} but the stages "
                                 f"need {needed}; rewrite the shards with --max-res {max(needed)}")
    return info


def load_eval_data(root: str | Path, pipeline: CascadePipeline, *, num_samples: int | None, batch_size: int,
                   rank: int = 0, world_size: int = 1, low_resolutions: Sequence[int] = ()) -> EvalData:
    """The main sample list: sample i has the class of val image i mod N (N val images), so generated classes
    follow the held-out distribution, and teacher-forced SR stages take that image's low-resolution version.
    num_samples None: one sample per val image. Errors name the data folder and the fix."""
    root = Path(root)
    check_data(root, pipeline, low_resolutions)
    try:
        val_labels, images = read_split(root, SPLIT, sorted(low_resolutions) or [pipeline.stages[0].config.resolution],
                                       keep=low_resolutions)
    except (FileNotFoundError, ValueError) as err:
        raise CascadeConfigError(f"data: {err}; pass a shard folder with a val split (--data DIR)") from None
    if not len(val_labels):
        raise CascadeConfigError(f"data: {root} has no readable val images")
    num_val = len(val_labels)
    num_samples = num_val if num_samples is None else check_int("num_samples", num_samples, 2)
    samples = process_slice(num_samples, batch_size, rank, world_size)
    order = torch.arange(num_samples) % num_val
    low_res = {r: uint8_to_float(images[r][order[samples.start : samples.stop]]) for r in low_resolutions}
    return EvalData(root, val_labels[order], num_val, samples, low_res)


# ------------------------------------------------------------------------------------------------------
# Processes


def rank_world(accelerator: Any) -> tuple[int, int]:
    return (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)


def is_main(accelerator: Any) -> bool:
    return accelerator is None or accelerator.is_main_process


def gather(accelerator: Any, part: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate every process's tensors in process order (= sample order: slices are contiguous)."""
    if accelerator is None or accelerator.num_processes == 1:
        return part
    parts = accelerator.gather_for_metrics([part], use_gather_object=True)
    return {key: torch.cat([p[key] for p in parts]) for key in part}


def broadcast(accelerator: Any, value: Any) -> Any:
    """The main process's value on every process."""
    if accelerator is None or accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def chunks(samples: range, batch_size: int) -> list[range]:
    """Batch-aligned chunks of a process's samples (every sampled batch starts at a multiple of batch_size)."""
    size = batch_size * CHUNK_BATCHES
    return [range(s, min(s + size, samples.stop)) for s in range(samples.start, samples.stop, size)]


# ------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class Generated:
    """images: {(mode, stage): uint8 N×R×R×3 of every sample} and psnr: {(mode, stage): N consistency PSNR of
    SR outputs against their inputs}, on the main process (empty on the others); kept: {(mode, stage): this
    process's float outputs} for the keys asked to keep (inputs of a next stage)."""

    images: dict[Key, torch.Tensor]
    psnr: dict[Key, torch.Tensor]
    kept: dict[Key, torch.Tensor]


# sample_chunk(chunk, local) yields ((mode, stage), float images B×3×R×R, their input x_low or None) for the
# samples `chunk` of the list (`local`: the same samples as a slice of this process's part).
SampleChunk = Callable[[range, slice], Iterable[tuple[Key, torch.Tensor, torch.Tensor | None]]]


def generate(pipeline: CascadePipeline, data: EvalData, sample_chunk: SampleChunk, keys: Mapping[Key, bool], *,
             batch_size: int, accelerator: Any = None, progress: bool = False, desc: str = "sampling",
             keep: Sequence[Key] = ()) -> Generated:
    """Run `sample_chunk` over this process's chunks of `data`, collect the outputs of `keys` ({(mode, stage):
    with consistency PSNR}) as uint8, and gather them on the main process."""
    resolution = {s.name: s.config.resolution for s in pipeline.stages}
    parts: dict[str, list[torch.Tensor]] = {}
    kept: dict[Key, list[torch.Tensor]] = {k: [] for k in keep}
    rank, _ = rank_world(accelerator)
    with tqdm(total=len(data.samples) * len(keys), desc=f"{desc} (process {rank})", disable=not progress,
              unit="img") as bar:
        for chunk in chunks(data.samples, batch_size):
            local = slice(chunk.start - data.samples.start, chunk.stop - data.samples.start)
            for key, images, x_low in sample_chunk(chunk, local):
                if key in kept:
                    kept[key].append(images)
                if key not in keys:
                    continue
                parts.setdefault(f"{key[0]}/{key[1]}/images", []).append(float_to_uint8(images))
                if keys[key]:  # the output against the very input it was given
                    parts.setdefault(f"{key[0]}/{key[1]}/psnr", []).append(consistency_psnr(images, x_low)[0].float())
                bar.update(len(chunk))
    expected = {}
    for (mode, stage), with_psnr in keys.items():
        r = resolution[stage]
        expected[f"{mode}/{stage}/images"] = ((0, r, r, 3), torch.uint8)
        if with_psnr:
            expected[f"{mode}/{stage}/psnr"] = ((0,), torch.float32)
    local_parts = {k: torch.cat(parts[k]) if k in parts else torch.empty(shape, dtype=dtype)
                   for k, (shape, dtype) in expected.items()}  # empty where this process had no samples
    gathered = gather(accelerator, local_parts)
    kept_out = {k: torch.cat(v) if v else torch.empty(0) for k, v in kept.items()}
    if not is_main(accelerator):
        return Generated({}, {}, kept_out)
    images = {k: gathered[f"{k[0]}/{k[1]}/images"] for k in keys}
    psnr = {k: gathered[f"{k[0]}/{k[1]}/psnr"] for k, with_psnr in keys.items() if with_psnr}
    return Generated(images, psnr, kept_out)


def chain_sampler(pipeline: CascadePipeline, data: EvalData, settings: Mapping[str, Any], modes: Sequence[str], *,
                  seed: int, batch_size: int, skip: Iterable[Key] = ()) -> SampleChunk:
    """The sample_chunk of a whole chain: cascaded (`CascadePipeline.run`, every stage's output in turn) and
    teacher-forced (each stage alone on the real low-resolution inputs of `data`), skipping `skip` keys'
    sampling where possible (the teacher-forced base stage when the cascaded one holds the same samples)."""
    skip = set(skip)
    names = [s.name for s in pipeline.stages]

    def sample_chunk(chunk: range, local: slice) -> Iterator[tuple[Key, torch.Tensor, torch.Tensor | None]]:
        labels = data.labels[chunk.start : chunk.stop]
        if CASCADED in modes:
            plan = pipeline.validate(labels.tolist(), settings, batch_size=batch_size, seed=seed)
            out = pipeline.run(plan, start_index=chunk.start, progress=False)
            for i, name in enumerate(names):
                if name in out:
                    prev = out.get(names[i - 1]) if i > 0 else None
                    yield (CASCADED, name), out[name], prev
        if TEACHER_FORCED in modes:
            for i, stage in enumerate(pipeline.stages):
                if (TEACHER_FORCED, stage.name) in skip:
                    continue
                x_low = data.low_res[stage.config.low_resolution][local] if i > 0 else None
                images = pipeline.sample_stage(stage.name, labels, x_low, settings[stage.name], seed=seed,
                                               batch_size=batch_size, start_index=chunk.start)
                yield (TEACHER_FORCED, stage.name), images, x_low

    return sample_chunk

"""The one loop that generates an evaluation's images: chunk → sample → gather.

`evaluate`, `sweep` and the CAS sample lists all go through `generate`, each with a `SampleChunk` that samples
one chunk of a sample list (`cascade.evaluation.sample_lists.EvalData`): `chain_sampler` for a whole chain
from one validated `SamplingPlan` (cut into chunks by `plan_for`, never validated again), or the sweep's
one-stage sampler.

Processes (accelerate): the sample list is cut into batches and every process samples a contiguous run of
whole batches with the pipeline's per-sample seeds (`start_index`), so the union equals the single-process
result; images are gathered with `gather_for_metrics` and only the main process receives them.

Images: generated images are quantised once, here, to the uint8 grid (as saved PNGs would be, like the real
images of the shards), travel between processes as uint8 and reach the metrics as float B×3×R×R in [-1, 1];
every metric below takes them so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from cascade.evaluation.metrics import consistency_psnr
from cascade.evaluation.sample_lists import CASCADED, TEACHER_FORCED, EvalData
from cascade.imageops import float_to_uint8, uint8_to_float
from cascade.pipeline.cascade_pipeline import CascadePipeline
from cascade.pipeline.plan import SamplingPlan

CHUNK_BATCHES = 8  # batches sampled per chunk: bounds the float images held at once

Key = tuple[str, str]  # (mode, stage)


def quantise(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] rounded to the uint8 grid (clamped), as saving them as PNGs would."""
    return uint8_to_float(float_to_uint8(images))


def plan_for(plan: SamplingPlan, labels: torch.Tensor) -> SamplingPlan:
    """The validated `plan` for the samples `labels` (one sample each, classes among those it was validated
    for): its stage plans (settings, timesteps, truncation) are shared, nothing is checked again."""
    return dataclasses.replace(plan, classes=labels.tolist(), num_per_class=1)


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
    """images: {(mode, stage): float N×3×R×R in [-1, 1] (quantised) of every sample} and psnr: {(mode, stage):
    N consistency PSNR of SR outputs against their inputs}, on the main process (empty on the others); kept:
    {(mode, stage): this process's float outputs, unquantised} for the keys asked to keep (inputs of a next
    stage)."""

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
    with consistency PSNR}) and gather them on the main process (see the module docstring for the dtype)."""
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
    images = {k: uint8_to_float(gathered[f"{k[0]}/{k[1]}/images"]) for k in keys}
    psnr = {k: gathered[f"{k[0]}/{k[1]}/psnr"] for k, with_psnr in keys.items() if with_psnr}
    return Generated(images, psnr, kept_out)


def chain_sampler(pipeline: CascadePipeline, data: EvalData, plan: SamplingPlan, modes: Sequence[str], *,
                  skip: Iterable[Key] = ()) -> SampleChunk:
    """The sample_chunk of a whole chain from one validated `plan` (its seed and batch size): cascaded
    (`CascadePipeline.run` of the plan's chunk, every stage's output in turn) and teacher-forced (each stage
    alone at its planned settings on the real low-resolution inputs of `data`), skipping `skip` keys'
    sampling where possible (the teacher-forced base stage when the cascaded one holds the same samples)."""
    skip = set(skip)
    names = [s.name for s in pipeline.stages]
    alone = {}  # teacher-forced: each stage alone at its planned settings, validated once here
    if TEACHER_FORCED in modes:
        classes = sorted(set(data.labels.tolist()))
        alone = {sp.name: pipeline.plan_alone(sp.name, classes, sp.settings, batch_size=plan.batch_size,
                                              seed=plan.seed)
                 for sp in plan.stages if (TEACHER_FORCED, sp.name) not in skip}

    def sample_chunk(chunk: range, local: slice) -> Iterator[tuple[Key, torch.Tensor, torch.Tensor | None]]:
        labels = data.labels[chunk.start : chunk.stop]
        if CASCADED in modes:
            out = pipeline.run(plan_for(plan, labels), start_index=chunk.start, progress=False)
            for i, name in enumerate(names):
                if name in out:
                    prev = out.get(names[i - 1]) if i > 0 else None
                    yield (CASCADED, name), out[name], prev
        if TEACHER_FORCED in modes:
            for i, stage in enumerate(pipeline.stages):
                if (TEACHER_FORCED, stage.name) in skip:
                    continue
                x_low = data.low_res[stage.config.low_resolution][local] if i > 0 else None
                images = pipeline.run_stage(plan_for(alone[stage.name], labels), stage.name, x_low,
                                            start_index=chunk.start)
                yield (TEACHER_FORCED, stage.name), images, x_low

    return sample_chunk

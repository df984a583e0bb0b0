"""How many images a stage should sample at once on this machine (`tools/bench.py --chunks`).

`measure_chunks` times the cascade's own stage sampler (`cascade.pipeline.stage_sampling.sample_stage`: guided DDIM
in the pipeline's precision) for each chunk size and memory layout, on a stage's network with fresh weights, and
reports images per second per sampling step; `format_chunks` prints them with the best per stage. The sampling
default (`cascade.pipeline.stage_sampling.default_chunk`) is chosen from these figures (docs/results).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from cascade.config import SamplingSettings, StageConfig, StageKind
from cascade.pipeline.stage_sampling import default_chunk, sample_stage

__all__ = ["format_chunks", "measure_chunks"]


def measure_chunks(configs: dict[str, StageConfig], sizes: tuple[int, ...], *, device: str = "cpu",
                   precision: str = "fp32", steps: int = 2, repeats: int = 2,
                   progress: Callable[[str], None] = print) -> list[dict]:
    """For every stage, layout (contiguous, channels_last) and chunk size: images per second per guided DDIM step
    (w = 1, ``steps`` steps, median of ``repeats``), sampling one chunk with `sample_stage`."""
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"chunk sizes must be positive integers, got {sizes}")
    from cascade.nets.build import build_diffusion, build_model

    rows = []
    for name, cfg in configs.items():
        model = build_model(cfg).to(device).eval()
        diffusion = build_diffusion(cfg)
        settings = SamplingSettings(sampler="ddim", steps=steps, w=1.0,
                                    aug_level=0.1 if cfg.kind is StageKind.sr else None)
        for layout in ("contiguous", "channels_last"):
            model.to(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
            for size in sizes:
                labels = torch.arange(size) % cfg.num_classes
                x_low = (torch.rand(size, 3, cfg.low_resolution, cfg.low_resolution) * 2 - 1
                         if cfg.kind is StageKind.sr else None)

                def run(model=model, diffusion=diffusion, cfg=cfg, settings=settings, labels=labels, x_low=x_low,
                        size=size):
                    sample_stage(model, diffusion, cfg, settings, labels, x_low, batch_size=size, device=device,
                                 precision=precision)

                run()  # warm-up
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    run()
                    times.append(time.perf_counter() - start)
                rate = size * steps / statistics.median(times)
                rows.append({"stage": name, "resolution": cfg.resolution, "layout": layout, "chunk": size,
                             "images_per_s_per_step": rate})
                progress(f"  {name} {layout} chunk {size}: {rate:.1f} images/s per step")
    return rows


def format_chunks(rows: list[dict], device: str = "cpu") -> str:
    """Images/s per sampling step by stage, layout and chunk size; the best per stage and the current default."""
    lines = []
    for name in dict.fromkeys(r["stage"] for r in rows):
        mine = [r for r in rows if r["stage"] == name]
        sizes = sorted({r["chunk"] for r in mine})
        lines.append(f"{name} ({mine[0]['resolution']}²) images/s per step by chunk size:")
        lines.append(f"  {'layout':14s}" + "".join(f"{s:>8d}" for s in sizes))
        for layout in ("contiguous", "channels_last"):
            rate = {r["chunk"]: r["images_per_s_per_step"] for r in mine if r["layout"] == layout}
            lines.append(f"  {layout:14s}" + "".join(f"{rate[s]:8.1f}" for s in sizes))
        best = max(mine, key=lambda r: r["images_per_s_per_step"])
        lines.append(f"  best: {best['layout']} chunk {best['chunk']} ({best['images_per_s_per_step']:.1f}); default "
                     f"chunk here: {default_chunk(mine[0]['resolution'], torch.device(device))}")
    return "\n".join(lines)

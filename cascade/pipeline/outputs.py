"""Writing a cascade run to disk: final PNGs, every stage's PNGs, a labelled grid and the run's settings.json."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from cascade.imageops import float_to_uint8
from cascade.pipeline.cascade_pipeline import SamplingPlan


def class_label(label: int, class_names: Sequence[str] | None = None) -> str:
    """The class by name when known, else its index."""
    return class_names[label] if class_names and label < len(class_names) else str(label)


def sample_stem(label: int, index: int, class_names: Sequence[str] | None = None) -> str:
    """File name stem `<class>_<index>`."""
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', class_label(label, class_names))}_{index}"


def labelled_grid(outputs: Mapping[str, torch.Tensor], plan: SamplingPlan,
                  class_names: Sequence[str] | None = None) -> Image.Image:
    """One row per sample (grouped by class), one column per stage, each shown at the final size."""
    cell = plan.stages[-1].resolution
    font = ImageFont.load_default()
    labels, indices = plan.labels.tolist(), plan.indices
    row_labels = [f"{class_label(c, class_names)} #{i}" for c, i in zip(labels, indices)]
    margin, header = 8 + int(max(font.getlength(t) for t in row_labels)), 20
    grid = Image.new("RGB", (margin + cell * len(plan.stages), header + cell * len(labels)), "white")
    draw = ImageDraw.Draw(grid)
    for j, sp in enumerate(plan.stages):
        noisy = ", noisy z_k: truncated" if sp.stop_at_index is not None else ""  # handed over, not a clean image
        draw.text((margin + j * cell + 4, 4), f"{sp.name} ({sp.resolution}x{sp.resolution}{noisy})", fill="black",
                  font=font)
        images = float_to_uint8(outputs[sp.name]).numpy()
        for i, image in enumerate(images):
            tile = Image.fromarray(image).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (margin + j * cell, header + i * cell))
    for i, text in enumerate(row_labels):
        draw.text((4, header + i * cell + 4), text, fill="black", font=font)
    return grid


def write_outputs(outputs: Mapping[str, torch.Tensor], plan: SamplingPlan, out_dir: str | Path, *,
                  record: Mapping[str, Any], class_names: Sequence[str] | None = None) -> Path:
    """Final PNGs `<out>/<class>_<index>.png`, every stage in `<out>/<stage>/`, `grid.png`, `settings.json`.

    A stage that hands over z_k (truncated conditioning augmentation) writes that noisy z_k: its grid column
    says so, and settings.json gives its `stop_at_index`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stems = [sample_stem(c, i, class_names) for c, i in zip(plan.labels.tolist(), plan.indices)]
    final = plan.stages[-1].name
    for sp in plan.stages:
        (out / sp.name).mkdir(exist_ok=True)
        for stem, image in zip(stems, float_to_uint8(outputs[sp.name]).numpy()):
            Image.fromarray(image).save(out / sp.name / f"{stem}.png")
            if sp.name == final:
                Image.fromarray(image).save(out / f"{stem}.png")
    labelled_grid(outputs, plan, class_names).save(out / "grid.png")
    tmp = out / ".settings.json.tmp"  # written last and atomically: its presence marks a complete folder
    tmp.write_text(json.dumps(dict(record), indent=2, sort_keys=True))
    tmp.replace(out / "settings.json")
    return out

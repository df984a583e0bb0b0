"""Writing a cascade run to disk: final PNGs, every stage's PNGs, a labelled grid and the run's settings.json,
listed in the folder's manifest, by which a later run recognises (and replaces) them."""

from __future__ import annotations

import dataclasses
import json
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from cascade.atomic import write_atomic, write_guard
from cascade.imageops import float_to_uint8
from cascade.locks import LOCK_NAME
from cascade.pipeline.cascade_pipeline import SamplingPlan

MANIFEST = ".outputs.json"  # the files a run writes, listed before the first is written
NAME_CHARS = 40  # at most this many characters of a class name in a file name (4 bytes each at most in UTF-8)


class OutputFolderNotEmpty(ValueError):
    """--out holds files that no sampling run wrote (a bad input: exit code 2 at the tools' edge)."""


@dataclasses.dataclass(frozen=True)
class WrittenOutputs:
    """What `write_outputs` wrote: the folder, the final-stage PNGs found there afterwards, every file."""

    folder: Path
    final_images: int
    files: tuple[str, ...]


def class_label(label: int, class_names: Sequence[str] | None = None) -> str:
    """The class by name when known, else its index."""
    return class_names[label] if class_names and label < len(class_names) else str(label)


def file_safe(text: str) -> str:
    """``text`` for a file name: Unicode letters and digits, `_`, `.` and `-` kept (NFC-normalised), every run
    of other characters one `-`, no leading or trailing `-` or `.`, at most NAME_CHARS characters. Not
    one-to-one by itself: callers add what tells names apart (the class index)."""
    kept = "".join(ch if ch.isalnum() or ch in "_.-" else " " for ch in unicodedata.normalize("NFC", text))
    return "-".join(kept.split())[:NAME_CHARS].strip("-.")


def sample_stem(label: int, index: int, class_names: Sequence[str] | None = None) -> str:
    """File name stem `<label>-<class name>_<index>` (`<label>_<index>` without a name): one-to-one, since
    the class index leads, whatever the names (Unicode, or equal once made safe for a file name)."""
    name = file_safe(class_names[label]) if class_names and label < len(class_names) else ""
    return f"{label}-{name}_{index}" if name else f"{label}_{index}"


def check_out_dir(out_dir: str | Path, *, overwrite: bool = False, option: str = "--out") -> None:
    """Ready ``out_dir`` before any sampling: refused when it holds files that no sampling run wrote (no
    manifest; OutputFolderNotEmpty naming ``option``) unless ``overwrite``; its settings.json, which marks a
    complete folder, is removed (this run writes it last). An earlier run's images stay until `claim_out_dir`
    replaces them with complete new ones, so a run that fails or is interrupted loses none of them."""
    out = Path(out_dir)
    if not out.is_dir():
        return
    others = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
    if others and not overwrite and not (out / MANIFEST).exists():
        raise OutputFolderNotEmpty(
            f"{option} {out} holds files that no sampling run wrote ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}); choose an empty or new {option}, or pass --overwrite to "
            f"write beside them")
    (out / "settings.json").unlink(missing_ok=True)


def claim_out_dir(out_dir: str | Path, *, overwrite: bool = False, option: str = "--out") -> list[str]:
    """Make ``out_dir`` ready for a new run's outputs (call it holding the folder's lock): the files an earlier
    run wrote there (its manifest) are removed, with their emptied stage folders; the names removed are
    returned. A folder holding other files is refused (`check_out_dir`) unless ``overwrite``, which writes
    beside them (same-named files are replaced). settings.json, which marks a complete folder, is removed
    either way."""
    check_out_dir(out_dir, overwrite=overwrite, option=option)
    out = Path(out_dir)
    if not out.is_dir():
        return []
    manifest = out / MANIFEST
    if not manifest.exists():
        return []
    try:
        listed = json.loads(manifest.read_text()).get("files", [])
    except (ValueError, AttributeError):
        listed = []
    removed = []
    for name in [*listed, "settings.json", ".settings.json.tmp"]:
        path = out / name
        if ".." not in Path(name).parts and not Path(name).is_absolute() and path.is_file():
            path.unlink()
            removed.append(name)
    for folder in {(out / name).parent for name in listed} - {out}:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    manifest.unlink()
    return removed


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
                  record: Mapping[str, Any], class_names: Sequence[str] | None = None) -> WrittenOutputs:
    """Final PNGs `<out>/<stem>.png` (stems: `sample_stem`), every stage in `<out>/<stage>/`, `grid.png`,
    `settings.json`; the earlier run's outputs there are replaced (`claim_out_dir`, its manifest), and the
    new manifest is written before the first image. RuntimeError if two samples would share a file name.

    A stage that hands over z_k (truncated conditioning augmentation) writes that noisy z_k: its grid column
    says so, and settings.json gives its `stop_at_index`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    claim_out_dir(out, overwrite=True)
    stems = [sample_stem(c, i, class_names) for c, i in zip(plan.labels.tolist(), plan.indices)]
    if len(set(stems)) != len(stems):
        raise RuntimeError(f"samples would share file names ({len(stems) - len(set(stems))} collisions); not written")
    final = plan.stages[-1].name
    files = [f"{sp.name}/{stem}.png" for sp in plan.stages for stem in stems] + [f"{s}.png" for s in stems]
    write_atomic(out / MANIFEST, json.dumps({"files": [*files, "grid.png", "settings.json"]}, indent=1))
    for sp in plan.stages:
        (out / sp.name).mkdir(exist_ok=True)
        for stem, image in zip(stems, float_to_uint8(outputs[sp.name]).numpy()):
            _save_png(Image.fromarray(image), out / sp.name / f"{stem}.png")
            if sp.name == final:
                _save_png(Image.fromarray(image), out / f"{stem}.png")
    _save_png(labelled_grid(outputs, plan, class_names), out / "grid.png")
    # written last and atomically: its presence marks a complete folder
    write_atomic(out / "settings.json", json.dumps(dict(record), indent=2, sort_keys=True))
    return WrittenOutputs(out, sum((out / f"{stem}.png").is_file() for stem in set(stems)), tuple(files))


def _save_png(image: Image.Image, path: Path) -> None:
    """``image`` as a PNG at ``path``; a failed write (a full disk: OSError naming ``path``) removes the partial
    file."""
    with write_guard(path, path):
        image.save(path)

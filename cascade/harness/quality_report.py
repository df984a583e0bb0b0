"""The quality benchmark's report: one Markdown table (machine and settings first, reference rows first) and
the same rows as JSON (`quality.md`, `quality.json`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cascade.config import StageKind
from cascade.evaluation.report import write_json
from cascade.harness.quality_bench import BenchResult

REPORT_FORMAT_VERSION = 1

BASE_COLUMNS = ("recipe", "sampler", "w", "train steps", "train s", "NFE/img", "sample s", "class acc",
                "FD [judge]", "KID [judge]", "precision / recall", "CAS (real)")
SR_COLUMNS = ("recipe", "sampler", "w", "s", "train steps", "train s", "NFE/img", "sample s", "consistency PSNR (dB)",
              "PSNR to real (dB)", "detail ratio")


def _cells(row: Mapping[str, Any], kind: str) -> list[str]:
    def num(key: str, fmt: str) -> str:
        value = row.get(key)
        return "–" if value is None else format(value, fmt)

    common = [row["recipe"], row["sampler"], num("w", "g")]
    if kind is StageKind.sr:
        common.append(num("aug_level", "g"))
    common += [num("train_steps", "d"), num("train_seconds", ".0f"), num("nfe_per_image", "g"),
               num("sample_seconds", ".1f")]
    if kind is StageKind.base:
        acc = row.get("class_accuracy")
        kid = "–" if row.get("kid_mean") is None else f"{row['kid_mean']:.4f} ± {row['kid_std']:.4f}"
        pr = ("–" if row.get("precision") is None else f"{row['precision']:.2f} / {row['recall']:.2f}")
        cas = ("–" if row.get("cas_top1") is None else f"{100 * row['cas_top1']:.0f}% ({100 * row['cas_real_top1']:.0f}%)")
        return common + ["–" if acc is None else f"{100 * acc:.1f}%", num("fd", ".2f"), kid, pr, cas]
    return common + [num("consistency_psnr", ".2f"), num("psnr", ".2f"), num("detail_ratio", ".2f")]


def markdown(result: BenchResult) -> str:
    """The report: the machine and settings, then one table (reference rows first)."""
    m, kind = result.meta, result.kind
    machine = m["machine"]
    budget = (f"{m['budget']['minutes']:g} minutes of wall-clock training per recipe" if "minutes" in m["budget"]
              else f"{m['budget']['steps']} training steps per recipe")
    load = (f"; load average {machine.get('load_average_1min_at_start', '?')} at start, "
            f"{machine.get('load_average_1min_at_end', '?')} at end")
    lines = [f"# Quality benchmark: {m['stage']} ({m['size']}) on {m['data']}", "",
             (f"- machine: {machine['cpu']} ({machine['cpu_count']} cores, {machine['torch_threads']} torch threads), "
             f"bf16 native: {'yes' if machine['cpu_bf16_native'] else 'no'}, torch {machine['torch']}"
             + (f", GPU {machine['gpu']}" if "gpu" in machine else "") + load),
             f"- budget: {budget}; common trainer settings {m['trainer_common']}",
             (f"- data: {m['dataset']['counts']['train']} train / {m['dataset']['counts']['val']} val images, "
             f"{len(m['dataset']['class_names'])} classes; samples: {m['samples']['per_class']} per class "
             f"({m['samples']['num_images']} images), seed {m['samples']['seed']}")]
    for name, recipe in m["recipes"].items():
        lines.append(f"- recipe `{name}`: {recipe['description']}; overrides {recipe['stage'] or '{}'}"
                     + (f", trainer {recipe['trainer']}" if recipe["trainer"] else ""))
    if m["judge"] is not None:
        j = m["judge"]
        lines.append(f"- judge `{j['name']}`: {j['num_features']}-d penultimate features, {j['settings']['epochs']} "
                     f"epochs on the real train split, {100 * j['val_accuracy']:.1f}% on real val images"
                     + (" (cached)" if j["from_cache"] else f" (trained in {j['train_seconds']:.0f} s)"))
    columns = BASE_COLUMNS if kind is StageKind.base else SR_COLUMNS
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cells(r, kind)) + " |" for r in result.rows]
    if kind is StageKind.base:
        lines += ["", ("Row `real images`: class acc is the judge's accuracy on real val images (the ceiling); FD and KID "
                  "are real train images (as many as the samples) against the val split (the floor). FD and KID are "
                  "in the judge's features, against the real val split; KID is mean ± std over subsets. NFE/img: "
                  "network evaluations per image (a guided step counts 2). Seconds are wall-clock on the machine "
                  "above.")]
    else:
        lines += ["", ("Teacher-forced on real low-resolution val inputs. Row `bicubic`: those inputs upsampled. "
                  "Consistency PSNR: the output downsampled against its input; detail ratio: RMS detail above the "
                  "input size relative to the real images (1 = as much as real, > 1 noise).")]
    return "\n".join(lines) + "\n"


def write_report(result: BenchResult, out: str | Path) -> tuple[Path, Path]:
    """`<out>/quality.md` and `<out>/quality.json` (format_version, meta, rows)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "quality.md", out / "quality.json"
    md.write_text(markdown(result))
    write_json(js, {"format_version": REPORT_FORMAT_VERSION, "meta": result.meta, "rows": result.rows})
    return md, js

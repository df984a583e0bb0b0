"""The quality benchmark's report: one Markdown table (machine and settings first, reference rows first) and
the same rows as JSON (`quality.md`, `quality.json`). With distilled students, the table also says which weights
each row sampled (teacher or student) and the distillation's steps and seconds, and a second table orders each
recipe's rows by network evaluations per image: quality against NFE, teacher beside student."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cascade.config import StageKind
from cascade.evaluation.report import write_json
from cascade.harness.quality_bench import BenchResult
from cascade.training.trainer_config import DistillSettings

REPORT_FORMAT_VERSION = 1

BASE_COLUMNS = ("recipe", "sampler", "w", "train steps", "train s", "NFE/img", "sample s", "class acc",
                "FD [judge]", "KID [judge]", "precision / recall", "CAS (real)")
SR_COLUMNS = ("recipe", "sampler", "w", "s", "train steps", "train s", "NFE/img", "sample s", "consistency PSNR (dB)",
              "PSNR to real (dB)", "detail ratio")
# With distillation: which weights a row sampled, and the distillation's steps and seconds (student rows).
DISTILL_COLUMNS = {"weights": "recipe", "distill steps": "train s", "distill s": "distill steps"}  # column: after
# The NFE table (with distillation): one row per (recipe, weights, sampler setting), by NFE within a recipe.
BASE_NFE_COLUMNS = ("recipe", "weights", "sampler", "w", "NFE/img", "sample s", "class acc", "FD [judge]",
                    "KID [judge]")
SR_NFE_COLUMNS = ("recipe", "weights", "sampler", "w", "s", "NFE/img", "sample s", "consistency PSNR (dB)",
                  "detail ratio")


def table_columns(kind: str, distilled: bool) -> tuple[str, ...]:
    """The main table's columns for a stage of ``kind`` ("base" or "sr"): `BASE_COLUMNS` or `SR_COLUMNS`, with
    `DISTILL_COLUMNS` when ``distilled``."""
    columns = list(BASE_COLUMNS if kind == StageKind.base else SR_COLUMNS)
    if distilled:
        for column, after in DISTILL_COLUMNS.items():
            columns.insert(columns.index(after) + 1, column)
    return tuple(columns)


def _cells(row: Mapping[str, Any], columns: tuple[str, ...]) -> list[str]:
    """``row``'s cell of each column (–: none)."""
    def num(key: str, fmt: str) -> str:
        value = row.get(key)
        return "–" if value is None else format(value, fmt)

    acc = row.get("class_accuracy")
    cells = {
        "recipe": row["recipe"], "weights": row.get("weights", "–"), "sampler": row["sampler"], "w": num("w", "g"),
        "s": num("aug_level", "g"), "train steps": num("train_steps", "d"), "train s": num("train_seconds", ".0f"),
        "distill steps": num("distill_steps", "d"), "distill s": num("distill_seconds", ".0f"),
        "NFE/img": num("nfe_per_image", "g"), "sample s": num("sample_seconds", ".1f"),
        "class acc": "–" if acc is None else f"{100 * acc:.1f}%", "FD [judge]": num("fd", ".2f"),
        "KID [judge]": "–" if row.get("kid_mean") is None else f"{row['kid_mean']:.4f} ± {row['kid_std']:.4f}",
        "precision / recall": "–" if row.get("precision") is None else f"{row['precision']:.2f} / {row['recall']:.2f}",
        "CAS (real)": ("–" if row.get("cas_top1") is None
                       else f"{100 * row['cas_top1']:.0f}% ({100 * row['cas_real_top1']:.0f}%)"),
        "consistency PSNR (dB)": num("consistency_psnr", ".2f"), "PSNR to real (dB)": num("psnr", ".2f"),
        "detail ratio": num("detail_ratio", ".2f"),
    }
    return [cells[c] for c in columns]


def _table(rows: list[Mapping[str, Any]], columns: tuple[str, ...]) -> list[str]:
    return (["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            + ["| " + " | ".join(_cells(r, columns)) + " |" for r in rows])


def nfe_rows(rows: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The NFE table's rows: the reference rows, then each recipe's rows (teacher and student) by network
    evaluations per image, fewest first (ties: teacher first, then the order sampled)."""
    reference = [r for r in rows if r.get("reference")]
    recipes = list(dict.fromkeys(r["recipe"] for r in rows if not r.get("reference")))
    ordered = []
    for recipe in recipes:
        mine = [r for r in rows if not r.get("reference") and r["recipe"] == recipe]
        ordered += sorted(mine, key=lambda r: (r["nfe_per_image"], r.get("weights") != "teacher"))
    return reference + ordered


def distill_method_text(distill: Mapping[str, Any], kind: str) -> str:
    """What the students of a stage of ``kind`` learnt, from the report's ``distill`` settings (`DistillSettings`'
    fields): the method, its steps or levels, the range of w, and the paper it follows."""
    settings = DistillSettings(**{f.name: distill[f.name] for f in dataclasses.fields(DistillSettings)})
    w = f"w ~ U[0, {settings.w_max:g}]"
    if settings.method == "step":
        steps, teacher = settings.steps_for(kind), settings.teacher_steps_for(kind)
        return (f"guided step distillation: {steps} DDIM steps, each reproducing {teacher // steps} guided DDIM steps "
                f"of the teacher, {w}; Salimans & Ho 2022 eq. 8, Meng et al. 2023 §4.2")
    if settings.method == "consistency":
        return (f"guided consistency distillation on {settings.levels} levels, {w}; Luo et al. 2023 'Latent "
                "Consistency Models' §4.2")
    return f"guidance distillation: w as the network's input, the teacher's samplers, {w}; Meng et al. 2023 §4.1"


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
    distill = m.get("distill")
    if distill:
        budget = (f"{distill['budget']['minutes']:g} minutes" if "minutes" in distill["budget"]
                  else f"{distill['budget']['steps']} steps")
        lines.append(f"- distillation: each recipe's final checkpoint (the teacher) distilled for {budget} into a "
                     f"student ({distill_method_text(distill, kind)}), from the teacher's EMA weights, common "
                     f"trainer settings, same data and seed; student samplers {', '.join(distill['student_samplers'])}")
    lines += [""] + _table(result.rows, table_columns(kind, bool(distill)))
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
    if distill:
        lines += ["", ("Weights `teacher`: the recipe's trained stage (train steps / s); `student`: its distillation "
                  "(distill steps / s, after the teacher's training). A student takes w as its network's input: one "
                  "network evaluation per step, where a guided teacher step takes two."),
                  "", "## Quality against network evaluations", "",
                  "Each recipe's teacher and student rows by NFE per image, fewest first."]
        lines += [""] + _table(nfe_rows(result.rows), BASE_NFE_COLUMNS if kind is StageKind.base else SR_NFE_COLUMNS)
    return "\n".join(lines) + "\n"


def write_report(result: BenchResult, out: str | Path) -> tuple[Path, Path]:
    """`<out>/quality.md` and `<out>/quality.json` (format_version, meta, rows)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "quality.md", out / "quality.json"
    md.write_text(markdown(result))
    write_json(js, {"format_version": REPORT_FORMAT_VERSION, "meta": result.meta, "rows": result.rows})
    return md, js

"""Evaluation and sweep results written for people and programs: JSON documents and Markdown reports.

- Evaluation results (`write_report`): a compact table per stage first (the few numbers that matter, each
  with its sample count; KID leads where FID is biased), then the full table (`report_table`).
- Sweeps (`write_sweep`): the table of every setting with the best per stage marked, its plot and the best
  settings as sample_cascade.py flags.
The cells come from `cascade.evaluation.tables`, the figures from `cascade.evaluation.plots`.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from cascade.atomic import write_atomic
from cascade.evaluation.plots import plot_detail_vs_consistency, plot_sweep
from cascade.evaluation.tables import (
    SMALL_SAMPLE_NOTE,
    cas_cell,
    fid_cell,
    kid_cell,
    markdown_table,
    metric_label,
    num,
    report_table,
    summary_table,
    val_split_note,
)

REPORT_FORMAT_VERSION = 2


def json_safe(value: Any) -> Any:
    """A JSON-ready copy: non-finite floats as "inf" / "-inf" / "nan" strings (valid JSON, still readable),
    tensors as lists, mapping keys as strings, tuples as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: str | Path, document: Any) -> Path:
    """`document` (`json_safe`) as indented JSON at `path`, creating its folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(json_safe(document), indent=2, allow_nan=False) + "\n")  # no partial file
    return path


def write_report(results: Mapping, json_path: str | Path, md_path: str | Path, *, meta: Mapping | None = None,
                 plot_path: str | Path | None = None) -> None:
    """Write results as JSON and as Markdown: per stage a compact table (`summary_table`), then the full
    table (rows = stages, columns = metric × mode [× feature net]); plot_path: also the
    `plot_detail_vs_consistency` figure (when an SR stage has both numbers), linked from the Markdown.

    results: {stage: {mode: {"features": {feature_net_name: compute_fid_kid(...) result},
                             "consistency_psnr": float, "class_accuracy": float, "cas": {...}, ...}}}
    meta: run settings (samples, sampler, seed, ...) recorded in both files; its "val_images" read / skipped
    counts put a warning above the tables when val images were skipped (`val_split_note`).
    """
    columns, table = report_table(results)
    json_path, md_path = Path(json_path), Path(md_path)
    write_json(json_path, {"format_version": REPORT_FORMAT_VERSION, "meta": dict(meta or {}), "results": results})
    lines = ["# Evaluation", ""]
    note = val_split_note(meta)
    lines += [note, ""] if note else []
    for stage, by_mode in results.items():
        lines += [f"## {stage}", "", *markdown_table(*summary_table(by_mode)), ""]
    lines += [SMALL_SAMPLE_NOTE, ""]
    if plot_path is not None and plot_detail_vs_consistency(results, plot_path) is not None:
        plot, folder = Path(plot_path).resolve(), md_path.parent.resolve()
        rel = plot.relative_to(folder).as_posix() if plot.is_relative_to(folder) else str(plot)
        lines += [f"![detail ratio against consistency per stage]({rel})", ""]
    lines += ["## Full table", ""]
    lines += markdown_table(["stage", *columns], ([stage] + [row.get(c, "–") for c in columns]
                                                   for stage, row in table.items()))
    lines += [
        "",
        ("FID / KID / IS / precision / recall columns name their feature network in brackets; values from "
         "different feature networks are not comparable. KID and IS are mean ± std over subsets / splits."),
        "",
    ]
    if meta:
        lines += settings_lines(meta)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(md_path, "\n".join(lines))


def settings_lines(meta: Mapping[str, Any]) -> list[str]:
    """The "## Settings" section: `- key: value` per entry; a mapping of texts (such as "features": {name: where
    it comes from}) as `name: text` pairs joined by "; "."""
    def text(value: Any) -> str:
        if isinstance(value, Mapping) and value and all(isinstance(v, str) for v in value.values()):
            return "; ".join(f"{k}: {v}" for k, v in value.items())
        return str(value)

    return ["## Settings", "", *(f"- {key}: {text(value)}" for key, value in meta.items()), ""]


def best_flags(best: Mapping[str, Mapping[str, Any]]) -> str:
    """`--w base32=3,sr64=1 --aug-level sr64=0.1 --guide base32=cfg,sr64=cfg` from best_setting's records, with
    `--guide-ckpt STAGE=PATH` (shell-quoted) for each autoguided stage: the guide is named for every stage, since w
    weighs a different model under each and a checkpoint's own default guide may differ from the one swept."""
    w = ",".join(f"{stage}={r['w']:g}" for stage, r in best.items())
    s = ",".join(f"{stage}={r['aug_level']:g}" for stage, r in best.items() if r.get("aug_level") is not None)
    flags = f"--w {w}" + (f" --aug-level {s}" if s else "")
    if all(r.get("guide") for r in best.values()):
        flags += " --guide " + ",".join(f"{stage}={r['guide']}" for stage, r in best.items())
        auto = [f"{stage}={r['guide_checkpoint']}" for stage, r in best.items() if r["guide"] == "auto"]
        flags += "".join(f" --guide-ckpt {shlex.quote(pair)}" for pair in auto)
    return flags


def sweep_markdown(records: Sequence[Mapping], best: Mapping[str, Mapping], meta: Mapping) -> str:
    """The sweep table (best ★, ranked by meta["rank_metric"]) with the best settings as flags."""
    net, mode = meta["ranked_by"], meta["mode"]
    columns = ["stage", "w", "s", metric_label("kid_mean", mode, net), metric_label("fid", mode, net),
               "precision / recall", "consistency PSNR (dB)", "detail ratio", "class acc"]
    with_cas = any(r.get("cas_top1") is not None for r in records)
    columns += (["CAS top-1 (real)"] if with_cas else []) + ["best"]
    lines = ["# Sweep", "", f"Best per stage by {meta.get('rank_metric', 'fid')} (★).", ""]
    note = val_split_note(meta)
    lines += [note, ""] if note else []
    rows = []
    for r in records:
        feature = r.get("features", {}).get(net, r)
        pr = "–" if r.get("precision") is None else f"{r['precision']:.2f} / {r['recall']:.2f}"
        row = [r["stage"], f"{r['w']:g}", "–" if r["aug_level"] is None else f"{r['aug_level']:g}",
               kid_cell(feature), fid_cell(feature), pr, num(r.get("consistency_psnr"), ".2f"),
               num(r.get("detail_ratio"), ".2f"), f"{100 * r['class_accuracy']:.1f}%"]
        if with_cas:
            row.append("–" if r.get("cas") is None else cas_cell(r["cas"]))
        rows.append(row + ["★" if r is best.get(r["stage"]) else ""])
    lines += markdown_table(columns, rows)
    lines += ["", SMALL_SAMPLE_NOTE, "", f"Best settings for tools/sample_cascade.py: `{best_flags(best)}`", ""]
    lines += settings_lines(meta)
    return "\n".join(lines)


def write_sweep(out_dir: str | Path, records: Sequence[Mapping], best: Mapping[str, Mapping], meta: Mapping
                ) -> tuple[Path, Path, Path]:
    """`<out>/sweep.json`, `<out>/sweep.md` (table, best ★) and `<out>/sweep.png` (`plot_sweep` of the rank
    metric)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "sweep.json", out / "sweep.md", out / "sweep.png"
    write_json(paths[0], {"meta": meta, "records": records, "best": best, "flags": best_flags(best)})
    write_atomic(paths[1], sweep_markdown(records, best, meta))
    metric = meta.get("rank_metric", "fid")
    plot_sweep(records, paths[2], metric, best=best)
    return paths

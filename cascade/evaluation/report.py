"""Every writer of evaluation output: JSON, Markdown, HTML pages and plots.

- Evaluation results (`write_report`): a compact table per stage first (the few numbers that matter, each
  with its sample count; KID leads where FID is biased), then the full table (`report_table`).
- Sweeps (`write_sweep`, `plot_sweep`), the detail-vs-consistency plot, nearest-neighbour pairs
  (memorisation), training curves.
- Run reports (`write_report_pages`): one HTML page and a Markdown copy built from the same blocks. Blocks are
  plain tuples so callers compose a report without HTML: ("h2", text), ("p", text),
  ("img", relative_path, caption), ("table", columns, rows), ("list", items).

Longer than ~400 lines because it is one cohesive thing: the formatting of the same result layout for
people (tables, plots, pages) sits in one place, so every view shows the same cells.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from cascade.evaluation.metrics import MIN_FID_SAMPLES, best_setting
from cascade.imageops import image_grid

REPORT_FORMAT_VERSION = 2
BASELINE_SUFFIX = " (bicubic)"  # rows scoring the real low-resolution input upsampled (what a stage must beat)

# Metric keys of compute_fid_kid results, in report column order, with their Markdown titles.
FEATURE_METRIC_TITLES = {"fid": "FID", "kid_mean": "KID", "is_mean": "IS", "precision": "precision",
                         "recall": "recall"}
SCALAR_METRIC_TITLES = {"consistency_psnr": "consistency PSNR (dB)", "detail_ratio": "detail ratio",
                        "class_accuracy": "class acc", "cas": "CAS top-1", "memorisation": "memorised"}

Block = tuple

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; }
"""


def read_metrics_log(run_dir: str | Path) -> list[dict]:
    """The JSONL training log of a run folder (empty when the run has none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training_curves(run_dirs: Mapping[str, str | Path], path: str | Path) -> Path:
    """Loss against step for each stage (and the loss per quarter of the t range), one panel per stage."""
    logs = {name: read_metrics_log(d) for name, d in run_dirs.items()}
    logs = {name: log for name, log in logs.items() if log}
    if not logs:
        raise ValueError(f"no training logs (metrics.jsonl) in {sorted(map(str, run_dirs.values()))}")
    fig = Figure(figsize=(4.2 * len(logs), 3.4), layout="constrained")
    axes = fig.subplots(1, len(logs), squeeze=False)[0]
    for ax, (name, log) in zip(axes, logs.items()):
        steps = [r["step"] for r in log]
        ax.plot(steps, [r["loss"] for r in log], color="black", label="loss")
        for q in range(4):
            values = [r.get(f"loss_q{q}") for r in log]
            if any(v is not None for v in values):
                ax.plot(steps, [float("nan") if v is None else v for v in values], lw=0.8, alpha=0.7,
                        label=f"t in quarter {q + 1}")
        if "accuracy" in log[-1]:
            twin = ax.twinx()
            twin.plot(steps, [r.get("accuracy") for r in log], color="tab:green", ls="--", label="accuracy")
            twin.set_ylim(0, 1)
            twin.set_ylabel("train accuracy (noised inputs)")
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _md_cell(text: object) -> str:
    return str(text).replace("|", "\\|")


def render_markdown(title: str, blocks: Sequence[Block]) -> str:
    lines = [f"# {title}", ""]
    for block in blocks:
        kind = block[0]
        if kind in ("h2", "h3"):
            lines += [("## " if kind == "h2" else "### ") + block[1], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "list":
            lines += [f"- {item}" for item in block[1]] + [""]
        elif kind == "img":
            lines += [f"![{block[2]}]({block[1]})", "", f"*{block[2]}*", ""]
        elif kind == "table":
            columns, rows = block[1], block[2]
            lines.append("| " + " | ".join(_md_cell(c) for c in columns) + " |")
            lines.append("|" + "---|" * len(columns))
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            lines.append("")
        else:
            raise ValueError(f"unknown report block {kind!r}")
    return "\n".join(lines)


def render_html(title: str, blocks: Sequence[Block]) -> str:
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1>"]
    for block in blocks:
        kind = block[0]
        if kind in ("h2", "h3"):
            parts.append(f"<{kind}>{esc(block[1])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{esc(block[1])}</p>")
        elif kind == "list":
            parts.append("<ul>" + "".join(f"<li>{esc(str(item))}</li>" for item in block[1]) + "</ul>")
        elif kind == "img":
            parts.append(f"<figure><img src='{esc(block[1])}' alt='{esc(block[2])}'>"
                         f"<figcaption>{esc(block[2])}</figcaption></figure>")
        elif kind == "table":
            columns, rows = block[1], block[2]
            head = "".join(f"<th>{esc(str(c))}</th>" for c in columns)
            body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        else:
            raise ValueError(f"unknown report block {kind!r}")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report_pages(out_dir: str | Path, title: str, blocks: Sequence[Block], stem: str = "report") -> tuple[Path, Path]:
    """Write `<stem>.html` and `<stem>.md` into out_dir (image paths are relative to it)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    html_path, md_path = out / f"{stem}.html", out / f"{stem}.md"
    html_path.write_text(render_html(title, blocks))
    md_path.write_text(render_markdown(title, blocks))
    return html_path, md_path


# ------------------------------------------------------------------------------------------------------
# JSON


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(document), indent=2, allow_nan=False) + "\n")
    return path


# ------------------------------------------------------------------------------------------------------
# Evaluation results: cells, the compact per-stage tables and the full table


def metric_label(metric: str, mode: str, feature_net: str | None = None) -> str:
    """Column label, e.g. 'FID cascaded [inception-v3]'; feature-based metrics always name their network."""
    titles = {**FEATURE_METRIC_TITLES, **SCALAR_METRIC_TITLES}
    label = f"{titles.get(metric, metric)} {mode}"
    return f"{label} [{feature_net}]" if feature_net is not None else label


def _num(value: Any, fmt: str) -> str:
    return "–" if value is None else format(float(value), fmt)


def fid_cell(result: Mapping) -> str:
    """'12.50 (n=20, biased)' / '3.10 [2.9, 3.4] (n=5000)': FID with its sample count, bootstrap interval and
    the bias mark (`compute_fid_kid`'s "fid_biased")."""
    text = _num(result["fid"], ".2f")
    if result.get("fid_ci"):
        low, high = result["fid_ci"]
        text += f" [{float(low):.2f}, {float(high):.2f}]"
    notes = [f"n={result['num_fake']}"] if "num_fake" in result else []
    if result.get("fid_biased"):
        notes.append("biased")
    return text + (f" ({', '.join(notes)})" if notes else "")


def kid_cell(result: Mapping) -> str:
    text = f"{float(result['kid_mean']):.5f} ± {float(result.get('kid_std', float('nan'))):.5f}"
    return text + (f" (n={result['num_fake']})" if "num_fake" in result else "")


def cas_cell(cas: Mapping) -> str:
    """'40.0% (real 70.0%, n=30)': CAS top-1 next to the real-data ceiling, with the training set size."""
    text = f"{100 * float(cas['top1']):.1f}% (real {100 * float(cas['real_top1']):.1f}%"
    if "top5" in cas:
        text += f"; top-5 {100 * float(cas['top5']):.1f}% / real {100 * float(cas['real_top5']):.1f}%"
    return text + f", n={cas['num_train']})"


def memorisation_cell(mem: Mapping) -> str:
    """'0% feature / 5% pixel (val 0% / 0%)': samples flagged as near copies, next to real val images."""
    return (f"{100 * float(mem['fraction_feature']):.0f}% feature / {100 * float(mem['fraction_pixel']):.0f}% "
            f"pixel (val {100 * float(mem['val_fraction_feature']):.0f}% / "
            f"{100 * float(mem['val_fraction_pixel']):.0f}%)")


def _format_cell(metric: str, values: Mapping) -> str:
    value = values[metric]
    if metric == "fid":
        return fid_cell(values)
    if metric == "kid_mean":
        return kid_cell(values)
    if metric == "is_mean":
        return f"{float(value):.2f} ± {float(values.get('is_std', float('nan'))):.2f}"
    if metric in ("precision", "recall"):
        return f"{float(value):.2f}"
    if metric == "class_accuracy":
        return f"{100 * float(value):.1f}%"
    if metric == "cas":
        return cas_cell(value)
    if metric == "memorisation":
        return memorisation_cell(value)
    return f"{float(value):.2f}"


def report_table(results: Mapping) -> tuple[list[str], dict[str, dict[str, str]]]:
    """Flatten {stage: {mode: {"features": {net: result}, scalar: value, "cas": {...}, "memorisation": {...}}}}
    into labelled cells: (columns, {stage: {column: cell}})."""
    feature_cells: dict[tuple[int, int, str], str] = {}
    scalar_cells: dict[tuple[str, str], str] = {}
    modes: list[str] = []
    table: dict[str, dict[str, str]] = {}
    for stage, by_mode in results.items():
        if not isinstance(by_mode, Mapping):
            raise TypeError(f"results[{stage!r}] must map mode -> metrics, got {type(by_mode).__name__}")
        row = table.setdefault(str(stage), {})
        for mode, metrics in by_mode.items():
            if mode not in modes:
                modes.append(mode)
            for key, value in metrics.items():
                if key == "features":
                    for net, result in value.items():
                        if result.get("feature_net", net) != net:
                            raise ValueError(
                                f"results[{stage!r}][{mode!r}]['features'][{net!r}] holds metrics of "
                                f"feature network {result['feature_net']!r}"
                            )
                        for order, metric in enumerate(FEATURE_METRIC_TITLES):
                            if metric in result:
                                label = metric_label(metric, mode, net)
                                feature_cells[(order, modes.index(mode), net)] = label
                                row[label] = _format_cell(metric, result)
                elif isinstance(value, (int, float)) or (key in ("cas", "memorisation")
                                                         and isinstance(value, Mapping)):
                    label = metric_label(key, mode)
                    scalar_cells[(key, mode)] = label
                    row[label] = _format_cell(key, metrics)
                else:
                    raise ValueError(f"results[{stage!r}][{mode!r}][{key!r}]: expected a number, the 'features' "
                                     f"mapping or the 'cas' / 'memorisation' mappings")
    known = list(SCALAR_METRIC_TITLES)

    def scalar_order(cell: tuple[str, str]) -> tuple:
        metric, mode = cell
        return (known.index(metric) if metric in known else len(known), metric, modes.index(mode))

    columns = [feature_cells[k] for k in sorted(feature_cells)]
    columns += [scalar_cells[k] for k in sorted(scalar_cells, key=scalar_order)]
    return columns, table


def _lead_net(metrics: Mapping) -> str | None:
    """The feature network a summary reads: the first one that sees whole images (not patches)."""
    nets = list(metrics.get("features", {}))
    whole = [n for n in nets if "-patch" not in n]
    return (whole or nets or [None])[0]


def summary_table(by_mode: Mapping) -> tuple[list[str], list[list[str]]]:
    """One stage's compact table: a row per mode with the few numbers that matter, each with its sample
    count. KID leads (unbiased); FID follows, marked biased below `MIN_FID_SAMPLES` samples."""
    columns = ["mode", "KID ± std", "FID", "precision / recall", "class acc"]
    extra = [("consistency_psnr", "consistency (dB)"), ("detail_ratio", "detail ratio"), ("cas", "CAS top-1"),
             ("memorisation", "memorised")]
    present = [(k, title) for k, title in extra if any(k in m for m in by_mode.values())]
    columns += [title for _, title in present]
    rows = []
    for mode, metrics in by_mode.items():
        net = _lead_net(metrics)
        result = metrics.get("features", {}).get(net, {})
        pr = (f"{result['precision']:.2f} / {result['recall']:.2f}" if "precision" in result else "–")
        row = [mode + (f" [{net}]" if net else ""), kid_cell(result) if "kid_mean" in result else "–",
               fid_cell(result) if "fid" in result else "–", pr,
               _format_cell("class_accuracy", metrics) if "class_accuracy" in metrics else "–"]
        row += [_format_cell(k, metrics) if k in metrics else "–" for k, _ in present]
        rows.append(row)
    return columns, rows


SMALL_SAMPLE_NOTE = (
    f"FID is biased upwards at small sample counts (its bias falls roughly as 1/N): below {MIN_FID_SAMPLES:,} "
    "samples, or below the feature dimension, it is marked *biased* and only comparable between runs with the "
    "same N; read KID (unbiased; it can be slightly negative when the sets are close: read it as 0 within its "
    "std) first. Every count n is the number of generated images (patches for patch FID).")


def _markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_md_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]


def write_report(results: Mapping, json_path: str | Path, md_path: str | Path, *, meta: Mapping | None = None,
                 plot_path: str | Path | None = None) -> None:
    """Write results as JSON and as Markdown: per stage a compact table (`summary_table`), then the full
    table (rows = stages, columns = metric × mode [× feature net]); plot_path: also the
    `plot_detail_vs_consistency` figure (when an SR stage has both numbers), linked from the Markdown.

    results: {stage: {mode: {"features": {feature_net_name: compute_fid_kid(...) result},
                             "consistency_psnr": float, "class_accuracy": float, "cas": {...}, ...}}}
    meta: run settings (samples, sampler, seed, ...) recorded in both files.
    """
    columns, table = report_table(results)
    json_path, md_path = Path(json_path), Path(md_path)
    write_json(json_path, {"format_version": REPORT_FORMAT_VERSION, "meta": dict(meta or {}), "results": results})
    lines = ["# Evaluation", ""]
    for stage, by_mode in results.items():
        lines += [f"## {stage}", "", *_markdown_table(*summary_table(by_mode)), ""]
    lines += [SMALL_SAMPLE_NOTE, ""]
    if plot_path is not None and plot_detail_vs_consistency(results, plot_path) is not None:
        plot, folder = Path(plot_path).resolve(), md_path.parent.resolve()
        rel = plot.relative_to(folder).as_posix() if plot.is_relative_to(folder) else str(plot)
        lines += [f"![detail ratio against consistency per stage]({rel})", ""]
    lines += ["## Full table", ""]
    lines += _markdown_table(["stage", *columns], ([stage] + [row.get(c, "–") for c in columns]
                                                   for stage, row in table.items()))
    lines += [
        "",
        ("FID / KID / IS / precision / recall columns name their feature network in brackets; values from "
         "different feature networks are not comparable. KID and IS are mean ± std over subsets / splits."),
        "",
    ]
    if meta:
        lines += ["## Settings", ""] + [f"- {key}: {value}" for key, value in meta.items()] + [""]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------------------
# Plots and images


def plot_detail_vs_consistency(results: Mapping, path: str | Path) -> Path | None:
    """Per SR stage, detail ratio (y) against consistency PSNR (x) for each mode and the bicubic row: a good
    stage sits near y = 1 (real images' detail) at high consistency, the bicubic point low on the right.
    Returns the path, or None when no stage has both numbers (nothing written)."""
    points: dict[str, list[tuple[str, float, float]]] = {}
    for row, by_mode in results.items():
        stage = row.removesuffix(BASELINE_SUFFIX)
        for mode, metrics in by_mode.items():
            if metrics.get("detail_ratio") is not None and metrics.get("consistency_psnr") is not None:
                label = "bicubic" if row.endswith(BASELINE_SUFFIX) else mode
                psnr = float(metrics["consistency_psnr"])
                points.setdefault(stage, []).append((label, psnr if math.isfinite(psnr) else 60.0,
                                                     float(metrics["detail_ratio"])))
    if not points:
        return None
    fig = Figure(figsize=(4.2 * len(points), 3.6), layout="constrained")
    axes = fig.subplots(1, len(points), squeeze=False)[0]
    markers = {"teacher-forced": "o", "cascaded": "s", "bicubic": "^"}
    for ax, (stage, stage_points) in zip(axes, points.items()):
        for label, x, y in stage_points:
            ax.plot(x, y, marker=markers.get(label, "x"), markersize=9, linestyle="none", label=label)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--", label="real images")
        ax.set_title(stage)
        ax.set_xlabel("consistency PSNR (dB)")
        ax.set_ylabel("detail ratio")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def write_pairs_image(samples: torch.Tensor, neighbours: torch.Tensor, path: str | Path) -> Path:
    """A grid of (sample, its nearest training image) pairs, one pair per row, both B×3×H×W in [-1, 1]."""
    if samples.shape != neighbours.shape:
        raise ValueError(f"samples {tuple(samples.shape)} and neighbours {tuple(neighbours.shape)} differ")
    pairs = torch.stack([samples, neighbours], dim=1).flatten(0, 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(pairs, ncol=2).save(path)
    return path
def plot_sweep(records: Iterable[Mapping], path: str | Path, metric: str = "fid",
               best: Mapping[str, Mapping] | None = None) -> None:
    """PNG: per stage, `metric` against w (one line per s) and against s (one line per w); the best record
    (default `best_setting(records, metric)`) marked ★."""
    records = list(records)
    best = best_setting(records, metric) if best is None else best
    by_stage: dict[str, list[Mapping]] = {}
    for r in records:
        by_stage.setdefault(r["stage"], []).append(r)
    titles = {**FEATURE_METRIC_TITLES, **SCALAR_METRIC_TITLES}
    fig = Figure(figsize=(10, 3.6 * len(by_stage)))  # no pyplot: Agg canvas, no global backend state
    axes = fig.subplots(len(by_stage), 2, squeeze=False)
    for row, (stage, stage_records) in enumerate(by_stage.items()):
        net = stage_records[0]["feature_net"]
        winner = best[stage]
        # a stage without this metric (the base stage has no consistency) shows FID
        shown = metric if any(r.get(metric) is not None for r in stage_records) else "fid"
        title = titles.get(shown, shown)
        net_text = f" [{net}]" if shown in FEATURE_METRIC_TITLES else ""
        for ax, x_key, group_key, x_name, group_name in (
            (axes[row, 0], "w", "aug_level", "guidance weight w", "s"),
            (axes[row, 1], "aug_level", "w", "augmentation level s", "w"),
        ):
            if x_key == "aug_level" and all(r.get("aug_level") is None for r in stage_records):
                ax.text(0.5, 0.5, "no augmentation level (base stage)", ha="center", va="center")
                ax.set_axis_off()
                continue
            groups: dict = {}
            for r in stage_records:
                groups.setdefault(r.get(group_key), []).append(r)
            for group, members in sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
                members = sorted(members, key=lambda r: float(r.get(x_key) or 0.0))
                xs = [float(r.get(x_key) or 0.0) for r in members]
                ax.plot(xs, [float(r[shown]) for r in members], marker="o", label=f"{group_name}={group}")
            ax.plot(
                float(winner.get(x_key) or 0.0),
                float(winner[shown]),
                marker="*",
                markersize=16,
                color="red",
                linestyle="none",
                label="best",
            )
            ax.set_xlabel(x_name)
            ax.set_ylabel(f"{title}{net_text}")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        s_text = "" if winner.get("aug_level") is None else f", s={winner['aug_level']}"
        axes[row, 0].set_title(
            f"{stage}: best w={winner['w']}{s_text}, "
            f"{title}{net_text}={float(winner[shown]):.2f}"
        )
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


# ------------------------------------------------------------------------------------------------------
# Sweeps


def best_flags(best: Mapping[str, Mapping[str, Any]]) -> str:
    """`--w base32=3,sr64=1 --aug-level sr64=0.1` from best_setting's records."""
    w = ",".join(f"{stage}={r['w']:g}" for stage, r in best.items())
    s = ",".join(f"{stage}={r['aug_level']:g}" for stage, r in best.items() if r.get("aug_level") is not None)
    return f"--w {w}" + (f" --aug-level {s}" if s else "")


def sweep_markdown(records: Sequence[Mapping], best: Mapping[str, Mapping], meta: Mapping) -> str:
    """The sweep table (best ★, ranked by meta["rank_metric"]) with the best settings as flags."""
    net, mode = meta["ranked_by"], meta["mode"]
    columns = ["stage", "w", "s", metric_label("kid_mean", mode, net), metric_label("fid", mode, net),
               "precision / recall", "consistency PSNR (dB)", "detail ratio", "class acc"]
    with_cas = any(r.get("cas_top1") is not None for r in records)
    columns += (["CAS top-1 (real)"] if with_cas else []) + ["best"]
    lines = ["# Sweep", "", f"Best per stage by {meta.get('rank_metric', 'fid')} (★).", ""]
    rows = []
    for r in records:
        feature = r.get("features", {}).get(net, r)
        pr = "–" if r.get("precision") is None else f"{r['precision']:.2f} / {r['recall']:.2f}"
        row = [r["stage"], f"{r['w']:g}", "–" if r["aug_level"] is None else f"{r['aug_level']:g}",
               kid_cell(feature), fid_cell(feature), pr, _num(r.get("consistency_psnr"), ".2f"),
               _num(r.get("detail_ratio"), ".2f"), f"{100 * r['class_accuracy']:.1f}%"]
        if with_cas:
            row.append("–" if r.get("cas") is None else cas_cell(r["cas"]))
        rows.append(row + ["★" if r is best.get(r["stage"]) else ""])
    lines += _markdown_table(columns, rows)
    lines += ["", SMALL_SAMPLE_NOTE, "", f"Best settings for tools/sample_cascade.py: `{best_flags(best)}`", ""]
    lines += ["## Settings", ""] + [f"- {k}: {v}" for k, v in meta.items()] + [""]
    return "\n".join(lines)


def write_sweep(out_dir: str | Path, records: Sequence[Mapping], best: Mapping[str, Mapping], meta: Mapping
                ) -> tuple[Path, Path, Path]:
    """`<out>/sweep.json`, `<out>/sweep.md` (table, best ★) and `<out>/sweep.png` (`plot_sweep` of the rank
    metric)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "sweep.json", out / "sweep.md", out / "sweep.png"
    write_json(paths[0], {"meta": meta, "records": records, "best": best, "flags": best_flags(best)})
    paths[1].write_text(sweep_markdown(records, best, meta))
    metric = meta.get("rank_metric", "fid")
    plot_sweep(records, paths[2], metric, best=best)
    return paths

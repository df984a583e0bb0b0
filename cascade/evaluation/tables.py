"""Evaluation results as labelled cells: every view (the Markdown report, the sweep table, the demo's page)
formats a metric through the same cell functions, so it shows the same text.

Results layout: {stage: {mode: {"features": {feature_net: `compute_fid_kid` result}, scalar metric: value,
"cas": {...}, "memorisation": {...}}}}; feature-based labels always name their feature network.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cascade.evaluation.metrics import MIN_FID_SAMPLES
from cascade.evaluation.pages import md_cell

BASELINE_SUFFIX = " (bicubic)"  # rows scoring the real low-resolution input upsampled (what a stage must beat)

# Metric keys of compute_fid_kid results, in report column order, with their Markdown titles.
FEATURE_METRIC_TITLES = {"fid": "FID", "kid_mean": "KID", "is_mean": "IS", "precision": "precision",
                         "recall": "recall"}
SCALAR_METRIC_TITLES = {"consistency_psnr": "consistency PSNR (dB)", "detail_ratio": "detail ratio",
                        "class_accuracy": "class acc", "cas": "CAS top-1", "memorisation": "memorised"}


def metric_label(metric: str, mode: str, feature_net: str | None = None) -> str:
    """Column label, e.g. 'FID cascaded [inception-v3]'; feature-based metrics always name their network."""
    titles = {**FEATURE_METRIC_TITLES, **SCALAR_METRIC_TITLES}
    label = f"{titles.get(metric, metric)} {mode}"
    return f"{label} [{feature_net}]" if feature_net is not None else label


def num(value: Any, fmt: str) -> str:
    return "–" if value is None else format(float(value), fmt)


def fid_cell(result: Mapping) -> str:
    """'12.50 (n=20, biased)' / '3.10 [2.9, 3.4] (n=5000)': FID with its sample count, bootstrap interval and
    the bias mark (`compute_fid_kid`'s "fid_biased")."""
    text = num(result["fid"], ".2f")
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


def val_split_note(meta: Mapping | None) -> str | None:
    """The warning a report shows above its tables when val images were skipped as unreadable (meta
    "val_images": {"read": N, "skipped": M}, M > 0), else None."""
    counts = (meta or {}).get("val_images") or {}
    read, skipped = counts.get("read", 0), counts.get("skipped", 0)
    if not skipped:
        return None
    return (f"**Warning: damaged val split.** {read} of {read + skipped} val images were readable ({skipped} "
            f"skipped as corrupt); every metric compares against the {read} readable ones.")


SMALL_SAMPLE_NOTE = (
    f"FID is biased upwards at small sample counts (its bias falls roughly as 1/N): below {MIN_FID_SAMPLES:,} "
    "samples, or below the feature dimension, it is marked *biased* and only comparable between runs with the "
    "same N; read KID (unbiased; it can be slightly negative when the sets are close: read it as 0 within its "
    "std) first. Every count n is the number of generated images (patches for patch FID).")


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(md_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]

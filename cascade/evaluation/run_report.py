"""The report of one training run folder: `<run>/report.md` and `<run>/report.png` from its `metrics.jsonl`.

The figure plots against the step: the loss and the loss per quarter of the timestep range, the learning rate,
images per second and every quality-proxy metric (`cascade.evaluation.proxy`; titled as a proxy with its
sample count). The Markdown gives the last logging window, the proxy's records as a table and links the newest
sample grids of `<run>/samples/`. Proxy records are those with `proxy_*` keys: records of their own or keys
merged into the logging windows' records, both are read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from cascade.atomic import write_atomic
from cascade.evaluation.plots import read_metrics_log, save_figure
from cascade.evaluation.tables import markdown_table

__all__ = ["PROXY_METRICS", "REPORT_FILE", "REPORT_PLOT", "write_run_report"]

REPORT_FILE, REPORT_PLOT = "report.md", "report.png"
SAMPLES_DIR = "samples"
NEWEST_GRIDS = 3  # sample grids linked from the report, newest first
PROXY_ROWS = 40  # proxy records in the table (the newest); the figure shows them all

# proxy key → (title, number format); proxy_kid is shown with its ± proxy_kid_std
PROXY_METRICS: dict[str, tuple[str, str]] = {
    "proxy_class_accuracy": ("class accuracy", ".3f"),
    "proxy_fd": ("FD (judge features)", ".3f"),
    "proxy_kid": ("KID (judge features)", ".4f"),
    "proxy_consistency_db": ("consistency PSNR (dB)", ".2f"),
    "proxy_detail_ratio": ("detail ratio", ".3f"),
}


def _series(records: Sequence[Mapping], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records holding a number under ``key``."""
    pairs = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _proxy_records(records: Sequence[Mapping]) -> list[dict[str, Any]]:
    """One record per step holding `proxy_*` keys (of records of their own or merged into logging windows'),
    in step order; a later record's value of a key wins."""
    by_step: dict[int, dict[str, Any]] = {}
    for r in records:
        found = {k: v for k, v in r.items() if k.startswith("proxy_")}
        if found:
            by_step.setdefault(r["step"], {"step": r["step"]}).update(found)
    return [by_step[s] for s in sorted(by_step)]


def _proxy_count(proxy: Sequence[Mapping]) -> str:
    counts = sorted({int(r["proxy_count"]) for r in proxy if isinstance(r.get("proxy_count"), (int, float))
                     and math.isfinite(r["proxy_count"])})
    return "?" if not counts else "/".join(str(c) for c in counts)


def _plot(windows: Sequence[Mapping], proxy: Sequence[Mapping], path: Path, title: str) -> Path:
    shown = [k for k in PROXY_METRICS if any(k in r for r in proxy)]
    panels = 3 + len(shown)
    columns = min(panels, 3)
    rows = -(-panels // columns)
    fig = Figure(figsize=(4.2 * columns, 3.2 * rows), layout="constrained")
    axes = list(fig.subplots(rows, columns, squeeze=False).flat)
    fig.suptitle(title)
    ax = axes[0]
    ax.plot(*_series(windows, "loss"), color="black", label="loss")
    for q in range(4):
        steps, values = _series(windows, f"loss_q{q}")
        if steps:
            ax.plot(steps, values, lw=0.8, alpha=0.7, label=f"t in quarter {q + 1}")
    if any(v > 0 for v in _series(windows, "loss")[1]):
        ax.set_yscale("log")
    ax.set_title("training loss")
    ax.legend(fontsize=7)
    for ax, key, name in ((axes[1], "lr", "learning rate"), (axes[2], "img_per_s", "images / s")):
        ax.plot(*_series(windows, key), color="tab:blue")
        ax.set_title(name)
    count = _proxy_count(proxy)
    for ax, key in zip(axes[3:], shown):
        steps, values = _series(proxy, key)
        if key == "proxy_kid":
            stds = [float(r.get("proxy_kid_std") or 0.0) for r in proxy if isinstance(r.get(key), (int, float))]
            ax.errorbar(steps, values, yerr=stds, marker="o", capsize=3, color="tab:red")
        else:
            ax.plot(steps, values, marker="o", color="tab:red")
        if key == "proxy_detail_ratio":
            ax.axhline(1.0, color="gray", lw=0.8, ls="--", label="real images")
        ax.set_title(f"proxy ({count} samples): {PROXY_METRICS[key][0]}", fontsize=9)
    for ax in axes[:panels]:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[panels:]:
        ax.set_axis_off()
    return save_figure(fig, path)


def _cell(record: Mapping, key: str, fmt: str) -> str:
    value = record.get(key)
    if not isinstance(value, (int, float)):
        return "–"
    text = format(float(value), fmt)
    if key == "proxy_kid" and isinstance(record.get("proxy_kid_std"), (int, float)):
        text += f" ± {format(float(record['proxy_kid_std']), fmt)}"
    return text


def _newest_grids(run_dir: Path) -> list[Path]:
    """The newest sample grids of the run (`samples/step-<step>.png`: the names sort by step), newest first."""
    folder = run_dir / SAMPLES_DIR
    return sorted(folder.glob("*.png"), reverse=True)[:NEWEST_GRIDS] if folder.is_dir() else []


def write_run_report(run_dir: str | Path) -> Path:
    """Write `<run_dir>/report.md` and, when `metrics.jsonl` holds records, `<run_dir>/report.png` (atomically);
    return the Markdown's path. A cut-off last line of `metrics.jsonl` is skipped, a log without proxy records
    gives a report without proxy panels. FileNotFoundError (one line) when the folder has no `metrics.jsonl`."""
    run = Path(run_dir)
    if not (run / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run} has no metrics.jsonl; pass a run folder written by tools/train_stage.py")
    records = read_metrics_log(run)
    windows = [r for r in records if "loss" in r]
    proxy = _proxy_records(records)
    lines = [f"# Run report: {run.name}", "", f"Run folder `{run}`: {len(windows)} logging windows"
             + (f", last step {records[-1]['step']}." if records else "; nothing logged yet."), ""]
    if records:
        _plot(windows, proxy, run / REPORT_PLOT, f"{run.name}: training and quality proxy")
        lines += [f"![training curves and quality proxy]({REPORT_PLOT})", ""]
    if windows:
        last = windows[-1]
        columns = [("loss", "loss", ".4g"), ("lr", "lr", ".3g"), ("grad norm", "grad_norm", ".3g"),
                   ("img/s", "img_per_s", ".1f")]
        row = [str(last["step"]), *(_cell(last, k, f) for _, k, f in columns)]
        lines += ["## Training (last logging window)", "",
                  *markdown_table(["step", *(c[0] for c in columns)], [row]), ""]
    lines += ["## Quality proxy", ""]
    if proxy:
        lines += [(f"A proxy, not an evaluation: {_proxy_count(proxy)} fixed-seed samples per record, scored by the "
                  "judge (a small CNN trained on the real train split) against the val split. FD and KID are "
                  "biased at so few samples: compare records of this run (or runs with the same count and steps) "
                  "with each other, never with tools/eval_fid.py's numbers."), ""]
        shown = [k for k in PROXY_METRICS if any(k in r for r in proxy)]
        header: list[Any] = ["step", *(PROXY_METRICS[k][0] for k in shown), "seconds"]
        table = [[str(r["step"]), *(_cell(r, k, PROXY_METRICS[k][1]) for k in shown), _cell(r, "proxy_seconds", ".1f")]
                 for r in proxy[-PROXY_ROWS:]]
        if len(proxy) > PROXY_ROWS:
            lines += [f"The newest {PROXY_ROWS} of {len(proxy)} records (the figure shows all).", ""]
        lines += [*markdown_table(header, table), ""]
    else:
        lines += ["No quality proxy records in metrics.jsonl (the proxy was off for this run).", ""]
    grids = _newest_grids(run)
    lines += ["## Samples", ""]
    if grids:
        newest = grids[0].relative_to(run).as_posix()
        lines += [f"Newest sample grid, `{newest}`:", "", f"![newest sample grid]({newest})", ""]
        if len(grids) > 1:
            lines += ["Before it: " + ", ".join(f"[{g.stem}]({g.relative_to(run).as_posix()})" for g in grids[1:]),
                      ""]
    else:
        lines += [f"No sample grids in `{SAMPLES_DIR}/` (trainer.sample_every=0, or none written yet).", ""]
    path = run / REPORT_FILE
    write_atomic(path, "\n".join(lines))
    return path

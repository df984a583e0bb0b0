"""Plots and image grids of evaluation output: training curves, detail ratio against consistency, sweep
curves, (sample, nearest training image) pairs. Matplotlib's object API only (no pyplot: no global backend
state); every writer creates the parent folder, writes atomically (a failed write leaves no partial file) and
returns the path.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from matplotlib.figure import Figure

from cascade.atomic import write_atomic_with
from cascade.evaluation.metrics import best_setting
from cascade.evaluation.tables import BASELINE_SUFFIX, FEATURE_METRIC_TITLES, SCALAR_METRIC_TITLES
from cascade.imageops import image_grid, save_png


def read_metrics_log(run_dir: str | Path) -> list[dict]:
    """The JSONL training log of a run folder (empty when the run has none): its records with a "step", in file
    order; a line that is not such a record (a run killed mid-write leaves a cut-off last line) is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write a matplotlib figure as the PNG ``path`` atomically (its folder is made; a failed write leaves no
    partial file); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_with(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    return path


def plot_training_curves(run_dirs: Mapping[str, str | Path], path: str | Path) -> Path:
    """Loss against step for each stage (and the loss per quarter of the t range), one panel per stage."""
    logs = {name: [r for r in read_metrics_log(d) if "loss" in r] for name, d in run_dirs.items()}  # windows
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
    return save_figure(fig, path, dpi=110)


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
    return save_figure(fig, path)


def write_pairs_image(samples: torch.Tensor, neighbours: torch.Tensor, path: str | Path) -> Path:
    """A grid of (sample, its nearest training image) pairs, one pair per row, both B×3×H×W in [-1, 1]."""
    if samples.shape != neighbours.shape:
        raise ValueError(f"samples {tuple(samples.shape)} and neighbours {tuple(neighbours.shape)} differ")
    pairs = torch.stack([samples, neighbours], dim=1).flatten(0, 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_png(image_grid(pairs, ncol=2), path)


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
    save_figure(fig, path)

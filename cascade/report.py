"""A self-contained run report: one HTML page and a Markdown copy built from the same blocks.

Blocks are plain tuples so callers compose a report without HTML: ("h2", text), ("p", text),
("img", relative_path, caption), ("table", columns, rows), ("list", items).
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

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

"""Run reports as one HTML page and a Markdown copy built from the same blocks (`write_report_pages`).

Blocks are plain tuples so callers compose a report without HTML: ("h2", text), ("h3", text), ("p", text),
("img", relative_path, caption), ("table", columns, rows), ("list", items).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from cascade.atomic import write_atomic

Block = tuple

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; }
"""


def md_cell(text: object) -> str:
    """``text`` as a Markdown table cell (pipes escaped)."""
    return str(text).replace("|", "\\|")


def render_markdown(title: str, blocks: Sequence[Block]) -> str:
    """The Markdown page of `blocks` under the heading `title`; ValueError on an unknown block kind."""
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
            lines.append("| " + " | ".join(md_cell(c) for c in columns) + " |")
            lines.append("|" + "---|" * len(columns))
            lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
            lines.append("")
        else:
            raise ValueError(f"unknown report block {kind!r}")
    return "\n".join(lines)


def render_html(title: str, blocks: Sequence[Block]) -> str:
    """The HTML page (text escaped, one inline stylesheet) of `blocks`; ValueError on an unknown block kind."""
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
    write_atomic(html_path, render_html(title, blocks))  # a failed write leaves no partial file
    write_atomic(md_path, render_markdown(title, blocks))
    return html_path, md_path

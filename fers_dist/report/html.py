"""One self-contained ``report.html``: tables as HTML and every figure embedded as a base64 PNG."""

from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass, field
from pathlib import Path

from fers_dist.report.tables import Table

CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:left}th{background:#f2f2f2}caption{font-weight:600;text-align:left;padding:.3em 0}
.note{color:#555;font-size:.85em;margin-top:-1em}figure{margin:1em 0 2em}figcaption{color:#555;font-size:.9em}
img{max-width:100%;border:1px solid #eee}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}"""


@dataclass
class Section:
    title: str
    items: list = field(default_factory=list)  # Table, Path (a PNG figure), or str (a paragraph)


def table_html(t: Table) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(str(c))}</th>" for c in t.columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in r) + "</tr>" for r in t.rows)
    note = f'<p class="note">{esc(t.note)}</p>' if t.note else ""
    return (f'<table id="{esc(t.name)}"><caption>{esc(t.title)}</caption><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>{note}")


def figure_html(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    name = html.escape(Path(path).name)
    return (f'<figure><img alt="{name}" data-file="{name}" src="data:image/png;base64,{data}">'
            f"<figcaption>{name}</figcaption></figure>")


def render(title: str, subtitle: str, sections: list[Section]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p>{html.escape(subtitle)} — generated {time.strftime('%Y-%m-%d %H:%M:%S')}</p>"]
    for s in sections:
        if not s.items:
            continue
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        for item in s.items:
            if isinstance(item, Table):
                parts.append(table_html(item))
            elif isinstance(item, Path):
                parts.append(figure_html(item))
            else:
                parts.append(f"<p>{html.escape(str(item))}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)

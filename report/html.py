"""A self-contained HTML page: inline CSS, PNGs embedded as base64, nothing fetched from anywhere."""
from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any, Iterable

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1150px;
       padding: 0 1em; color: #222; line-height: 1.4; overflow-wrap: break-word; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; overflow-wrap: anywhere; }
th { background: #f2f2f2; } tr.best td { background: #eef7ee; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.4em 0; }
pre { background: #f6f8fa; padding: 0.8em; font-size: 0.85em; white-space: pre-wrap; overflow-wrap: anywhere; }
.note { color: #555; font-style: italic; } .big { font-size: 1.5em; font-weight: 600; }
.cards { display: flex; gap: 1em; flex-wrap: wrap; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em 1em; min-width: 11em; }
"""


def pct(fraction: float) -> str:
    """An accuracy as the page shows every accuracy: a percentage with one decimal (48.5%)."""
    return f"{fraction:.1%}"


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def table(head: list[str], rows: Iterable[list[Any]], *, numeric: set[int] = frozenset(),
          highlight: set[int] = frozenset()) -> str:
    out = ['<table><thead><tr>', *(f"<th>{esc(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for n, row in enumerate(rows):
        out.append('<tr class="best">' if n in highlight else "<tr>")
        out += [('<td class="num">' if i in numeric else "<td>") + f"{esc(c)}</td>" for i, c in enumerate(row)]
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def cards(items: list[tuple[str, str]]) -> str:
    return '<div class="cards">' + "".join(
        f'<div class="card"><div>{esc(k)}</div><div class="big">{esc(v)}</div></div>' for k, v in items) + "</div>"


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def pre(text: str) -> str:
    return f"<pre>{esc(text)}</pre>"


def section(title: str, *parts: str) -> str:
    return f"<section><h2>{esc(title)}</h2>{''.join(parts)}</section>"


def page(title: str, subtitle: str, sections: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{esc(title)}</h1><p>{esc(subtitle)}</p>{''.join(sections)}</body></html>\n")

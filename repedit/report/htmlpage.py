"""Building blocks of repedit's self-contained HTML reports (plotly.js embedded once, opens offline)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from ..io import atomic_write_text

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f6f6f6; padding: 0 3px; } .note { color: #666; font-size: 0.9em; }
.pair { display: flex; gap: 24px; flex-wrap: wrap; } .pair > div { flex: 1 1 420px; }
td.better { background: #e7f6e7; } td.worse { background: #fbeaea; }
"""


def esc(value: Any) -> str:
    """HTML-escaped ``str(value)``."""
    return html.escape(str(value), quote=True)


def num_cell(value: Any, digits: int = 3, css: str = "") -> str:
    """A ``<td>``: right-aligned fixed-point for numbers, escaped text otherwise."""
    extra = f" {css}" if css else ""
    return f'<td class="num{extra}">{value:.{digits}f}</td>' if isinstance(value, (int, float)) and not isinstance(value, bool) else f"<td>{esc(value)}</td>"


class Figures:
    """Renders figures to HTML fragments, embedding plotly.js with the first one only."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, figure: go.Figure, div_id: str) -> str:
        fragment = figure.to_html(
            full_html=False, include_plotlyjs=self.count == 0, div_id=div_id,
            config={"displaylogo": False, "responsive": True},
        )
        self.count += 1
        return f'<div class="figure">{fragment}</div>'


def write_page(path: str | Path, title: str, sections: list[str]) -> Path:
    """Write a complete HTML page (atomically) with ``sections`` (HTML fragments) under an ``<h1>`` title."""
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>{''.join(sections)}</body></html>\n"
    )
    atomic_write_text(path, page)
    return Path(path)

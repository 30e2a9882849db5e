"""A single self-contained HTML report: headings, prose, tables and Plotly figures.

plotly.js is inlined once (in the first figure), and circuitsvis's bundle once (before the first
attention view), so the file opens offline and stays one file.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f4f4f4; } p.note { color: #555; font-size: 0.9em; }
"""


@dataclass
class Report:
    """Collects sections in order and writes them as one HTML file."""

    title: str
    parts: list[str] = field(default_factory=list)
    _js_done: bool = False
    _cv_done: bool = False

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def text(self, text: str, note: bool = False) -> None:
        cls = ' class="note"' if note else ""
        self.parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def table(self, df: pd.DataFrame, floatfmt: str = "{:.3f}") -> None:
        self.parts.append(df.to_html(index=False, float_format=floatfmt.format, border=0))

    def figure(self, fig: go.Figure) -> None:
        self.parts.append(fig.to_html(full_html=False, include_plotlyjs=not self._js_done))
        self._js_done = True

    def attention(self, view) -> None:
        """A :class:`mechq.reports.attention.AttentionView`; circuitsvis's script goes in once."""
        self.parts.append(view.html(include_script=not self._cv_done))
        self._cv_done = True

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = "\n".join(self.parts)
        path.write_text(
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}"
            f"</title><style>{STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>"
            f"{body}</body></html>", encoding="utf-8")
        return path

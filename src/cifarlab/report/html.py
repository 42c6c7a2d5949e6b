"""Static HTML pages: every value escaped, every figure a file beside the page, no network needed."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from cifarlab.data import atomic_write_text

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #1d1d1f; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: right; }
th { background: #f4f4f6; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5rem 0; }
.note { color: #555; font-size: 0.9rem; } code { background: #f4f4f6; padding: 0 0.2rem; }
"""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def table(frame: pd.DataFrame, *, float_format: str = "{:,.3g}") -> str:
    """A pandas table with every cell escaped."""
    return frame.to_html(index=False, escape=True, border=0, na_rep="—",
                         float_format=lambda v: float_format.format(v))


def facts(values: dict, head: str = "") -> str:
    """A two-column table of named values."""
    return table(pd.DataFrame({head: list(values), "value": [str(v) for v in values.values()]}))


def figure(src: str, alt: str) -> str:
    return f'<figure><img src="{esc(src)}" alt="{esc(alt)}" loading="lazy"><figcaption class="note">{esc(alt)}' \
           "</figcaption></figure>"


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n<h1>{esc(title)}</h1>\n{body}\n"
            "</body></html>\n")


def write_page(path: Path, title: str, body: str) -> Path:
    atomic_write_text(Path(path), page(title, body))
    return Path(path)

"""Text from data (label names, file names, scan ids, sources) escaped where it lands - one helper per target format
(issue 22).

- ``markdown_text``: Markdown cards and reports (dataset card, model card, ``report.md``): HTML stays text
  (``<img onerror=...>`` shows as written), and Markdown syntax that could make links, emphasis, code or table cells
  (``[ ] * ` | \\``, ``_`` at a word's edge) is backslash-escaped; line breaks become spaces (a cell stays one cell).
- ``html_text``: HTML (the app's legend and messages): ``html.escape`` with quotes.
- ``csv_cell``: one CSV cell as OWASP advises against formula injection: a text cell that starts with ``=``, ``+``,
  ``-``, ``@``, a tab or a carriage return gets a leading single quote, so spreadsheets show it as text. Numbers
  (``int``/``float``, e.g. ``-0.5``) are returned unchanged and stay numbers; ``csv_row`` and ``csv_frame`` apply it
  to a dict row (keys and values) and to a pandas table (column names, index and text columns).
"""

from __future__ import annotations

import html
import re
from typing import Any

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
# Backslash, code, links/images ("(" ")" "!" act only after "[" "]"), table cells, emphasis; "_" only where it can
# start or end emphasis (not inside a word: "amd_private" stays as it is)
_MARKDOWN_SPECIAL = re.compile(r"([\\`*\[\]|]|(?<!\w)_|_(?!\w))")
_LINE_BREAKS = re.compile(r"[\r\n\u2028\u2029]+")


def html_text(value: object) -> str:
    """``value`` as text for HTML: ``& < > " '`` as entities."""
    return html.escape(str(value), quote=True)


def markdown_text(value: object) -> str:
    """``value`` as literal text inside Markdown (paragraphs, headings, table cells)."""
    text = _LINE_BREAKS.sub(" ", str(value))
    return _MARKDOWN_SPECIAL.sub(r"\\\1", html_text(text))


def csv_cell(value: Any) -> Any:
    """A CSV cell that no spreadsheet runs as a formula: text starting with ``= + - @``, tab or CR is prefixed with
    ``'``; anything that is not text (numbers, None) and text that is a plain number (``-0.5``, ``+1e-3``) is
    returned as it is. Applying it twice changes nothing more."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def csv_row(row: dict) -> dict:
    """``csv_cell`` on every key and value of a ``csv.DictWriter`` row."""
    return {csv_cell(key): csv_cell(value) for key, value in row.items()}


def csv_frame(frame):
    """A copy of a pandas DataFrame with ``csv_cell`` on its column names, its index and its text cells (numeric
    columns are left as they are)."""
    from pandas.api.types import is_numeric_dtype

    out = frame.rename(columns=csv_cell)
    if not is_numeric_dtype(out.index.dtype):
        out.index = out.index.map(csv_cell)
    for column in out.columns:
        if not is_numeric_dtype(out[column].dtype):
            out[column] = out[column].map(csv_cell)
    return out

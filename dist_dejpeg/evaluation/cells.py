"""Names and paths as cells of the tables other programs open: a markdown table cell (metrics.md, compare's
tables) and a CSV cell a spreadsheet reads (metrics.csv). Torch-free."""

from __future__ import annotations

import html
import re

# a text cell that starts with one of these is run as a formula by Excel, LibreOffice and Google Sheets
# (OWASP, "CSV Injection"): ``=cmd|' -C calc'!A0.png`` is a photo's name
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
CSV_ENCODING = "utf-8-sig"  # with a BOM: Excel on Windows reads UTF-8 names as UTF-8 only with it


def csv_cell(value):
    """``value`` as metrics.csv writes it: a text cell that a spreadsheet would run as a formula gets a leading
    ``'`` (shown as text, as OWASP advises); numbers and other text are left as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def md_cell(value) -> str:
    """``value`` as text inside a markdown table cell or line: its ``|`` escaped (else it starts a column), its line
    breaks a space (else they end the row), ``<``, ``>`` and ``&`` as HTML entities (a wiki that renders inline HTML
    would run a photo named ``<img onerror=...>``), and ``\\`` escaped (so that ``\\|`` cannot unescape a ``|``)."""
    text = html.escape(str(value), quote=False).replace("\\", "\\\\").replace("|", "\\|")
    return re.sub(r"\r\n|[\r\n\v\f\x85\u2028\u2029]", " ", text)

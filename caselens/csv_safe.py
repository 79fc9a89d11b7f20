"""CSV export that spreadsheets cannot turn into formulas: every CSV caselens writes goes through here.

Manifest values are stored as they were given (labels, free-text columns), and a cell such as
``=cmd|' /C calc'!A0`` or ``@SUM(1+1)*cmd|...`` is run as a formula by Excel, LibreOffice or
Google Sheets when a CSV holding it is opened ("CSV injection", CWE-1236). So a text value that
begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return (also after leading spaces,
and the full-width ``＝ ＋ － ＠``) is written with a leading apostrophe (``'=cmd|...``), which
spreadsheets show as text, as OWASP recommends. Numbers (``-3.5``, ``+1e3``, ints and floats)
are written as they are.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

from caselens.files import atomic_write_bytes

TRIGGERS = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def neutralise(value: Any) -> Any:
    """``value`` as it may go into a CSV cell: text that a spreadsheet would run as a formula gets
    a leading apostrophe; numbers, None and other text are unchanged."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = str(value)
    head = text.lstrip(" ")
    if head.startswith(TRIGGERS) and not _NUMBER.fullmatch(text.strip()):
        return "'" + text
    return text


class SafeWriter:
    """A :func:`csv.writer` whose rows are neutralised cell by cell (see :func:`neutralise`)."""

    def __init__(self, fh: TextIO, **kwargs: Any):
        self._writer = csv.writer(fh, **kwargs)

    def writerow(self, row: Iterable[Any]) -> Any:
        return self._writer.writerow([neutralise(v) for v in row])

    def writerows(self, rows: Iterable[Iterable[Any]]) -> None:
        for row in rows:
            self.writerow(row)


def write_csv(path: str | Path, columns: Sequence[str], rows: Iterable[dict[str, Any] | Sequence[Any]]) -> int:
    """Write ``rows`` (dicts keyed by ``columns``, or sequences in their order) under a header of
    ``columns`` to ``path`` atomically, every cell neutralised; returns the rows written."""
    buffer = io.StringIO(newline="")
    writer = SafeWriter(buffer)
    writer.writerow(columns)
    n = 0
    for row in rows:
        writer.writerow([row.get(c) for c in columns] if isinstance(row, dict) else row)
        n += 1
    atomic_write_bytes(Path(path), buffer.getvalue().encode("utf-8"))
    return n

"""Reading line-based inputs (JSONL corpora, CSV corpora and manifests) with bounded memory.

Python's own line and CSV readers keep a whole line or record in memory, however long it is: a
10 MB line is read whole, and a CSV field with an unbalanced quote runs to the end of the file.
Here no line or record is held beyond ``max_bytes``: a longer one is skipped in 1 MiB pieces
(counting its bytes and quotes) and reported as too long, and reading goes on with the next
one. The limits themselves live in the sources' config dataclasses.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from typing import BinaryIO, Iterator

SKIP_BLOCK = 1 << 20  # bytes read at a time while skipping the rest of an overlong line
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Line:
    """One physical line: its bytes (line end included) or None when longer than the bound."""

    number: int  # 1-based
    data: bytes | None  # None: longer than the bound, skipped
    size: int  # bytes of the whole line, line end included
    quotes: int  # '"' characters in the whole line (for CSV record boundaries)


def bounded_lines(fh: BinaryIO, max_bytes: int) -> Iterator[Line]:
    """The lines of a binary file, none held in memory beyond ``max_bytes`` (+1)."""
    number = 0
    while True:
        raw = fh.readline(max_bytes + 1)
        if not raw:
            return
        number += 1
        if raw.endswith(b"\n") or len(raw) <= max_bytes:
            yield Line(number, raw, len(raw), raw.count(b'"'))
            continue
        size, quotes = len(raw), raw.count(b'"')
        del raw
        while True:  # skip the rest of the line without keeping it
            rest = fh.readline(SKIP_BLOCK)
            size += len(rest)
            quotes += rest.count(b'"')
            if not rest or rest.endswith(b"\n"):
                break
        yield Line(number, None, size, quotes)


@dataclass(frozen=True)
class Record:
    """One CSV record: its fields, or why it cannot be read (``code``, ``reason``)."""

    line: int  # line where the record starts (1-based)
    fields: list[str] | None
    code: str = ""  # "too_long", "not_utf8", "bad_csv" when fields is None
    reason: str = ""


def csv_records(fh: BinaryIO, max_bytes: int, encoding: str = "utf-8") -> Iterator[Record]:
    """The records of a CSV file (blank lines skipped), none held beyond ``max_bytes``.

    Records are cut where the '"' characters seen since the record began are even (the end of a
    quoted field that spans lines is where its quotes balance), then parsed by :mod:`csv`, so a
    well-formed file reads exactly as ``csv.reader`` reads it. A record longer than ``max_bytes``
    is skipped to its end and reported ``too_long``; bytes that are not ``encoding`` are
    ``not_utf8``; what :mod:`csv` refuses is ``bad_csv``."""
    if csv.field_size_limit() < max_bytes:  # the module's default (128 KiB) would refuse allowed fields
        csv.field_size_limit(max_bytes)
    parts: list[bytes] = []
    start, size, quotes, too_long = 0, 0, 0, False
    for line in bounded_lines(fh, max_bytes):
        if not parts and not too_long:
            start, size, quotes = line.number, 0, 0
        quotes += line.quotes
        if line.data is None or too_long or size + line.size > max_bytes:
            too_long, parts = True, []
        else:
            parts.append(line.data[len(BOM):] if line.number == 1 and line.data.startswith(BOM) else line.data)
        size += line.size
        if quotes % 2:
            continue  # inside a quoted field: the record goes on
        if too_long:
            yield Record(start, None, "too_long", f"row is {size} bytes, more than the limit of {max_bytes}")
        else:
            yield from _parse(start, b"".join(parts), encoding)
        parts, too_long = [], False
    if too_long:
        yield Record(start, None, "too_long", f"row is {size} bytes (unterminated quote), more than the limit "
                                              f"of {max_bytes}")
    elif parts:
        yield from _parse(start, b"".join(parts), encoding)


def _parse(start: int, data: bytes, encoding: str) -> Iterator[Record]:
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        yield Record(start, None, "not_utf8", f"row is not {encoding} text (byte {exc.start}); convert the file "
                                              "(e.g. iconv) and retry")
        return
    reader = csv.reader(io.StringIO(text, newline=""))
    done = 0
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield Record(start + done, None, "bad_csv", f"row cannot be parsed as CSV ({exc})")
            return
        if fields:
            yield Record(start + done, fields)
        done = reader.line_num

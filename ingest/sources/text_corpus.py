"""Text corpora: JSONL (one object a line) or CSV, each row with ``id`` and ``text``.

Every other field becomes metadata (nested values are stored as JSON strings). Rows without an
id or text, and lines that are not JSON, are rejected with the file and line number. With a
chunker, a row longer than the chunk size becomes chunk items ``<id>#c<n>`` whose ``parent_id``
names the row.

Bounds (:class:`TextCorpusConfig`): a row (a JSONL line, the lines of a CSV record) longer than
``max_row_bytes`` is skipped without being held in memory and rejected ``too_long``, as is a text
longer than ``max_text_chars``; rows after the first ``max_rows`` are rejected together
(``too_many_rows``). The rest of the corpus goes on.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from caselens.errors import ConfigError, SourceError
from caselens.ingest.chunking import Chunker, chunk_item
from caselens.ingest.items import Item, Rejection
from caselens.ingest.source_paths import PathNamer, check_mode
from caselens.ingest.sources.bounded import bounded_lines, csv_records

SUFFIXES = (".jsonl", ".csv", ".ndjson")


@dataclass(frozen=True)
class TextCorpusConfig:
    """Bounds on what a corpus row may hold, and how the corpus file is named in the collection."""

    max_rows: int = 50_000_000  # rows read at most; the rest are rejected together (too_many_rows)
    max_row_bytes: int = 4 << 20  # bytes of one row (JSONL line / CSV record); longer: too_long
    max_text_chars: int = 1_000_000  # characters of one row's text (about a 400-page book); longer: too_long
    source_paths: str | None = None  # "relative" | "hashed" | "none"; None: the collection's (see source_paths)

    def __post_init__(self) -> None:
        for name in ("max_rows", "max_row_bytes", "max_text_chars"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        check_mode(self.source_paths)


class TextCorpusSource:
    """Rows of a JSONL or CSV file as text items."""

    kind = "text"
    pseudonymised_patients = False  # corpora carry no patient ids that caselens pseudonymises

    def __init__(self, path: Path, id_field: str = "id", text_field: str = "text", limit: int | None = None,
                 chunker: Chunker | None = None, config: TextCorpusConfig | None = None):
        self.path = Path(path).expanduser()
        if self.path.is_dir():
            raise SourceError(f"text corpus {path} is a folder; give a .jsonl or .csv file (or a folder of "
                              ".txt/.md files to --text)")
        if not self.path.is_file():
            raise SourceError(f"text corpus {path} does not exist")
        if self.path.suffix.lower() not in SUFFIXES:
            raise SourceError(f"text corpus {path}: use a .jsonl or .csv file with '{id_field}' and '{text_field}'")
        self.id_field, self.text_field, self.limit = id_field, text_field, limit
        self.chunker = chunker  # rows longer than its size become chunk items "<id>#c<n>"
        self.config = config or TextCorpusConfig()
        self.paths = PathNamer()  # how the corpus file is named; set for the collection by the runner

    @property
    def is_csv(self) -> bool:
        return self.path.suffix.lower() == ".csv"

    def input_record(self) -> dict[str, Any]:
        """The corpus file and how its rows were read, for the collection's local inputs file
        (:mod:`caselens.ingest.inputs`: how ``verify --repair --reingest`` reads it again)."""
        self.paths.name(self.path.name)  # a hashed collection maps the corpus file's name too
        return {"kind": "text", "root": str(self.path.resolve().parent), "file": self.path.name,
                "id_field": self.id_field, "text_field": self.text_field, "limit": self.limit,
                **self.paths.record()}

    def estimate(self) -> int | None:
        n = 0
        with self.path.open("rb") as fh:  # counted in blocks: a huge line is never held whole
            for block in iter(lambda: fh.read(1 << 20), b""):
                n += block.count(b"\n")
        n = n - 1 if self.is_csv else n
        n = min(n, self.config.max_rows)
        return min(n, self.limit) if self.limit else n

    def _rows(self) -> Iterator[tuple[int, dict[str, Any] | None, str, str]]:
        """(line, row or None, reason code, reason) of every row."""
        max_bytes = self.config.max_row_bytes
        with self.path.open("rb") as fh:
            if self.is_csv:
                header: list[str] | None = None
                for rec in csv_records(fh, max_bytes):
                    if header is None:
                        if rec.fields is None:
                            raise SourceError(f"text corpus {self.path.name}: its header line cannot be read "
                                              f"({rec.reason})")
                        header = rec.fields
                        continue
                    if rec.fields is None:
                        yield rec.line, None, rec.code, rec.reason
                        continue
                    yield rec.line, dict(zip(header, rec.fields)), "", ""  # fields past the header: dropped
                return
            for line in bounded_lines(fh, max_bytes):
                if line.data is None:
                    yield line.number, None, "too_long", (f"line is {line.size} bytes, more than the limit of "
                                                          f"{max_bytes}")
                    continue
                if not line.data.strip():
                    continue
                try:
                    obj = json.loads(line.data)
                except UnicodeDecodeError:
                    yield line.number, None, "not_utf8", "line is not UTF-8 text"
                    continue
                except json.JSONDecodeError as exc:
                    yield line.number, None, "bad_json", f"line is not valid JSON ({exc.msg})"
                    continue
                except RecursionError:
                    yield line.number, None, "bad_json", "line nests JSON values too deeply"
                    continue
                if not isinstance(obj, dict):
                    yield line.number, None, "bad_json", "line is not a JSON object"
                    continue
                yield line.number, obj, "", ""

    def _limited_rows(self) -> Iterator[tuple[int, dict[str, Any] | None, str, str]]:
        """:meth:`_rows` up to ``limit`` rows; past ``max_rows``, one ``too_many_rows`` rejection."""
        for count, entry in enumerate(self._rows()):
            if self.limit is not None and count >= self.limit:
                break
            if count >= self.config.max_rows:
                yield entry[0], None, "too_many_rows", (f"the corpus has more than {self.config.max_rows} rows; "
                                                        "the rest from this line on is not read (split the corpus)")
                break
            yield entry

    def __iter__(self) -> Iterator[Item | Rejection]:
        empty = True
        for entry in self._limited_rows():  # streamed: one row at a time
            empty = False
            yield from self.read_part({"rows": [entry]})
        if empty:
            yield from self.read_part(self._empty)

    # A distributed ingest reads the rows once here (``parts``, on the driver: parsing is cheap
    # next to embedding) and builds and chunks items elsewhere (``read_part``).
    def parts(self, size: int = 0) -> list[dict[str, Any]]:
        """The rows (``limit`` applied) in groups of ``size`` (0: one group):
        ``{"rows": [(line, row or None, code, problem), ...]}``, or an ``empty_source`` rejection."""
        rows = list(self._limited_rows())
        if not rows:
            return [self._empty]
        return [{"rows": rows[i:i + size]} for i in range(0, len(rows), size)] if size else [{"rows": rows}]

    def read_part(self, part: dict[str, Any]) -> Iterator[Item | Rejection]:
        """Items (chunked) and rejections of one group of :meth:`parts`, in order."""
        name = self.paths.name(self.path.name)
        max_chars = self.config.max_text_chars
        if "reject" in part:
            yield Rejection(name, *part["reject"])
        for line, row, code, problem in part.get("rows", ()):
            ref = f"{name}:{line}" + ("-" if code == "too_many_rows" else "")
            if row is None:
                yield Rejection(ref, code, problem)
                continue
            item_id = str(row.get(self.id_field) or "").strip()
            text = row.get(self.text_field)
            if not item_id:
                yield Rejection(ref, "missing_id", f"row has no '{self.id_field}'")
                continue
            if not isinstance(text, str) or not text.strip():
                yield Rejection(ref, "empty_text", f"row {item_id!r} has no '{self.text_field}' text")
                continue
            if len(text) > max_chars:
                yield Rejection(ref, "too_long", f"row {item_id!r} has {len(text)} characters of text, more than "
                                f"the limit of {max_chars}; split it into several rows")
                continue
            meta = {k: (v if isinstance(v, (str, int, float)) and not isinstance(v, bool) else json.dumps(v))
                    for k, v in row.items() if k not in (self.id_field, self.text_field)
                    and v not in (None, "")}
            yield from chunk_item(Item(id=item_id, kind="text", input=ref, source=name, text=text.strip(),
                                       metadata=meta, provenance={"file": name, "line": line}),
                                  self.chunker)

    @property
    def _empty(self) -> dict[str, Any]:
        return {"reject": ("empty_source", "corpus holds no rows")}

    def part_reader(self) -> "TextCorpusSource":
        """A copy that reads parts, without its chunker (its tokenizer belongs to the encoder: set
        ``chunker`` on the copy where it runs) and without the collection's key (its path naming
        takes the key where it runs)."""
        reader = copy.copy(self)
        reader.chunker, reader.paths = None, self.paths.without_secret()
        return reader

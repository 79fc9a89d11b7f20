"""Text corpora: JSONL (one object a line) or CSV, each row with ``id`` and ``text``.

Every other field becomes metadata (nested values are stored as JSON strings). Rows without an
id or text, and lines that are not JSON, are rejected with the file and line number. With a
chunker, a row longer than the chunk size becomes chunk items ``<id>#c<n>`` whose ``parent_id``
names the row.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from typing import Any, Iterator

from caselens.errors import SourceError
from caselens.ingest.chunking import Chunker, chunk_item
from caselens.ingest.items import Item, Rejection


class TextCorpusSource:
    """Rows of a JSONL or CSV file as text items."""

    kind = "text"

    def __init__(self, path: Path, id_field: str = "id", text_field: str = "text", limit: int | None = None,
                 chunker: Chunker | None = None):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise SourceError(f"text corpus {path} does not exist")
        if self.path.suffix.lower() not in (".jsonl", ".csv", ".ndjson"):
            raise SourceError(f"text corpus {path}: use a .jsonl or .csv file with '{id_field}' and '{text_field}'")
        self.id_field, self.text_field, self.limit = id_field, text_field, limit
        self.chunker = chunker  # rows longer than its size become chunk items "<id>#c<n>"

    def estimate(self) -> int | None:
        with self.path.open("rb") as fh:
            n = sum(1 for _ in fh)
        n = n - 1 if self.path.suffix.lower() == ".csv" else n
        return min(n, self.limit) if self.limit else n

    def _rows(self) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
        with self.path.open(encoding="utf-8", newline="") as fh:
            if self.path.suffix.lower() == ".csv":
                for line, row in enumerate(csv.DictReader(fh), start=2):
                    yield line, row, ""
            else:
                for line, raw in enumerate(fh, start=1):
                    if not raw.strip():
                        continue
                    try:
                        obj = json.loads(raw)
                    except json.JSONDecodeError as exc:
                        yield line, None, f"line is not valid JSON ({exc.msg})"
                        continue
                    yield line, obj if isinstance(obj, dict) else None, "" if isinstance(obj, dict) else "line is not a JSON object"

    def _limited_rows(self) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
        for count, entry in enumerate(self._rows()):
            if self.limit is not None and count >= self.limit:
                break
            yield entry

    def __iter__(self) -> Iterator[Item | Rejection]:
        empty = True
        for entry in self._limited_rows():
            empty = False
            yield from self.read_part({"rows": [entry]})
        if empty:
            yield from self.read_part(self._empty)

    # A distributed ingest reads the rows once here (``parts``, on the driver: parsing is cheap
    # next to embedding) and builds and chunks items elsewhere (``read_part``).
    def parts(self, size: int = 0) -> list[dict[str, Any]]:
        """The rows (``limit`` applied) in groups of ``size`` (0: one group):
        ``{"rows": [(line, row or None, problem), ...]}``, or an ``empty_source`` rejection."""
        rows = list(self._limited_rows())
        if not rows:
            return [self._empty]
        return [{"rows": rows[i:i + size]} for i in range(0, len(rows), size)] if size else [{"rows": rows}]

    def read_part(self, part: dict[str, Any]) -> Iterator[Item | Rejection]:
        """Items (chunked) and rejections of one group of :meth:`parts`, in order."""
        if "reject" in part:
            yield Rejection(*part["reject"])
        for line, row, problem in part.get("rows", ()):
            ref = f"{self.path.name}:{line}"
            if row is None:
                yield Rejection(ref, "bad_json", problem)
                continue
            item_id = str(row.get(self.id_field) or "").strip()
            text = row.get(self.text_field)
            if not item_id:
                yield Rejection(ref, "missing_id", f"row has no '{self.id_field}'")
                continue
            if not isinstance(text, str) or not text.strip():
                yield Rejection(ref, "empty_text", f"row {item_id!r} has no '{self.text_field}' text")
                continue
            meta = {k: (v if isinstance(v, (str, int, float)) and not isinstance(v, bool) else json.dumps(v))
                    for k, v in row.items() if k not in (self.id_field, self.text_field) and v not in (None, "")}
            yield from chunk_item(Item(id=item_id, kind="text", input=ref, source=self.path.name, text=text.strip(),
                                       metadata=meta, provenance={"file": self.path.name, "line": line}),
                                  self.chunker)

    @property
    def _empty(self) -> dict[str, Any]:
        return {"reject": (self.path.name, "empty_source", "corpus holds no rows")}

    def part_reader(self) -> "TextCorpusSource":
        """A copy that reads parts, without its chunker (its tokenizer belongs to the encoder: set
        ``chunker`` on the copy where it runs)."""
        reader = copy.copy(self)
        reader.chunker = None
        return reader

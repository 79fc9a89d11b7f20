"""Search a collection by image, text or vector, with metadata filters applied before ranking.

Queries are encoded with the collection's own encoder (rebuilt from its stored record and checked
against its fingerprint). Filters (``where``, an SQL predicate over the metadata columns) and
exclusions (``exclude_same="patient_id"``: drop items of the query's own patient) select the
candidate rows first; small candidate sets are ranked exactly, large ones through the FAISS
index restricted to the candidates (an ID selector), so a filter never starves the top-k.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from caselens.errors import QueryError
from caselens.indexes.collection import Collection
from caselens.indexes.faiss_index import search_index
from caselens.ingest.items import Item, Rejection
from caselens.ingest.sources.image_folder import ImageSource
from caselens.retrieval.encoders import Encoder, load_from_record

EXACT_BELOW = 50_000  # filtered candidate sets up to this size are ranked exactly


@dataclass
class Hit:
    """One search result."""

    rank: int  # 1-based
    score: float  # cosine similarity (inner product of unit vectors)
    id: str  # item id
    kind: str  # "image" or "text"
    label: str | None  # the item's label, when it has one
    source: str | None  # path or corpus file it came from
    text: str | None = None  # text of text items
    metadata: dict[str, Any] = field(default_factory=dict)  # other metadata columns
    provenance: dict[str, Any] = field(default_factory=dict)  # file, frame, window, ...


@dataclass
class SearchResult:
    """Hits for one query, with what was searched and how long it took."""

    collection: str
    query: str  # what the query was ("image foo.png", "text '…'", "vector")
    encoder: str  # spec of the encoder used
    hits: list[Hit]
    candidates: int  # rows the ranking ran over after filters and exclusions
    milliseconds: float

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)


_ENCODERS: dict[str, Encoder] = {}


def collection_encoder(collection: Collection) -> Encoder:
    """The collection's own encoder, loaded once per process and checked against its fingerprint."""
    record = collection.encoder
    key = record["fingerprint"]
    if key not in _ENCODERS:
        encoder = load_from_record(record)
        collection.check_encoder(encoder.info.to_record())
        _ENCODERS[key] = encoder
    return _ENCODERS[key]


def _quote(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(float(value))
    return "'" + str(value).replace("'", "''") + "'"


def _check_column(collection: Collection, column: str) -> None:
    if column not in collection.columns():
        raise QueryError(f"collection {collection.name!r} has no column {column!r}; "
                         f"metadata columns: {', '.join(collection.metadata_columns())}")


def _predicate(collection: Collection, where: str | None, exclude: dict[str, Any] | None,
               exclude_ids: list[str] | None) -> str | None:
    parts = [f"({where})"] if where else []
    for column, value in (exclude or {}).items():
        _check_column(collection, column)
        if value is not None:
            parts.append(f"({column} IS NULL OR {column} <> {_quote(value)})")
    if exclude_ids:
        parts.append("id NOT IN (" + ",".join(_quote(i) for i in exclude_ids) + ")")
    return " AND ".join(parts) or None


def search_vector(collection: Collection, query: np.ndarray, k: int = 10, where: str | None = None,
                  exclude: dict[str, Any] | None = None, exclude_ids: list[str] | None = None,
                  query_desc: str = "vector", encoder_spec: str | None = None) -> SearchResult:
    """Top-``k`` items for one unit ``query`` vector, after ``where`` and exclusions."""
    start = time.perf_counter()
    if k < 1:
        raise QueryError(f"k must be at least 1, got {k}")
    query = np.asarray(query, np.float32).reshape(1, -1)
    if query.shape[1] != collection.dim:
        raise QueryError(f"query vector has dimension {query.shape[1]}, collection {collection.name!r} has {collection.dim}")
    predicate = _predicate(collection, where, exclude, exclude_ids)
    if predicate is None:
        index, _ = collection.index()
        scores, rows = search_index(index, query, k)
        candidates = index.ntotal
    else:
        try:
            row_ids = collection.rows(predicate, ["_row"]).column("_row").to_numpy()
        except Exception as exc:  # LanceDB raises several types for a bad predicate
            raise QueryError(f"filter {predicate!r} could not be applied: {exc}") from None
        candidates = len(row_ids)
        if candidates <= EXACT_BELOW:
            row_ids, vectors = collection.vectors(predicate)
            sims = vectors @ query[0]
            top = np.argsort(-sims, kind="stable")[:k]
            scores, rows = sims[top][None], row_ids[top][None]
        else:
            index, _ = collection.index()
            scores, rows = search_index(index, query, k, allowed_ids=row_ids)
    found = [(float(s), int(r)) for s, r in zip(scores[0], rows[0]) if r >= 0]
    meta = collection.rows_by_row_ids([r for _, r in found])
    hits = []
    for rank, (score, row) in enumerate(found, start=1):
        rec = meta.get(row)
        if rec is None:  # the table moved on since the index was read; skip, never invent
            continue
        extra = {c: rec[c] for c in rec if c not in ("id", "_row", "kind", "source", "text", "provenance", "label")
                 and rec[c] is not None}
        hits.append(Hit(rank=rank, score=score, id=rec["id"], kind=rec["kind"], label=rec.get("label"),
                        source=rec.get("source"), text=rec.get("text"), metadata=extra,
                        provenance=json.loads(rec.get("provenance") or "{}")))
    return SearchResult(collection=collection.name, query=query_desc,
                        encoder=encoder_spec or collection.encoder["spec"], hits=hits, candidates=candidates,
                        milliseconds=(time.perf_counter() - start) * 1000)


def read_query_image(path: Path, collection: Collection) -> Item:
    """Read a query image (or DICOM file) exactly as ingest would, so its id matches a stored copy."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise QueryError(f"query image {path} does not exist")
    result = ImageSource(root=path.parent, secret=collection.secret()).read(path.resolve(), {})
    if isinstance(result, Rejection):
        raise QueryError(f"query image {path} cannot be read: {result.reason} ({result.reason_code})")
    return result


def search(collection: Collection, *, image: Path | None = None, text: str | None = None, k: int = 10,
           where: str | None = None, exclude_same: str | None = None) -> SearchResult:
    """Search ``collection`` with an image file or a text query (exactly one)."""
    if (image is None) == (text is None):
        raise QueryError("give exactly one query: an image path or a text")
    encoder = collection_encoder(collection)
    exclude: dict[str, Any] = {}
    if image is not None:
        item = read_query_image(image, collection)
        vector = encoder.encode_images([item.image])
        desc = f"image {Path(image).name}"
        if exclude_same:
            _check_column(collection, exclude_same)
            stored = collection.rows(f"id = {_quote(item.id)}", [exclude_same], limit=1).to_pylist()
            value = stored[0][exclude_same] if stored else item.metadata.get(exclude_same)
            if value is None:
                raise QueryError(f"--exclude-same {exclude_same}: the query image has no {exclude_same} "
                                 "(it is not in the collection and its file does not say)")
            exclude[exclude_same] = value
    else:
        if not text or not text.strip():
            raise QueryError("text query is empty")
        if exclude_same:
            raise QueryError("--exclude-same needs an image query whose metadata names the value to exclude")
        vector = encoder.encode_queries([text])
        desc = f"text {text!r}"
    return search_vector(collection, vector[0], k, where, exclude, query_desc=desc, encoder_spec=encoder.info.spec)

"""Search a collection by image, text or vector, with metadata filters applied before ranking.

Queries are encoded with the collection's own encoder (rebuilt from its stored record and checked
against its fingerprint). Filters (``where``, an SQL predicate over the metadata columns) and
exclusions (``exclude_same="patient_id"``: drop items of the query's own patient) select the
candidate rows first; the FAISS index then ranks only the candidates (a bitmap ID selector, with
``nprobe`` widened by the selectivity), and HNSW indexes rank small candidate sets exactly, so a
filter never starves the top-k.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from caselens.errors import QueryError
from caselens.indexes.collection import Collection
from caselens.indexes import faiss_index
from caselens.indexes.faiss_index import search_index
from caselens.ingest.items import Item, Rejection
from caselens.ingest.sources.image_folder import ImageSource
from caselens.ingest.encoders import Encoder, load_from_record

EXACT_BELOW = 50_000  # with an HNSW index, filtered candidate sets up to this size are ranked exactly


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
    mode: str = "dense"  # "dense" (score: cosine), "bm25" (score: BM25) or "hybrid" (score: fused RRF)

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


def candidate_rows(collection: Collection, predicate: str) -> np.ndarray:
    """``_row`` numbers of the rows matching ``predicate`` (:class:`QueryError` for a bad one)."""
    try:
        return collection.rows(predicate, ["_row"]).column("_row").to_numpy()
    except Exception as exc:  # LanceDB raises several types for a bad predicate
        raise QueryError(f"filter {predicate!r} could not be applied: {exc}") from None


def dense_rows(collection: Collection, query: np.ndarray, k: int,
               predicate: str | None = None) -> tuple[list[tuple[float, int]], int]:
    """Top-``k`` (cosine, ``_row``) for one unit ``query`` vector among the rows matching
    ``predicate``, and how many candidate rows were ranked."""
    query = np.asarray(query, np.float32).reshape(1, -1)
    if predicate is None:
        index, stamp = collection.index()
        scores, rows = search_index(index, query, k, params=stamp.params, deleted=stamp.deleted)
        candidates = stamp.live
    else:
        row_ids = candidate_rows(collection, predicate)
        candidates = len(row_ids)
        index, stamp = collection.index()
        # FAISS restricted to the candidates (a bitmap ID selector) scores Flat and IVF indexes
        # over the filtered set alone, nprobe widened by the selectivity up to every list; an
        # HNSW graph cannot be walked through a sparse filter, so small sets are ranked exactly.
        if candidates <= EXACT_BELOW and faiss_index.hnsw_of(index) is not None:
            row_ids, vectors = collection.vectors_for_rows(row_ids)  # by row address, no second scan
            sims = vectors @ query[0]
            top = np.argsort(-sims, kind="stable")[:k]
            scores, rows = sims[top][None], row_ids[top][None]
        else:
            scores, rows = search_index(index, query, k, allowed_ids=row_ids, params=stamp.params,
                                        deleted=stamp.deleted)
    return [(s, r) for s, r in zip(scores[0].tolist(), rows[0].tolist()) if r >= 0], candidates


_NOT_METADATA = frozenset(("id", "_row", "kind", "source", "text", "provenance", "label"))
_LAYOUTS: dict[tuple[str, ...], tuple] = {}  # column names -> where each Hit field is in a row's values


def _layout(names: tuple[str, ...]) -> tuple:
    layout = _LAYOUTS.get(names)
    if layout is None:
        at = {c: i for i, c in enumerate(names)}
        metadata = tuple((i, c) for i, c in enumerate(names) if c not in _NOT_METADATA)
        layout = (at["_row"], at["id"], at["kind"], at.get("label"), at.get("source"), at.get("text"),
                  at.get("provenance"), metadata)
        if len(_LAYOUTS) > 64:
            _LAYOUTS.clear()
        _LAYOUTS[names] = layout
    return layout


def hits_for_rows(collection: Collection, found: list[tuple[float, int]]) -> list[Hit]:
    """Hits for ranked (score, ``_row``) pairs, with their stored text, metadata and provenance."""
    rows = [r for _, r in found]
    cached = collection.row_values(rows)
    if cached is None:  # no in-memory copy of the table: rows read from LanceDB
        meta = collection.rows_by_row_ids(rows)
        names = tuple(next(iter(meta.values()))) if meta else ("_row", "id", "kind")
        cached = names, [[meta[r][c] for c in names] if r in meta else None for r in rows]
    names, values = cached
    _, i_id, i_kind, i_label, i_source, i_text, i_prov, metadata = _layout(names)
    hits = []
    for rank, ((score, _), v) in enumerate(zip(found, values), start=1):
        if v is None:  # the table moved on since the index was read; skip, never invent
            continue
        provenance = v[i_prov] if i_prov is not None else None
        hits.append(Hit(rank, score, v[i_id], v[i_kind],  # rank, score, id, kind, label, source, text
                        v[i_label] if i_label is not None else None,
                        v[i_source] if i_source is not None else None,
                        v[i_text] if i_text is not None else None,
                        {c: v[i] for i, c in metadata if v[i] is not None},  # metadata
                        json.loads(provenance) if provenance and provenance != "{}" else {}))  # provenance
    return hits


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
    found, candidates = dense_rows(collection, query, k, predicate)
    hits = hits_for_rows(collection, found)
    return SearchResult(collection=collection.name, query=query_desc,
                        encoder=encoder_spec or collection.encoder["spec"], hits=hits, candidates=candidates,
                        milliseconds=(time.perf_counter() - start) * 1000)


def read_query_image(path: Path, collection: Collection) -> Item:
    """Read a query image (or DICOM file) exactly as ingest would, so its id matches a stored copy."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise QueryError(f"query image {path} does not exist")
    from caselens.ingest.sources.dicom import DicomOptions

    options = DicomOptions(window=collection.encoder.get("window", "auto"))  # as the collection's items were read
    result = ImageSource(root=path.parent, secret=collection.secret(), dicom_options=options).read(path.resolve(), {})
    if isinstance(result, Rejection):
        raise QueryError(f"query image {path} cannot be read: {result.reason} ({result.reason_code})")
    return result


MODES = ("dense", "bm25", "hybrid")  # text search: vectors, keywords (BM25), or both fused (RRF)


def search(collection: Collection, *, image: Path | None = None, text: str | None = None, k: int = 10,
           where: str | None = None, exclude_same: str | None = None, mode: str = "dense") -> SearchResult:
    """Search ``collection`` with an image file or a text query (exactly one). Text queries can
    rank by ``mode``: "dense" (the encoder), "bm25" (keywords) or "hybrid" (both, fused)."""
    if (image is None) == (text is None):
        raise QueryError("give exactly one query: an image path or a text")
    if mode not in MODES:
        raise QueryError(f"search mode {mode!r} is not known; use one of {', '.join(MODES)}")
    if mode != "dense" and image is not None:
        raise QueryError(f"--mode {mode} ranks texts by their words; an image query needs --mode dense")
    if mode != "dense":
        if not text or not text.strip():
            raise QueryError("text query is empty")
        if exclude_same:
            raise QueryError("--exclude-same needs an image query whose metadata names the value to exclude")
        from caselens.retrieval.fusion import keyword_search

        return keyword_search(collection, text, k=k, where=where, mode=mode)
    encoder = collection_encoder(collection)
    exclude: dict[str, Any] = {}
    if image is not None:
        item = read_query_image(image, collection)
        vector = encoder.encode_images([item.image])
        desc = f"image {item.id}"  # its content id: a file name may name a patient
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
    if collection.encoder.get("pooling"):  # series pooled by max/mean concatenation: shape the query alike
        from caselens.ingest.volumes import query_vectors

        vector = query_vectors(vector, collection.encoder["pooling"])
    return search_vector(collection, vector[0], k, where, exclude, query_desc=desc, encoder_spec=encoder.info.spec)

"""Search a collection by image, text, item id or vector, with metadata filters applied before ranking.

Queries are encoded with the collection's own encoder (rebuilt from its stored record and checked
against its fingerprint). Every search reads one snapshot of the latest committed table version
without the write lock (:class:`caselens.indexes.reader.Reader`): filters (``where``, an SQL
predicate over the metadata columns) and exclusions (``exclude_same="patient_id"``: drop items of
the query's own patient) select that snapshot's candidate rows first; the last stamped FAISS
index ranks the candidates it holds (a bitmap ID selector, ``nprobe`` widened by the
selectivity; HNSW indexes rank small candidate sets exactly) and the rows committed since it
was stamped are ranked exactly, so a filter never starves the top-k and a search during an
ingest sees everything committed before it began.
"""

from __future__ import annotations

import io
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from caselens.csv_safe import write_csv
from caselens.errors import QueryError
from caselens.indexes.collection import Collection, quote
from caselens.indexes.reader import ReadView, reader_of
from caselens.indexes.snapshot import Snapshot
from caselens.ingest.deid import pseudonym
from caselens.ingest.encoders import Encoder, load_from_record
from caselens.ingest.items import Item, Rejection
from caselens.ingest.embed import encode_items
from caselens.ingest.sources.dicom import DicomOptions
from caselens.ingest.sources.dicom_source import DicomSource, DicomSourceConfig
from caselens.ingest.sources.image_folder import ImageSource
from caselens.retrieval.report import HtmlView, hits_grid, hits_html

MODES = ("dense", "bm25", "hybrid")  # text search: vectors, keywords (BM25), or both fused (RRF)
SCORE_MEANING = {"dense": "cosine similarity", "bm25": "BM25 score", "hybrid": "reciprocal rank fusion score"}
ImageQuery = Path | str | bytes | Image.Image


class ExclusionUnknownError(QueryError):
    """``exclude_same`` asked for a value the query does not have (an outside image, no patient named)."""


@dataclass
class Hit:
    """One search result."""

    rank: int  # 1-based
    score: float  # cosine similarity (dense), BM25 score or fused RRF score (see SearchResult.mode)
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
    query: str  # what the query was ("image foo.png", "text '…'", "vector", "item <id>")
    encoder: str  # spec of the encoder used
    hits: list[Hit]
    candidates: int  # rows the ranking ran over after filters and exclusions
    milliseconds: float
    mode: str = "dense"  # "dense" (score: cosine), "bm25" (score: BM25) or "hybrid" (score: fused RRF)
    table_version: int = 0  # the table version searched (a snapshot)

    def __post_init__(self) -> None:
        self._searched: Collection | None = None  # set by bind(); not part of the record

    @property
    def score_meaning(self) -> str:
        """What :attr:`Hit.score` is in this result."""
        return SCORE_MEANING.get(self.mode, self.mode)

    def __len__(self) -> int:
        return len(self.hits)

    def __iter__(self):  # noqa: ANN204
        return iter(self.hits)

    def __getitem__(self, i: int) -> Hit:
        return self.hits[i]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def records(self) -> list[dict[str, Any]]:
        """One flat dict per hit: rank, score, id, kind, label, source, text, then metadata columns
        and ``provenance`` as JSON text."""
        out = []
        for h in self.hits:
            row = {"rank": h.rank, "score": h.score, "id": h.id, "kind": h.kind, "label": h.label,
                   "source": h.source, "text": h.text}
            row.update({k: v for k, v in h.metadata.items() if k not in row})
            row["provenance"] = json.dumps(h.provenance, sort_keys=True)
            out.append(row)
        return out

    def to_csv(self, path: str | Path) -> int:
        """Write :meth:`records` to a CSV file (atomically); cells that a spreadsheet would run as
        formulas (``=cmd|...`` from a manifest) are neutralised (:mod:`caselens.csv_safe`).
        Returns the rows written."""
        records = self.records()
        columns = ["rank", "score", "id", "kind", "label", "source", "text"]
        columns += sorted({k for r in records for k in r} - set(columns) - {"provenance"}) + ["provenance"]
        return write_csv(path, columns, records)

    def to_arrow(self) -> pa.Table:
        """The hits as an Arrow table (one row per hit; see :meth:`records`)."""
        records = self.records()
        if not records:
            return pa.table({"rank": pa.array([], pa.int64()), "score": pa.array([], pa.float64()),
                             "id": pa.array([], pa.string())})
        return pa.Table.from_pylist(records)

    def to_pandas(self) -> Any:
        """The hits as a pandas DataFrame (needs pandas)."""
        return self.to_arrow().to_pandas()

    def bind(self, collection: Collection) -> "SearchResult":
        """Remember the collection searched, so :meth:`show` can find the hits' images."""
        self._searched = collection
        return self

    def show(self, size: int = 160, query_image: str | Path | None = None) -> HtmlView:
        """The hits as an image grid with scores and labels (shown inline in a notebook; ``.save(path)``
        writes a self-contained HTML file)."""
        return HtmlView(hits_html(self, self._bound(), size, query_image), title=f"caselens: {self.query}")

    def grid(self, size: int = 150, query_image: ImageQuery | None = None, title: str | None = None) -> Image.Image:
        """The hits as one picture: a row of thumbnails captioned with rank, score and label (or
        modality), after the query framed green when ``query_image`` is given (anything
        :meth:`caselens.Collection.search` takes: a DICOM file is decoded as ingest does). A PIL
        image: Jupyter shows it inline as a PNG, so it stays visible where HTML is not rendered
        (a notebook on GitHub, a PDF export); ``.save("hits.png")`` writes it."""
        collection = self._bound()
        query = None if query_image is None else read_query_image(query_image, collection).image
        return hits_grid(self, collection, size, query, title)

    def _bound(self) -> Collection:
        if self._searched is None:
            raise QueryError("this result does not know its collection; search through caselens.open(...).search "
                             "or call result.bind(collection) first")
        return self._searched


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


def _check_column(collection: Collection, snapshot: Snapshot, column: str) -> None:
    if column not in snapshot.columns:
        raise QueryError(f"collection {collection.name!r} has no column {column!r}; metadata columns: "
                         f"{', '.join(c for c in snapshot.columns if c not in ('id', '_row', 'kind', 'source', 'text', 'provenance'))}")


def predicate(collection: Collection, snapshot: Snapshot, where: str | None, exclude: dict[str, Any] | None = None,
              exclude_ids: list[str] | None = None) -> str | None:
    """The SQL predicate of a search: ``where`` and, for each ``exclude`` column, rows whose value
    differs (or is missing), and no row of ``exclude_ids``."""
    parts = [f"({where})"] if where else []
    for column, value in (exclude or {}).items():
        _check_column(collection, snapshot, column)
        if value is not None:
            parts.append(f"({column} IS NULL OR {column} <> {quote(value)})")
    if exclude_ids:
        parts.append("id NOT IN (" + ",".join(quote(i) for i in exclude_ids) + ")")
    return " AND ".join(parts) or None


def dense_rows(collection: Collection, query: np.ndarray, k: int, predicate: str | None = None,
               view: ReadView | None = None) -> tuple[list[tuple[float, int]], int, Snapshot]:
    """Top-``k`` (cosine, ``_row``) for one unit ``query`` vector among the rows matching
    ``predicate`` in the latest snapshot (or ``view``'s, taken by the caller for this search), how
    many candidate rows were ranked, and the snapshot."""
    view = view or reader_of(collection).view()
    allowed = view.snapshot.selection(predicate) if predicate is not None else None
    found = view.rank(np.asarray(query, np.float32), k, allowed)
    return found, (len(view.snapshot) if allowed is None else len(allowed)), view.snapshot


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


def hits_for_rows(snapshot: Snapshot, found: list[tuple[float, int]]) -> list[Hit]:
    """Hits for ranked (score, ``_row``) pairs, with their stored text, metadata and provenance as of
    ``snapshot``."""
    values = snapshot.values([r for _, r in found])
    _, i_id, i_kind, i_label, i_source, i_text, i_prov, metadata = _layout(snapshot.names)
    hits = []
    for rank, ((score, _), v) in enumerate(zip(found, values), start=1):
        if v is None:  # not a row of this version: never invented
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
                  query_desc: str = "vector", encoder_spec: str | None = None,
                  view: ReadView | None = None) -> SearchResult:
    """Top-``k`` items for one unit ``query`` vector, after ``where`` and exclusions (in ``view``
    when the caller took one for this search, else in the latest snapshot)."""
    start = time.perf_counter()
    if k < 1:
        raise QueryError(f"k must be at least 1, got {k}")
    query = np.asarray(query, np.float32).reshape(1, -1)
    if query.shape[1] != collection.dim:
        raise QueryError(f"query vector has dimension {query.shape[1]}, collection {collection.name!r} has {collection.dim}")
    if not math.isfinite(query.sum(dtype=np.float64)):  # (float32 values cannot overflow a float64 sum)
        raise QueryError("query vector has NaN or infinite values")
    view = view or reader_of(collection).view()
    pred = predicate(collection, view.snapshot, where, exclude, exclude_ids)
    found, candidates, snapshot = dense_rows(collection, query, k, pred, view)
    return SearchResult(collection=collection.name, query=query_desc,
                        encoder=encoder_spec or collection.encoder["spec"], hits=hits_for_rows(snapshot, found),
                        candidates=candidates, milliseconds=(time.perf_counter() - start) * 1000,
                        table_version=snapshot.version).bind(collection)


def read_query_image(image: ImageQuery, collection: Collection) -> Item:
    """Read a query image (a path, the bytes of an uploaded file, or a PIL image) exactly as ingest
    would, so that its id matches a stored copy and DICOM metadata is pseudonymised with the
    collection's key."""
    if isinstance(image, Image.Image):
        return Item(id="", kind="image", input="query", source="query", image=image.convert("RGB")
                    if image.mode not in ("L", "RGB") else image)
    options = DicomOptions(window=collection.encoder.get("window", "auto"))  # as the collection's items were read
    if isinstance(image, (bytes, bytearray, memoryview, io.BytesIO)):
        data = image.getvalue() if isinstance(image, io.BytesIO) else bytes(image)
        if not data:
            raise QueryError("the query image is empty")
        with tempfile.TemporaryDirectory(prefix="caselens-query-") as tmp:
            path = Path(tmp) / "query"
            path.write_bytes(data)
            result = ImageSource(root=path.parent, secret=collection.secret(), dicom_options=options).read(path, {})
        name = "the uploaded image"
    else:
        path = Path(image).expanduser()
        if not path.is_file():
            raise QueryError(f"query image {path} does not exist")
        result = ImageSource(root=path.parent, secret=collection.secret(), dicom_options=options).read(path.resolve(), {})
        name = f"query image {path.name}"
    if isinstance(result, Rejection):
        raise QueryError(f"{name} cannot be read: {result.reason} ({result.reason_code})")
    return result


def read_query_series(folder: Path, collection: Collection, slices: int = 8) -> Item:
    """A DICOM folder holding one series (or one study) read as ingest reads a series or study unit:
    ``slices`` slices sampled, windowed like the collection's items, patient pseudonymised with its
    key, and pooled the collection's way when encoded (:func:`caselens.ingest.embed.encode_items`)."""
    options = DicomOptions(window=collection.encoder.get("window", "auto"))
    pooling = collection.encoder.get("pooling") or "mean"
    found: dict[str, int] = {}
    for unit in ("series", "study"):
        source = DicomSource(folder, collection.secret(), DicomSourceConfig(unit=unit, slices=slices, pooling=pooling,
                                                                            options=options))
        items = [r for r in source if isinstance(r, Item) and r.volume is not None]
        found[unit] = len(items)
        if len(items) == 1:
            return items[0]
    if not found["series"]:
        raise QueryError(f"query folder {folder.name} holds no readable DICOM series")
    raise QueryError(f"query folder {folder.name} holds {found['series']} series of {found['study']} studies; "
                     "point the query at one series (or one study) folder")


def _shape(collection: Collection, vectors: np.ndarray) -> np.ndarray:
    if collection.encoder.get("pooling"):  # series pooled by max/mean concatenation: shape the query alike
        from caselens.ingest.volumes import query_vectors

        return query_vectors(vectors, collection.encoder["pooling"])
    return vectors


@dataclass
class PreparedQuery:
    """One query made ready for ranking: its vector (of the collection's encoder; the reader adapts
    it), what it is, and what it leaves out."""

    vector: np.ndarray
    desc: str  # what the query is, for results ("image x.png", "item <id>", "text '...'")
    encoder_spec: str
    stored_id: str | None  # its item id when the query is (a copy of) a stored item
    exclude: dict[str, Any] = field(default_factory=dict)  # column -> value whose rows are left out
    exclude_ids: list[str] = field(default_factory=list)  # items left out (the query itself)


def prepare_query(collection: Collection, view: ReadView, *, image: ImageQuery | None = None, text: str | None = None,
                  vector: np.ndarray | None = None, item_id: str | None = None, exclude_same: str | None = None,
                  query_patient: str | None = None, exclude_self: bool = False,
                  require_exclusion: bool = True) -> PreparedQuery:
    """Embed or look up exactly one query in ``view``'s snapshot and work out its exclusions (see
    :func:`search`). With ``require_exclusion`` False, an ``exclude_same`` value that cannot be
    known leaves nothing out instead of raising :class:`ExclusionUnknownError`."""
    given = [name for name, q in (("image", image), ("text", text), ("vector", vector), ("id", item_id))
             if q is not None]
    if len(given) != 1:
        raise QueryError("give exactly one query: an image, a text, a vector or an item id"
                         + (f" (got {', '.join(given)})" if given else ""))
    if text is not None and not text.strip():
        raise QueryError("text query is empty")
    snapshot = view.snapshot
    exclude_ids: list[str] = []
    stored_id: str | None = None
    spec = collection.encoder["spec"]
    metadata: dict[str, Any] = {}
    if item_id is not None:
        row = snapshot.row_of(item_id)
        if row is None:
            raise QueryError(f"collection {collection.name!r} has no item {item_id!r}")
        _, vectors = snapshot.vectors(np.asarray([row]))
        query, stored_id, desc = vectors[0], item_id, f"item {item_id}"
        exclude_ids.append(item_id)
    elif vector is not None:
        query, desc = np.asarray(vector, np.float32).reshape(-1), "vector"
    else:
        encoder = collection_encoder(collection)
        spec = encoder.info.spec
        if image is not None and isinstance(image, (str, Path)) and Path(image).expanduser().is_dir():
            item = read_query_series(Path(image).expanduser(), collection)  # a series or study folder
            query = encode_items(encoder, [item])[0]
            desc = f"{item.provenance.get('unit', 'series')} {item.id} ({len(item.volume.slices)} slices)"  # not its folder's name
            stored_id, metadata = (item.id or None), item.metadata
            if exclude_self and stored_id and snapshot.row_of(stored_id) is not None:
                exclude_ids.append(stored_id)
        elif image is not None:
            item = read_query_image(image, collection)
            query = _shape(collection, encoder.encode_images([item.image]))[0]
            desc = f"image {item.id}" if item.id else "image"  # its content id: a file name may name a patient
            stored_id, metadata = (item.id or None), item.metadata
            if exclude_self and stored_id and snapshot.row_of(stored_id) is not None:
                exclude_ids.append(stored_id)
        else:
            query = _shape(collection, encoder.encode_queries([text]))[0]
            desc = f"text {text!r}"
    exclude: dict[str, Any] = {}
    if exclude_same:
        _check_column(collection, snapshot, exclude_same)
        value = None
        row = snapshot.row_of(stored_id) if stored_id else None
        if row is not None:
            value = snapshot.row_dicts([row]).get(row, {}).get(exclude_same)
        if value is None:
            value = metadata.get(exclude_same)
        if value is None and query_patient is not None:
            value = pseudonym(str(query_patient), collection.secret(), "patient")
        if value is None and require_exclusion:
            raise ExclusionUnknownError(f"exclude_same {exclude_same}: the query has no {exclude_same} (it is not in the "
                             "collection and its file does not say); name the patient with query_patient "
                             "(--query-patient)")
        if value is not None:
            exclude[exclude_same] = value
    return PreparedQuery(query, desc, spec, stored_id, exclude, exclude_ids)


def search(collection: Collection, *, image: ImageQuery | None = None, text: str | None = None,
           vector: np.ndarray | None = None, item_id: str | None = None, k: int = 10, where: str | None = None,
           exclude_same: str | None = None, query_patient: str | None = None, exclude_self: bool = False,
           mode: str = "dense") -> SearchResult:
    """Search ``collection`` with exactly one query: an ``image`` (path, uploaded bytes or PIL image),
    a ``text``, a ``vector`` or a stored item's ``item_id`` (the item itself is left out).

    ``exclude_same`` names a column (e.g. ``patient_id``) whose value the query shares with items
    to leave out: taken from the stored item when the query is in the collection, else from the
    query file (DICOM), else from ``query_patient`` (a patient id of an outside query,
    pseudonymised with the collection's key). ``exclude_self`` leaves out the stored copy of a
    query image. Text queries rank by ``mode``: "dense" (the encoder), "bm25" (keywords) or
    "hybrid" (both, fused). A collection with an adapter is searched in the adapter's space."""
    given = [name for name, q in (("image", image), ("text", text), ("vector", vector), ("id", item_id))
             if q is not None]
    if len(given) != 1:
        raise QueryError("give exactly one query: an image, a text, a vector or an item id"
                         + (f" (got {', '.join(given)})" if given else ""))
    if mode not in MODES:
        raise QueryError(f"search mode {mode!r} is not known; use one of {', '.join(MODES)}")
    if mode != "dense" and text is None:
        raise QueryError(f"mode {mode} ranks texts by their words; an {given[0]} query needs mode dense")
    if text is not None and not text.strip():
        raise QueryError("text query is empty")
    if query_patient is not None and exclude_same != "patient_id":
        raise QueryError("query_patient names the query's patient for exclude_same='patient_id'; give both")
    if mode != "dense":
        if exclude_same:
            raise QueryError("exclude_same needs an image or item query whose metadata names the value to exclude")
        from caselens.retrieval.fusion import keyword_search

        return keyword_search(collection, text, k=k, where=where, mode=mode)
    view = reader_of(collection).view()  # one snapshot for the whole search
    q = prepare_query(collection, view, image=image, text=text, vector=vector, item_id=item_id,
                      exclude_same=exclude_same, query_patient=query_patient, exclude_self=exclude_self)
    return search_vector(collection, q.vector, k, where, q.exclude, q.exclude_ids or None, query_desc=q.desc,
                         encoder_spec=q.encoder_spec, view=view)

"""The only module of the HTTP service that calls the caselens library.

Every endpoint goes through :class:`Backend`; nothing else in ``caselens.retrieval.serve``
imports search, ask, ingest or the collection class. When the public Python API
(``caselens.api``: ``caselens.open``, ``col.search(image=bytes, id=…, text=…)``, ``col.ask``,
``col.ingest``, ``col.info``, ``col.ledger``, ``col.diagnose``) lands, each method here becomes
a call into it; the methods marked ``API:`` say which.

Collections are opened once and kept (with their encoder, FAISS index and joined metadata warm)
for the life of the service; ingest jobs open their own handle, so a reader's caches are never
touched by a writer.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from caselens.errors import CollectionNotFoundError, QueryError, SourceError
from caselens.files import atomic_write_bytes
from caselens.indexes.collection import Collection, list_collections
from caselens.indexes.faiss_index import read_stamp
from caselens.ingest.items import content_id
from caselens.retrieval.search import Hit, SearchResult, collection_encoder, hits_for_rows, search, search_vector
from caselens.retrieval.serve.errors import ServeError
from caselens.retrieval.serve.limits import IMAGE_TYPES

log = logging.getLogger(__name__)

FACET_COLUMNS = ("kind", "label", "modality", "body_part", "view_position")  # offered as filter choices
FACET_MAX_ROWS = 200_000  # larger collections: no facet scan (filters are typed in)
FACET_MAX_VALUES = 50
ID_MAX = 512
INGEST_KINDS = ("images", "dicom")
VOTE_TEMPERATURE = 0.05  # diagnose placeholder: weight of a neighbour = exp((cosine - best) / this)


def quote(value: Any) -> str:
    """A SQL literal for a filter value: numbers as they are, anything else a quoted string."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(float(value))
    return "'" + str(value).replace("'", "''") + "'"


def check_item_id(item_id: str) -> str:
    """An item id as a request may give it: 1-512 characters, no control characters (404
    otherwise: such an id names no item)."""
    if not item_id or len(item_id) > ID_MAX or any(ord(ch) < 32 or ord(ch) == 127 for ch in item_id):
        raise ServeError(404, "item_not_found", "no item has this id")
    return item_id


@dataclass
class IngestSpec:
    """An ingest job: what to read (already checked to lie under an allowed root) and where to."""

    collection: str
    folder: Path
    kind: str = "images"  # "images": image/DICOM files of a folder (+ manifest); "dicom": a DICOM export
    manifest: Path | None = None
    label_from_folder: bool = False

    def __post_init__(self) -> None:
        check_collection_name(self.collection)
        if self.kind not in INGEST_KINDS:
            raise SourceError(f"ingest kind {self.kind!r} is not known; use one of {', '.join(INGEST_KINDS)}")
        if self.manifest is not None and self.kind != "images":
            raise SourceError("a manifest goes with kind 'images'")


def check_collection_name(name: str) -> str:
    """``name`` when it can name a collection (400 ``bad_collection_name`` otherwise)."""
    try:
        return Collection.validate_name(name)
    except ValueError as exc:
        raise ServeError(400, "bad_collection_name", str(exc)) from None


class _Counted:
    """A source that reports each input it yields (progress of an ingest job)."""

    def __init__(self, source: Any, progress: Callable[[int, int | None], None]):
        self.source, self.progress = source, progress
        self.kind = source.kind

    def estimate(self) -> int | None:
        return self.source.estimate()

    def input_record(self) -> dict[str, Any] | None:
        method = getattr(self.source, "input_record", None)
        return method() if callable(method) else None

    def __iter__(self) -> Iterator[Any]:
        total = self.source.estimate()
        done = 0
        self.progress(done, total)
        for item in self.source:
            yield item
            done += max(1, len(getattr(item, "members", None) or []))
            self.progress(done, total)


def set_encoder_threads(n: int) -> None:
    """Threads one encoder call may use (torch's intra-op pool; ``n`` <= 0 leaves torch's default).
    A service encodes many small queries at once, one per worker thread: a pool per call as wide
    as the machine only makes those threads wait for each other (measured on 2 busy cores: a
    MiniLM query 600 ms with 2 threads, 56 ms with 1)."""
    if n <= 0:
        return
    try:
        import torch
    except ImportError:  # no torch-based encoder in this install
        return
    torch.set_num_threads(n)


class Backend:
    """Open collections of one caselens home, and every library call the service makes."""

    def __init__(self, home: Path, generator: str = "auto"):
        self.home = Path(home)
        self.generator_name = generator
        self._generator: Any = None
        self._collections: dict[str, Collection] = {}
        self._lock = threading.Lock()
        self._facets: dict[tuple[str, int], dict[str, list[dict[str, Any]]]] = {}
        self._uploads = Path(tempfile.mkdtemp(prefix="caselens-serve-"))  # mode 0700

    def close(self) -> None:
        shutil.rmtree(self._uploads, ignore_errors=True)

    # ------------------------------------------------------------------ collections
    def names(self) -> list[str]:
        """Collections of the home. API: ``caselens.list_collections(home)``."""
        return list_collections(self.home)

    def collection(self, name: str) -> Collection:
        """The open collection ``name`` (opened on first use and kept). API: ``caselens.open``."""
        found = self._collections.get(name)
        if found is not None:
            return found
        with self._lock:
            found = self._collections.get(name)
            if found is None:
                try:
                    Collection.validate_name(name)
                    found = Collection.open(name, self.home)
                except (ValueError, CollectionNotFoundError):  # never echo the server's folders
                    raise CollectionNotFoundError(
                        f"collection {name!r} not found; collections here: {', '.join(self.names()) or 'none'}") from None
                self._collections[name] = found
        return found

    def warm(self, name: str) -> None:
        """Load a collection's encoder, FAISS index and joined metadata now, not on its first search."""
        c = self.collection(name)
        collection_encoder(c)
        if c.count():
            c.index()
            c.row_values([])
        if self.generator_name:
            self.generator()

    def generator(self) -> Any:
        """The generator of ``/api/ask``, loaded once (a server setting, never a request's)."""
        if self._generator is None:
            from caselens.retrieval.rag import load_generator

            self._generator = load_generator(self.generator_name)
        return self._generator

    def info(self, name: str) -> dict[str, Any]:
        """What a client needs to know of a collection (no server paths). API: ``col.info()``."""
        c = self.collection(name)
        version = c.version
        count = c.count()
        stamp = read_stamp(c.index_dir)
        enc = c.encoder
        return {
            "name": c.name, "items": count, "table_version": version, "created": c.info.get("created"),
            "encoder": {"spec": enc.get("spec"), "dim": int(enc.get("dim", 0)), "modalities": list(enc.get("modalities", [])),
                        "fingerprint": enc.get("fingerprint")},
            "metadata_columns": c.metadata_columns(),
            "facets": self._facet_values(c, version, count),
            "index": None if stamp is None else {"factory": stamp.factory, "vectors": stamp.live,
                                                 "table_version": stamp.table_version,
                                                 "fresh": stamp.table_version == version},
        }

    def _facet_values(self, c: Collection, version: int, count: int) -> dict[str, list[dict[str, Any]]]:
        key = (c.name, version)
        if key in self._facets:
            return self._facets[key]
        facets: dict[str, list[dict[str, Any]]] = {}
        columns = [col for col in FACET_COLUMNS if col in c.columns()]
        if count and count <= FACET_MAX_ROWS and columns:
            table = c.rows(columns=columns)
            for col in columns:
                counts = table.column(col).value_counts().to_pylist()
                values = sorted(({"value": v["values"], "count": v["counts"]} for v in counts if v["values"] is not None),
                                key=lambda v: (-v["count"], str(v["value"])))
                if values:
                    facets[col] = values[:FACET_MAX_VALUES]
        if len(self._facets) > 256:
            self._facets.clear()
        self._facets[key] = facets
        return facets

    # ------------------------------------------------------------------ filters
    def predicate(self, c: Collection, where: str | None, filters: dict[str, Any] | None) -> str | None:
        """``where`` (SQL over metadata columns) and ``column = value`` filters, ANDed."""
        parts = [f"({where})"] if where and where.strip() else []
        columns = set(c.metadata_columns()) | {"kind"}
        for column, value in (filters or {}).items():
            if column not in columns:
                raise QueryError(f"collection {c.name!r} has no metadata column {column!r}; "
                                 f"columns: {', '.join(sorted(columns))}")
            parts.append(f"{column} IS NULL" if value is None else f"{column} = {quote(value)}")
        return " AND ".join(parts) or None

    # ------------------------------------------------------------------ search
    @contextmanager
    def _upload_file(self, data: bytes, kind: str) -> Iterator[Path]:
        """The uploaded bytes as a private temporary file (the library reads query images from a
        path). API: ``col.search(image=bytes)`` takes the bytes directly; then this goes."""
        fd, name = tempfile.mkstemp(dir=self._uploads, prefix="query-", suffix=IMAGE_TYPES[kind])
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            yield path
        except QueryError as exc:  # the library names the file it read: say "the uploaded image" instead
            raise QueryError(str(exc).replace(str(path), "the uploaded image").replace(path.name, "the uploaded image")) from None
        finally:
            path.unlink(missing_ok=True)

    def search_image(self, name: str, data: bytes, kind: str, *, k: int, where: str | None = None,
                     filters: dict[str, Any] | None = None, exclude_same: str | None = None) -> SearchResult:
        """Items most similar to an uploaded image. API: ``col.search(image=data, k=, where=, exclude_same=)``."""
        c = self.collection(name)
        with self._upload_file(data, kind) as path:
            return search(c, image=path, k=k, where=self.predicate(c, where, filters), exclude_same=exclude_same)

    def search_item(self, name: str, item_id: str, *, k: int, where: str | None = None,
                    filters: dict[str, Any] | None = None, exclude_same: str | None = None) -> SearchResult:
        """Items most similar to a stored item (never the item itself; with ``exclude_same``, none
        sharing its value of that column). API: ``col.search(id=item_id, …)``."""
        c = self.collection(name)
        vector, row = self._vector_of(c, item_id, exclude_same)
        exclude = {exclude_same: row[exclude_same]} if exclude_same and row.get(exclude_same) is not None else None
        return search_vector(c, vector, k, self.predicate(c, where, filters), exclude, exclude_ids=[item_id],
                             query_desc="item")

    def _vector_of(self, c: Collection, item_id: str, column: str | None) -> tuple[Any, dict[str, Any]]:
        check_item_id(item_id)
        if column and column not in c.columns():
            raise QueryError(f"collection {c.name!r} has no column {column!r}; metadata columns: "
                             f"{', '.join(c.metadata_columns())}")
        rows = c.rows(f"id = {quote(item_id)}", ["vector"] + ([column] if column else []), limit=1).to_pylist()
        if not rows:
            raise ServeError(404, "item_not_found", f"collection {c.name!r} has no item with this id")
        return rows[0]["vector"], rows[0]

    def search_text(self, name: str, text: str, *, k: int, mode: str = "dense", where: str | None = None,
                    filters: dict[str, Any] | None = None) -> SearchResult:
        """Items for a text query (dense, BM25 or hybrid). API: ``col.search(text=, mode=, …)``."""
        c = self.collection(name)
        return search(c, text=text, k=k, where=self.predicate(c, where, filters), mode=mode)

    # ------------------------------------------------------------------ items
    def item(self, name: str, item_id: str) -> Hit:
        """One stored item with its metadata and provenance. API: ``col.item(id)`` (or ``col.search(id=…)``'s row)."""
        c = self.collection(name)
        check_item_id(item_id)
        rows = c.rows(f"id = {quote(item_id)}", ["_row"], limit=1).to_pylist()
        hits = hits_for_rows(c, [(1.0, int(rows[0]["_row"]))]) if rows else []
        if not hits:
            raise ServeError(404, "item_not_found", f"collection {c.name!r} has no item with this id")
        return hits[0]

    def item_image(self, name: str, item_id: str) -> Path:
        """The item's rendering in the collection's own image cache (``cache/images/<id>.png``),
        made by the library's image resolver (the input file found again and checked against its
        content hash, DICOM decoded, PDF page rendered). Nothing outside the cache is ever served.
        API: ``col.item_image(hit)`` (today ``caselens.retrieval.rag.images.item_image``)."""
        from caselens.retrieval.rag.images import cache_dir, cache_path, item_image

        c = self.collection(name)
        hit = self.item(name, item_id)
        found = item_image(c, hit)
        if found is None:
            raise ServeError(404, "no_image", "this item has no image to show (text item, input file moved or "
                                              "changed since ingest, or flagged as burned-in annotation)")
        folder = cache_dir(c).resolve()
        path = Path(found)
        if not path.resolve().is_relative_to(folder):
            # an image file ingest read as it is (PNG/JPEG, verified by its hash): rendered into the
            # cache once, so that what is served always comes from the collection's own cache
            target = cache_path(c, hit.id)
            with Image.open(path) as im:
                im.load()
                image = im.convert("RGB") if im.mode not in ("L", "RGB") else im.copy()
            buffer = io.BytesIO()
            image.save(buffer, "PNG")
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            atomic_write_bytes(target, buffer.getvalue())
            path = target
        path = path.resolve()
        if not path.is_relative_to(folder) or path.is_symlink() or not path.is_file():
            raise ServeError(404, "no_image", "this item has no cached image")
        return path

    # ------------------------------------------------------------------ ledger
    def ledger_summary(self, name: str, runs: int = 20) -> dict[str, Any]:
        """Counts of the ledger by status and reason, and per run (no input names: they are file
        paths). API: ``col.ledger()``."""
        c = self.collection(name)
        rows = c.ledger()
        by_status = Counter(r["status"] for r in rows)
        rejected = Counter(r["reason_code"] for r in rows if r["status"] == "rejected")
        per_run: dict[str, dict[str, Any]] = {}
        for r in rows:
            run = per_run.setdefault(r["run_id"], {"run_id": r["run_id"], "started": r["time"], "finished": r["time"],
                                                   "accepted": 0, "duplicate": 0, "rejected": 0, "deleted": 0})
            run["started"] = min(run["started"], r["time"])
            run["finished"] = max(run["finished"], r["time"])
            if r["status"] in ("accepted", "duplicate", "rejected", "deleted"):
                run[r["status"]] += 1
        ordered = sorted(per_run.values(), key=lambda r: r["started"], reverse=True)
        return {"collection": c.name, "rows": len(rows), "by_status": dict(sorted(by_status.items())),
                "rejected_by_reason": dict(rejected.most_common()), "runs": ordered[:runs]}

    # ------------------------------------------------------------------ ask
    def ask(self, question: str, knowledge: list[str], *, cases: str | None = None, image: bytes | None = None,
            image_kind: str | None = None, k: int = 5, task: str = "free", options: dict[str, str] | None = None,
            min_score: float = 0.25, where: str | None = None) -> Any:
        """A grounded answer with checked citations. API: ``col.ask(question, …)``."""
        from caselens.retrieval.rag import AskConfig, ask

        if not knowledge:
            raise QueryError("name at least one knowledge collection to answer from")
        config = AskConfig(k=k, task=task, options=options or None, where=where or None, min_score=min_score)
        colls = [self.collection(n) for n in knowledge]
        case_coll = self.collection(cases) if cases else None
        if image is not None:
            if case_coll is None:
                raise QueryError("a query image needs a case collection (cases)")
            with self._upload_file(image, image_kind or "png") as path:
                return ask(colls, question, generator=self.generator(), cases=case_coll, image=path, config=config)
        return ask(colls, question, generator=self.generator(), config=config)

    # ------------------------------------------------------------------ diagnose
    def diagnose(self, name: str, *, image: bytes | None = None, image_kind: str | None = None,
                 item_id: str | None = None, k: int = 10, threshold: float = 0.5, where: str | None = None,
                 knowledge: list[str] | None = None) -> dict[str, Any]:
        """Label probabilities from similar cases, never the query's own patient.

        PLACEHOLDER until the library's diagnose lands: a similarity-weighted vote over the top-k
        hits' labels (weights: softmax of cosine / :data:`VOTE_TEMPERATURE`), abstaining when the top label's
        probability is below ``threshold``; passages: the top label searched in ``knowledge``.
        Replace the body with ``caselens.open(name).diagnose(...)`` (same response shape)."""
        c = self.collection(name)
        if (image is None) == (item_id is None):
            raise QueryError("give exactly one query: an uploaded image or an item id")
        if item_id is not None:
            vector, row = self._vector_of(c, item_id, "patient_id")
            patient = row.get("patient_id")
            result = search_vector(c, vector, k, where or None, {"patient_id": patient} if patient else None,
                                   exclude_ids=[item_id], query_desc="item")
            hits = result.hits
        else:
            own_id = content_id(hashlib.sha256(image).hexdigest())
            with self._upload_file(image, image_kind or "png") as path:
                try:  # the query's patient, when the image is stored or its DICOM header names one
                    result = search(c, image=path, k=k + 1, where=where or None, exclude_same="patient_id")
                except QueryError:
                    result = search(c, image=path, k=k + 1, where=where or None)
            hits = [h for h in result.hits if h.id != own_id][:k]
        labeled = [h for h in hits if h.label is not None]
        votes: dict[str, float] = {}
        if labeled:
            best = max(float(h.score) for h in labeled)
            for h in labeled:  # softmax of cosine / temperature: near neighbours outweigh far ones
                votes[str(h.label)] = votes.get(str(h.label), 0.0) + math.exp((float(h.score) - best) / VOTE_TEMPERATURE)
        total = sum(votes.values())
        labels = sorted(({"label": lab, "probability": w / total} for lab, w in votes.items()),
                        key=lambda x: -x["probability"]) if total > 0 else []
        abstained = not labels or labels[0]["probability"] < threshold
        passages: list[dict[str, Any]] = []
        if labels and knowledge:
            from caselens.retrieval.rag.context import citation_key, item_kind

            for kb in knowledge:
                found = search(self.collection(kb), text=labels[0]["label"], k=3)
                passages += [{"key": citation_key(item_kind(h), h), "text": h.text or "", "collection": kb,
                              "score": float(h.score)} for h in found.hits if h.text]
        return {"labels": labels, "abstained": abstained, "threshold": threshold, "supporting": hits,
                "passages": passages}

    # ------------------------------------------------------------------ ingest
    def ingest(self, spec: IngestSpec, progress: Callable[[int, int | None], None]) -> dict[str, Any]:
        """Run one ingest (in the caller's thread: a job worker). A new collection gets the
        ``classic`` image encoder. API: ``caselens.ingest.runner.run_ingest(...)`` /
        ``col.ingest(images=…, manifest=…, dicom=…)``, which also makes the choices below."""
        from caselens.ingest.encoders import load_encoder, load_from_record
        from caselens.ingest.pipeline import IngestConfig, ingest
        from caselens.ingest.sources import ImageSource
        from caselens.ingest.sources.dicom import DicomOptions
        from caselens.ingest.volumes import pooled_record

        exists = Collection.exists(spec.collection, self.home)
        writer = Collection.open(spec.collection, self.home) if exists else None  # the job's own handle
        window = writer.encoder.get("window", "auto") if writer is not None else "auto"
        if spec.kind == "dicom":
            from caselens.ingest.sources.dicom_source import DicomSource, DicomSourceConfig

            pooling = (writer.encoder.get("pooling") or "mean") if writer is not None else "mean"
            config = DicomSourceConfig(unit="instance", pooling=pooling, options=DicomOptions(window=window))
            source: Any = DicomSource(spec.folder, config=config)
            options = config.options
        else:  # "images"
            options = DicomOptions(window=window)
            source = ImageSource(root=None if spec.manifest else spec.folder, manifest=spec.manifest,
                                 label_from_folder=spec.label_from_folder, dicom_options=options)
            pooling = "mean"
        encoder = load_from_record(writer.encoder) if writer is not None else load_encoder("classic")
        if writer is None:
            record = pooled_record(encoder.info.to_record(), pooling, options.window)
            try:
                writer = Collection.create(spec.collection, record, self.home)
            except FileExistsError:  # created meanwhile by another writer
                writer = Collection.open(spec.collection, self.home)
        writer.check_encoder(encoder.info.to_record())
        source.secret = writer.secret()
        start = time.perf_counter()
        report = ingest(_Counted(source, progress), writer, encoder, IngestConfig(progress=False))
        return {"run_id": report.run_id, "accepted": report.accepted, "duplicates": report.duplicates,
                "rejected": dict(report.rejected), "table_version": report.table_version,
                "items": report.total_items, "seconds": round(time.perf_counter() - start, 3)}

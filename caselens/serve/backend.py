"""The only module of the HTTP service that calls the caselens library, through its public API
(:mod:`caselens.api`): ``caselens.open``, ``Collection.search/ask/ingest/info/ledger``.

Collection handles are opened once and kept (with their encoder, FAISS index and snapshot warm)
for the life of the service. Searches read snapshots and never wait for the ingest jobs that the
service runs in a worker thread (readers never take the write lock).
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

import caselens
from caselens.errors import CollectionNotFoundError, ConfigError, QueryError, SourceError
from caselens.files import atomic_write_bytes
from caselens.indexes.collection import Collection as Storage
from caselens.indexes.reader import reader_of
from caselens.ingest.runner import IngestRequest, run_ingest
from caselens.retrieval.images import cache_dir, cache_path, item_image
from caselens.retrieval.search import Hit, SearchResult, collection_encoder, hits_for_rows
from caselens.serve.errors import ServeError

log = logging.getLogger(__name__)

FACET_COLUMNS = ("kind", "label", "modality", "body_part", "view_position")  # offered as filter choices
FACET_MAX_ROWS = 200_000  # larger collections: no facet scan (filters are typed in)
FACET_MAX_VALUES = 50
ID_MAX = 512
INGEST_KINDS = ("images", "dicom")


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
        return Storage.validate_name(name)
    except (ValueError, ConfigError) as exc:
        raise ServeError(400, "bad_collection_name", str(exc)) from None


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
        self._collections: dict[str, caselens.Collection] = {}
        self._lock = threading.Lock()
        self._facets: dict[tuple[str, int], dict[str, list[dict[str, Any]]]] = {}

    def close(self) -> None:
        self._collections.clear()

    # ------------------------------------------------------------------ collections
    def names(self) -> list[str]:
        """Collections of the home."""
        return caselens.collections(self.home)

    def collection(self, name: str) -> caselens.Collection:
        """The open collection ``name`` (opened on first use and kept)."""
        found = self._collections.get(name)
        if found is not None:
            return found
        with self._lock:
            found = self._collections.get(name)
            if found is None:
                try:
                    found = caselens.open(name, self.home)
                    found.storage  # noqa: B018 - opened now, not in a request
                except (ValueError, CollectionNotFoundError):  # never echo the server's folders
                    raise CollectionNotFoundError(
                        f"collection {name!r} not found; collections here: {', '.join(self.names()) or 'none'}") from None
                self._collections[name] = found
        return found

    def warm(self, name: str) -> None:
        """Load a collection's encoder, index and snapshot now, not on its first search."""
        c = self.collection(name)
        collection_encoder(c.storage)
        reader_of(c.storage).view()
        if self.generator_name:
            self.generator()

    def generator(self) -> Any:
        """The generator of ``/api/ask``, loaded once (a server setting, never a request's)."""
        if self._generator is None:
            from caselens.retrieval.rag import load_generator

            self._generator = load_generator(self.generator_name)
        return self._generator

    def info(self, name: str) -> dict[str, Any]:
        """What a client needs to know of a collection (no server paths)."""
        c = self.collection(name)
        info = c.info()
        enc, stamp = info["encoder"], info["faiss_index"]
        return {
            "name": c.name, "items": info["items"], "table_version": info["table_version"],
            "created": c.storage.info.get("created"),
            "encoder": {"spec": enc.get("spec"), "dim": int(enc.get("dim", 0)), "modalities": list(enc.get("modalities", [])),
                        "fingerprint": enc.get("fingerprint")},
            "metadata_columns": c.storage.metadata_columns(),
            "facets": self._facet_values(c),
            "index": None if stamp is None else {"factory": stamp["factory"], "vectors": stamp["live"],
                                                 "table_version": stamp["table_version"], "fresh": stamp["fresh"]},
        }

    def _facet_values(self, c: caselens.Collection) -> dict[str, list[dict[str, Any]]]:
        snapshot = reader_of(c.storage).snapshot()
        key = (c.name, snapshot.version)
        if key in self._facets:
            return self._facets[key]
        facets: dict[str, list[dict[str, Any]]] = {}
        columns = [col for col in FACET_COLUMNS if col in snapshot.columns]
        if len(snapshot) and len(snapshot) <= FACET_MAX_ROWS and columns and snapshot.data is not None:
            for col in columns:
                counts = snapshot.data.column(col).value_counts().to_pylist()
                values = sorted(({"value": v["values"], "count": v["counts"]} for v in counts if v["values"] is not None),
                                key=lambda v: (-v["count"], str(v["value"])))
                if values:
                    facets[col] = values[:FACET_MAX_VALUES]
        if len(self._facets) > 256:
            self._facets.clear()
        self._facets[key] = facets
        return facets

    # ------------------------------------------------------------------ filters
    def predicate(self, c: caselens.Collection, where: str | None, filters: dict[str, Any] | None) -> str | None:
        """``where`` (SQL over metadata columns) and ``column = value`` filters, ANDed."""
        from caselens.indexes.collection import quote

        parts = [f"({where})"] if where and where.strip() else []
        columns = set(c.storage.metadata_columns()) | {"kind"}
        for column, value in (filters or {}).items():
            if column not in columns:
                raise QueryError(f"collection {c.name!r} has no metadata column {column!r}; "
                                 f"columns: {', '.join(sorted(columns))}")
            parts.append(f'"{column}" IS NULL' if value is None else f'"{column}" = {quote(value)}')
        return " AND ".join(parts) or None

    # ------------------------------------------------------------------ search
    def search_image(self, name: str, data: bytes, kind: str, *, k: int, where: str | None = None,
                     filters: dict[str, Any] | None = None, exclude_same: str | None = None) -> SearchResult:
        """Items most similar to an uploaded image (PNG, JPEG or DICOM bytes)."""
        c = self.collection(name)
        return c.search(data, k=k, where=self.predicate(c, where, filters), exclude_same=exclude_same)

    def search_item(self, name: str, item_id: str, *, k: int, where: str | None = None,
                    filters: dict[str, Any] | None = None, exclude_same: str | None = None) -> SearchResult:
        """Items most similar to a stored item (never the item itself; with ``exclude_same``, none
        sharing its value of that column)."""
        c = self.collection(name)
        check_item_id(item_id)
        if reader_of(c.storage).snapshot().row_of(item_id) is None:
            raise ServeError(404, "item_not_found", f"collection {c.name!r} has no item with this id")
        return c.search(id=item_id, k=k, where=self.predicate(c, where, filters), exclude_same=exclude_same)

    def search_text(self, name: str, text: str, *, k: int, mode: str = "dense", where: str | None = None,
                    filters: dict[str, Any] | None = None) -> SearchResult:
        """Items for a text query (dense, BM25 or hybrid)."""
        c = self.collection(name)
        return c.search(text=text, k=k, where=self.predicate(c, where, filters), mode=mode)

    # ------------------------------------------------------------------ items
    def item(self, name: str, item_id: str) -> Hit:
        """One stored item with its metadata and provenance."""
        c = self.collection(name)
        check_item_id(item_id)
        snapshot = reader_of(c.storage).snapshot()
        row = snapshot.row_of(item_id)
        hits = hits_for_rows(snapshot, [(1.0, row)]) if row is not None else []
        if not hits:
            raise ServeError(404, "item_not_found", f"collection {c.name!r} has no item with this id")
        return hits[0]

    def item_image(self, name: str, item_id: str) -> Path:
        """The item's rendering in the collection's own image cache (``cache/images/<id>.png``),
        made by the library's image resolver (the input file found again and checked against its
        content hash, DICOM decoded, PDF page rendered). Nothing outside the cache is ever served."""
        c = self.collection(name)
        hit = self.item(name, item_id)
        found = item_image(c.storage, hit)
        if found is None:
            raise ServeError(404, "no_image", "this item has no image to show (text item, input file moved or "
                                              "changed since ingest, or flagged as burned-in annotation)")
        folder = cache_dir(c.storage).resolve()
        path = Path(found)
        if not path.resolve().is_relative_to(folder):
            # an image file ingest read as it is (PNG/JPEG, verified by its hash): rendered into the
            # cache once, so that what is served always comes from the collection's own cache
            target = cache_path(c.storage, hit.id)
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
        paths)."""
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
            k: int = 5, task: str = "free", options: dict[str, str] | None = None,
            min_score: float = 0.25, where: str | None = None) -> Any:
        """A grounded answer with checked citations."""
        if not knowledge:
            raise QueryError("name at least one knowledge collection to answer from")
        colls = [self.collection(n) for n in knowledge]
        case_coll = self.collection(cases) if cases else None
        if image is not None and case_coll is None:
            raise QueryError("a query image needs a case collection (cases)")
        return colls[0].ask(question, generator=self.generator(), also=colls[1:], cases=case_coll, image=image, k=k,
                            task=task, options=options or None, where=where or None, min_score=min_score)

    # ------------------------------------------------------------------ diagnose
    def diagnose(self, name: str, *, image: bytes | None = None, item_id: str | None = None, k: int | None = None, threshold: float | None = None,
                 knowledge: list[str] | None = None) -> Any:
        """The library's diagnosis by similar cases (:meth:`caselens.Collection.diagnose`: calibrated
        case voting fitted by ``caselens adapt``), never from the query itself or its patient;
        ``threshold`` replaces the model's abstention threshold."""
        c = self.collection(name)
        if (image is None) == (item_id is None):
            raise QueryError("give exactly one query: an uploaded image or an item id")
        if item_id is not None:
            check_item_id(item_id)
            if reader_of(c.storage).snapshot().row_of(item_id) is None:
                raise ServeError(404, "item_not_found", f"collection {c.name!r} has no item with this id")
        kbs = [self.collection(n) for n in knowledge or []]
        return c.diagnose(image, id=item_id, k=k, knowledge=kbs, min_confidence=threshold)

    # ------------------------------------------------------------------ ingest
    def ingest(self, spec: IngestSpec, progress: Callable[[int, int | None], None]) -> dict[str, Any]:
        """Run one ingest (in the caller's thread: a job worker) through the library's one ingest
        call; a new collection gets the ``classic`` image encoder (never one named by a request)."""
        request = IngestRequest(images=None if spec.manifest or spec.kind == "dicom" else spec.folder,
                                manifest=spec.manifest, dicom=spec.folder if spec.kind == "dicom" else None,
                                label_from_folder=spec.label_from_folder, progress=False, on_progress=progress)
        start = time.perf_counter()
        report = run_ingest(spec.collection, request, self.home)
        with self._lock:  # a collection created by this job: its handle is opened afresh
            self._collections.pop(spec.collection, None)
        return {"run_id": report.run_id, "accepted": report.accepted, "duplicates": report.duplicates,
                "rejected": dict(report.rejected), "table_version": report.table_version,
                "items": report.total_items, "seconds": round(time.perf_counter() - start, 3)}

"""The derived indexes of a collection: FAISS and BM25, built from a table version and stamped.

Writers bring them up to date after their commit (:func:`refresh`, :func:`refresh_bm25`,
:func:`refresh_all`), holding the collection's write lock; maintenance commands rebuild them
(:func:`optimize`), check them (:func:`verify`) and remove deleted items (:func:`delete`).
Readers take neither the lock nor a rebuild: :func:`load_for_read` returns the last stamped
FAISS index (whatever table version it was stamped with; the reader ranks the rows committed
since exactly, see :mod:`caselens.indexes.reader`) and :func:`bm25_for_read` the last BM25 index.

This module imports :class:`~caselens.indexes.collection.Collection` and is never imported by it.
The LanceDB table stays the source of truth: nothing here deletes table rows except
:func:`delete`, on request.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np

from caselens.errors import EncoderMismatchError, IndexIntegrityError
from caselens.indexes import bm25_index, faiss_index
from caselens.indexes.collection import Collection
from caselens.indexes.index_choice import ChoiceConfig, choose_and_build, evaluate

log = logging.getLogger(__name__)

REBUILD_TOMBSTONES = 0.2  # optimize rebuilds when this fraction of an index is tombstones
REBUILD_GROWTH = 1.0  # ... or when the index grew by this fraction since it was trained


def stored_config(stamp: faiss_index.IndexStamp | None) -> ChoiceConfig:
    """The choice settings an index was built with (defaults for older stamps)."""
    raw = dict((stamp.choice or {}).get("config", {})) if stamp is not None else {}
    known = set(ChoiceConfig.__dataclass_fields__)
    kwargs = {k: v for k, v in raw.items() if k in known}
    if kwargs.get("factories") is not None:
        kwargs["factories"] = tuple(kwargs["factories"])
    return ChoiceConfig(**kwargs)


def full_build(collection: Collection, config: ChoiceConfig | None,
               progress: bool = False) -> faiss_index.IndexStamp:
    """Choose, build and write an index over all vectors of the current table version (call it
    holding the write lock)."""
    if config is None:
        config = stored_config(faiss_index.read_stamp(collection.layout.faiss_dir))
    from tqdm.auto import tqdm  # (imported by builds only: searches start sooner)

    version = collection.version
    row_ids, vecs = collection.vectors()
    bar = tqdm(total=len(row_ids), unit="vec", desc=f"index {collection.name}", disable=not progress)

    def tick(stage: str, count: int) -> None:
        if stage == "add":
            bar.update(count)
        elif stage == "candidate":
            bar.reset()

    start = time.perf_counter()
    index, choice = choose_and_build(vecs, row_ids, config, progress=tick)
    bar.close()
    record = choice.to_dict()
    record["config"] = config.to_dict()
    record["total_seconds"] = round(time.perf_counter() - start, 2)
    return faiss_index.write_index(index, collection.layout.faiss_dir, table_version=version,
                                   encoder_fingerprint=collection.encoder["fingerprint"], factory=choice.factory,
                                   params=choice.params, choice=record, trained_on=len(row_ids))


def update_index(collection: Collection, index: faiss.Index,
                 stamp: faiss_index.IndexStamp) -> faiss_index.IndexStamp | None:
    """Add the table's new rows to ``index`` and remove its deleted ones, then write it.

    Returns the new stamp, the old one when nothing changed, or None when only a full build
    can help (an id was reused by a row that is tombstoned in the index).
    """
    version = collection.version
    if stamp.table_version == version:
        return stamp
    table_rows = collection.row_ids()
    deleted = np.asarray(stamp.deleted, np.int64)
    in_index = faiss_index.index_ids(index)
    live = np.setdiff1d(in_index, deleted)
    to_add = np.setdiff1d(table_rows, live)
    to_remove = np.setdiff1d(live, table_rows)
    if len(np.intersect1d(to_add, in_index)):
        log.info("rows reuse ids still inside the index of %s; rebuilding", collection.name)
        return None
    if not len(to_add) and not len(to_remove):  # e.g. a compaction: same rows, new version
        return faiss_index.restamp(collection.layout.faiss_dir, stamp, version)
    if len(to_add):
        rows, vectors = collection.vectors_for_rows(to_add)
        faiss_index.add_vectors(index, vectors, rows)
    tomb = faiss_index.remove_ids(index, to_remove)
    deleted = np.union1d(deleted, tomb)
    new = faiss_index.write_index(
        index, collection.layout.faiss_dir, table_version=version, encoder_fingerprint=stamp.encoder_fingerprint,
        factory=stamp.factory, params=stamp.params, choice=stamp.choice, deleted=deleted.tolist(),
        trained_on=stamp.trained_on, added_since_build=stamp.added_since_build + len(to_add),
        removed_since_build=stamp.removed_since_build + len(to_remove))
    log.info("FAISS index of %s updated: +%d -%d vectors (table v%d)", collection.name, len(to_add),
             len(to_remove), version)
    return new


def refresh(collection: Collection, *, rebuild: bool = False, config: ChoiceConfig | None = None,
            progress: bool = False) -> faiss_index.IndexStamp:
    """Bring the FAISS index to the current table version and return its stamp (takes the lock).

    With a usable index of this encoder, new rows are added and deleted rows removed (no
    retraining); with ``rebuild``, a ``config`` or no usable index, the index type is chosen by
    measuring recall (:mod:`caselens.indexes.index_choice`) and built from all vectors.
    :class:`EncoderMismatchError` when the index on disk came from another encoder (rebuild it)."""
    folder = collection.layout.faiss_dir
    with collection.lock.hold():
        if folder.exists():  # left by a writer that was killed mid-write
            faiss_index.remove_stale_temporaries(folder)
        if not rebuild and config is None:
            try:
                index, stamp = faiss_index.load_index(folder, collection.encoder["fingerprint"], cached=False)
            except IndexIntegrityError as exc:
                if faiss_index.read_stamp(folder) is not None:
                    log.warning("%s; rebuilding", exc)
            else:
                if (stamp.choice or {}).get("method") == "ray-sharded":
                    # lists merged on disk by a distributed build: never changed in place; readers rank
                    # the rows since exactly until `caselens index --rebuild` (or ray_index.build) runs
                    log.info("FAISS index of %s is a sharded build (table v%d); rows since are ranked exactly",
                             collection.name, stamp.table_version)
                    return stamp
                updated = update_index(collection, index, stamp)
                if updated is not None:
                    return updated
        return full_build(collection, config, progress=progress)


def has_text(collection: Collection) -> bool:
    """Whether any item of ``collection`` has text (then it gets a BM25 index)."""
    return collection.count("text IS NOT NULL") > 0


def refresh_bm25(collection: Collection, settings: bm25_index.Bm25Settings | None = None,
                 force: bool = False) -> bm25_index.Bm25Stamp | None:
    """Bring the BM25 index to the current table version (takes the lock); None when the
    collection has no text and no BM25 index. Rebuilt when stale, damaged, of other settings, or
    ``force``."""
    settings = settings or bm25_index.Bm25Settings()
    folder = collection.layout.bm25_dir
    with collection.lock.hold():
        stamp = bm25_index.read_stamp(folder)
        version = collection.version
        if not force and stamp is not None and stamp.table_version == version and stamp.settings == asdict(settings):
            try:
                bm25_index.load(folder)
                return stamp
            except IndexIntegrityError as exc:
                log.warning("%s; rebuilding", exc)
        if stamp is None and not has_text(collection):
            return None
        table = collection.rows("text IS NOT NULL", ["_row", "text"])
        return bm25_index.build(table.column("_row").to_numpy(), table.column("text").to_pylist(), folder,
                                version, settings)


def refresh_all(collection: Collection, progress: bool = False) -> tuple[faiss_index.IndexStamp,
                                                                            bm25_index.Bm25Stamp | None]:
    """Both derived indexes brought to the current table version (what a writer does after its
    commit)."""
    with collection.lock.hold():
        return refresh(collection, progress=progress), refresh_bm25(collection)


def delete(collection: Collection, ids: list[str] | tuple[str, ...], run_id: str | None = None) -> list[str]:
    """Delete the items ``ids`` (noted in the ledger as ``deleted``) and remove them from the
    derived indexes (no rebuild); returns the ids deleted."""
    with collection.lock.hold():
        deleted = collection.delete(ids, run_id)
        if deleted and faiss_index.read_stamp(collection.layout.faiss_dir) is not None:
            refresh(collection)
        if deleted and bm25_index.read_stamp(collection.layout.bm25_dir) is not None:
            refresh_bm25(collection)
    return deleted


# ------------------------------------------------------------- for readers
def mmap_wanted(collection: Collection, stamp: faiss_index.IndexStamp | None) -> bool:
    """Memory-map IVF indexes larger than ``CASELENS_MMAP_ABOVE`` bytes (default 4 GiB)."""
    if stamp is None or not faiss_index.factory_lists(stamp.factory):
        return False
    limit = int(os.environ.get("CASELENS_MMAP_ABOVE", str(4 << 30)))
    try:
        return (collection.layout.faiss_dir / faiss_index.INDEX_FILE).stat().st_size > limit
    except OSError:
        return False


def load_for_read(collection: Collection) -> tuple[faiss.Index, faiss_index.IndexStamp] | None:
    """The last stamped FAISS index of ``collection`` and its stamp, whatever table version it
    was stamped with, without the write lock; None when there is none or it is damaged (logged:
    the reader then ranks exactly until a writer rebuilds it). A file replaced by a writer while
    it was read is read again. :class:`EncoderMismatchError` when it came from another encoder."""
    folder = collection.layout.faiss_dir
    fingerprint = collection.encoder["fingerprint"]
    for _ in range(5):
        stamp = faiss_index.read_stamp(folder)
        if stamp is None:
            return None
        try:
            loaded = faiss_index.load_index(folder, fingerprint, mmap=mmap_wanted(collection, stamp), stamp=stamp)
            if not faiss_index.verify_lists(folder, stamp):
                raise IndexIntegrityError(f"the inverted lists of the FAISS index in {folder} do not match its stamp")
            return loaded
        except IndexIntegrityError as exc:
            if faiss_index.read_stamp(folder) != stamp:  # a writer replaced it meanwhile: read again
                continue
            log.warning("%s; searching %s exactly until `caselens index %s` rebuilds it", exc, collection.name,
                        collection.name)
            return None
    return None


_BM25: dict[tuple[str, str], bm25_index.Bm25Index] = {}  # (folder, stamp) -> index verified when loaded


def bm25_for_read(collection: Collection, texts: Any, version: int,
                  settings: bm25_index.Bm25Settings | None = None) -> bm25_index.Bm25Index:
    """The last stamped BM25 index of ``collection`` (whatever table version it was stamped with),
    without waiting for writers. When there is none (or it is damaged or of other settings) it
    is built and written if no writer holds the collection, else built in memory from
    ``texts()`` -> (rows, texts) of the reader's snapshot at ``version``."""
    settings = settings or bm25_index.Bm25Settings()
    folder = collection.layout.bm25_dir
    for _ in range(2):
        stamp = bm25_index.read_stamp(folder)
        if stamp is not None and stamp.settings == asdict(settings):
            key = (str(folder), repr(sorted(asdict(stamp).items())))
            if key in _BM25:
                return _BM25[key]
            try:
                index = bm25_index.load(folder)
            except IndexIntegrityError as exc:
                log.warning("%s", exc)
            else:
                _BM25.clear()  # one loaded index per process
                _BM25[key] = index
                return index
        with collection.lock.try_hold() as held:
            if not held:
                break
            refresh_bm25(collection, settings, force=stamp is not None)
    rows, values = texts()
    log.info("BM25 index of %s is being written by another process; indexing %d texts in memory",
             collection.name, len(rows))
    return bm25_index.build_in_memory(rows, values, version, settings)


# ---------------------------------------------------------------- optimize
@dataclass
class OptimizeReport:
    """What ``optimize`` found and did."""

    collection: str
    factory_before: str  # index type before
    recall_before: float | None  # recall@k measured on fresh held-out vectors before
    tombstones: int  # tombstoned ids before
    growth: float  # vectors added since training / vectors trained on
    rebuilt: bool  # whether the index was rebuilt (retrained, possibly another type)
    reason: str  # why it was or was not rebuilt
    factory_after: str  # index type after
    recall_after: float | None  # recall after (measured by the choice when rebuilt)
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def optimize(collection: Collection, config: ChoiceConfig | None = None, force: bool = False) -> OptimizeReport:
    """Compact the table; measure the index's recall on fresh held-out vectors and rebuild
    (retrain, re-choose) when it is below target, when tombstones exceed
    :data:`REBUILD_TOMBSTONES` or the index grew past :data:`REBUILD_GROWTH` since training."""
    start = time.perf_counter()
    with collection.lock.hold():
        collection.compact()
        stamp = refresh(collection)  # bring up to date first
        cfg = config or stored_config(stamp)
        index, stamp = faiss_index.load_index(collection.layout.faiss_dir, collection.encoder["fingerprint"])
        rows, vecs = collection.vectors()
        recall = evaluate(index, vecs, rows, cfg, stamp.params, stamp.deleted) if len(rows) > 1 else 1.0
        growth = stamp.added_since_build / max(1, stamp.trained_on)
        tomb = len(stamp.deleted) / max(1, stamp.ntotal)
        reasons = []
        if force:
            reasons.append("forced")
        if recall < cfg.target_recall:
            reasons.append(f"recall {recall:.3f} below target {cfg.target_recall}")
        if tomb > REBUILD_TOMBSTONES:
            reasons.append(f"{tomb:.0%} of the index are tombstones")
        if growth > REBUILD_GROWTH and stamp.factory != "Flat":
            reasons.append(f"grew {growth:.0%} since training")
        if stamp.factory == "Flat" and len(rows) > cfg.exact_below:
            reasons.append(f"exact index over {len(rows)} vectors (> {cfg.exact_below})")
        if config is not None and config != stored_config(stamp):
            reasons.append("new settings")
        del index
        if reasons:
            new = full_build(collection, cfg)
            return OptimizeReport(collection.name, stamp.factory, round(recall, 4), len(stamp.deleted),
                                  round(growth, 3), True, "; ".join(reasons), new.factory,
                                  new.choice.get("recall"), round(time.perf_counter() - start, 2))
        return OptimizeReport(collection.name, stamp.factory, round(recall, 4), len(stamp.deleted),
                              round(growth, 3), False, f"recall {recall:.3f} meets target {cfg.target_recall}",
                              stamp.factory, round(recall, 4), round(time.perf_counter() - start, 2))


# ------------------------------------------------------------------ verify
@dataclass
class VerifyReport:
    """Result of ``verify``: problems found and what was repaired (every list of ids holds the
    first 20; the counts beside them are complete)."""

    collection: str
    items: int  # rows in the table (as its manifest counts them)
    expected: int  # ids the ledger says are stored (accepted and not deleted since)
    missing: list[str] = field(default_factory=list)  # ledger-accepted ids not in the table (first 20)
    missing_count: int = 0
    missing_by_run: dict[str, int] = field(default_factory=dict)  # run that last accepted them -> count
    duplicated: list[str] = field(default_factory=list)  # ids stored more than once (first 20)
    duplicated_count: int = 0
    phantoms: list[str] = field(default_factory=list)  # stored ids with no accepted ledger row (first 20)
    phantom_count: int = 0
    bad_vectors: int = 0  # rows whose vector is missing, of the wrong size or not finite
    table_version: int | None = None  # the items table version checked
    table_problems: list[str] = field(default_factory=list)  # one line per damaged file or row problem
    damaged_files: list[str] = field(default_factory=list)  # table and ledger files, relative to the collection
    checksum_mismatches: int = 0  # rows whose stored checksum does not match what they hold
    checksum_mismatch_ids: list[str] = field(default_factory=list)
    unchecked_rows: int = 0  # rows without a checksum (written before row checksums)
    ledger_rows: int = 0
    ledger_problems: list[str] = field(default_factory=list)
    index_problems: list[str] = field(default_factory=list)  # index vs table disagreements
    index_compared: int = 0  # table vectors compared with the index's own copy
    index_exact: bool = False  # whether that copy is exact (Flat storage) or decoded (SQ)
    index_mismatches: int = 0  # vectors that differ from the index's copy
    index_mismatch_ids: list[str] = field(default_factory=list)
    self_checked: int = 0  # items searched for themselves
    self_missed: int = 0  # items that did not find themselves in their top-k
    lost_count: int = 0  # rows a repair found no good copy of (see missing / missing_by_run to ingest them again)
    repairs: list[dict[str, Any]] = field(default_factory=list)  # what each table repair did (RepairResult)
    repaired: list[str] = field(default_factory=list)  # what repair did, one line each
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    ok: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def index_vectors(index: faiss.Index, copy: bool = True) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """(ids, vectors, exact) that ``index`` keeps: exactly for Flat storage (``Flat``, ``HNSW``,
    ``IVF..,Flat``), decoded for scalar quantisers; None for codes that keep too little (PQ).
    Without ``copy``, the vectors of a Flat or HNSW index are a view of its memory (valid while
    the index lives)."""
    outer = faiss.downcast_index(index)
    if isinstance(outer, (faiss.IndexIDMap2, faiss.IndexIDMap)):
        inner = faiss.downcast_index(outer.index)
        storage = faiss.downcast_index(inner.storage) if isinstance(inner, faiss.IndexHNSW) else inner
        if not isinstance(storage, faiss.IndexFlat):
            return None
        n, d = storage.ntotal, storage.d
        vectors = faiss.rev_swig_ptr(storage.get_xb(), n * d).reshape(n, d) if n else np.zeros((0, d), np.float32)
        vectors = vectors.copy() if copy else vectors
        return faiss_index.index_ids(index), vectors, True
    ivf = faiss_index.ivf_of(index)
    if ivf is None or isinstance(outer, faiss.IndexPreTransform):
        return None
    exact = isinstance(ivf, faiss.IndexIVFFlat)
    if not exact and not isinstance(ivf, faiss.IndexIVFScalarQuantizer):
        return None
    ids, parts = [], []
    invlists = ivf.invlists
    for lst in range(ivf.nlist):
        size = invlists.list_size(lst)
        if not size:
            continue
        id_ptr = invlists.get_ids(lst)
        ids.append(faiss.rev_swig_ptr(id_ptr, size).copy())
        invlists.release_ids(lst, id_ptr)
        code_ptr = invlists.get_codes(lst)
        codes = faiss.rev_swig_ptr(code_ptr, size * ivf.code_size).copy()
        invlists.release_codes(lst, code_ptr)
        if exact:
            parts.append(codes.view(np.float32).reshape(size, ivf.d))
        else:
            decoded = ivf.sq.decode(codes.reshape(size, ivf.code_size))
            if ivf.by_residual:
                decoded = decoded + ivf.quantizer.reconstruct(lst)
            parts.append(decoded)
    if not ids:
        return np.zeros(0, np.int64), np.zeros((0, ivf.d), np.float32), exact
    return np.concatenate(ids).astype(np.int64), np.concatenate(parts).astype(np.float32), exact


def _exact_index_vectors(collection: Collection) -> Any:
    """A function rows -> {row: vector} over the exact copies the FAISS index keeps (for repairs),
    or None when the index keeps none."""
    try:
        index, _ = faiss_index.load_index(collection.layout.faiss_dir, collection.encoder["fingerprint"], cached=False)
    except (IndexIntegrityError, EncoderMismatchError, OSError):
        return None
    kept = index_vectors(index)
    if kept is None or not kept[2]:
        return None
    ids, vectors, _ = kept
    where = {int(i): p for p, i in enumerate(ids.tolist())}

    def lookup(rows: np.ndarray) -> dict[int, np.ndarray]:
        return {int(r): vectors[where[int(r)]] for r in rows if int(r) in where}

    return lookup


def _matrix(table: Any, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, good) of a table's ``vector`` column: rows with a missing, misshapen or
    non-finite vector are not good."""
    n = table.num_rows
    vec_col = table.column("vector")
    good = np.ones(n, bool)
    vecs = np.zeros((n, dim), np.float32)
    if not n:
        return vecs, good
    if vec_col.null_count:
        good &= ~np.asarray(vec_col.is_null().to_numpy(zero_copy_only=False))
    flat = np.asarray(vec_col.combine_chunks().flatten().to_numpy(zero_copy_only=False), np.float32)
    if flat.size == good.sum() * dim:
        vecs[good] = flat.reshape(-1, dim)
        good &= np.isfinite(vecs).all(axis=1)
    else:
        good[:] = False
    return vecs, good


def _ledger_columns() -> list[str]:
    from caselens.indexes.ledger import LEDGER_SCHEMA

    return [f.name for f in LEDGER_SCHEMA]


def verify(collection: Collection, repair: bool = False, sample: int | None = None,
           k: int = 10) -> VerifyReport:
    """Check the collection's source of truth and its index:

    - every file of the items table and the ledger reads, and every row matches its checksum
      (:func:`caselens.indexes.integrity.check_table`; damaged files are named);
    - every item the ledger accepted is in the table exactly once with a finite vector of the
      right dimension, and every stored item has an accepted ledger row (else: a phantom);
    - the FAISS index holds exactly the table's rows, keeps the same vectors where it keeps
      them (Flat storage exactly, scalar quantisers within their precision), and each item (or
      ``sample`` of them) finds itself in its top ``k``.

    With ``repair``: a damaged table or ledger gets a new version made of the good copies of its
    rows (:func:`caselens.indexes.integrity.repair_table`: nothing is deleted, what had no good
    copy is counted as lost and its ids listed with the runs that stored them), phantoms get an
    accepted ledger row, and a disagreeing or damaged index is rebuilt from the table.
    """
    from caselens.indexes.integrity import check_table, repair_table
    from caselens.indexes.ledger import LedgerEntry, expected_ids, normalise

    start = time.perf_counter()
    report = VerifyReport(collection=collection.name, items=0, expected=0)
    ledger = collection.ledger_table
    damaged_dir = collection.layout.damaged_dir
    with collection.lock.hold() if repair else contextlib.nullcontext():
        if repair and not ledger.exists():  # a writer killed while creating it: nothing was ever recorded
            ledger.create()
            report.repaired.append("ledger: created (no version of it had been committed)")
        ledger_check = check_table(ledger.guard, keep=_ledger_columns())
        if repair and ledger_check.damaged:
            result = repair_table(ledger.guard, collection.lock, damaged_dir, ledger_check)
            report.repairs.append(result.to_dict())
            report.repaired.extend(result.summary())
            if result.lost:
                report.notes.append(f"ledger: {result.lost} rows had no good copy; stored items without an accepted "
                                    "row are listed as phantoms (and given one by this repair)")
            ledger_check = check_table(ledger.guard, keep=_ledger_columns())
        report.ledger_problems = ledger_check.problems()
        report.ledger_rows = ledger_check.rows
        ledger_rows = ledger_check.data
        if ledger_rows is not None:  # rows that do not match their checksum say nothing reliable
            ledger_rows = normalise(ledger_rows.filter(ledger_rows.column("_ok")).drop_columns(["_ok"]))
        if ledger_rows is not None and ledger_rows.num_rows > 1:
            ledger_rows = ledger_rows.take(np.argsort(ledger_rows.column("seq").to_numpy(), kind="stable"))
        expected = expected_ids(ledger_rows) if ledger_rows is not None else set()
        report.expected = len(expected)

        keep = ("id", "_row", "vector", "source")
        items_check = check_table(collection.guard, keep=keep)
        if repair and items_check.damaged:
            result = repair_table(collection.guard, collection.lock, damaged_dir, items_check, expected_ids=expected,
                                  vectors_from_index=_exact_index_vectors(collection))
            report.repairs.append(result.to_dict())
            report.repaired.extend(result.summary())
            report.lost_count += result.lost
            if result.version_after is not None:  # row numbers of lost rows are never handed out again
                collection.keep_next_row(max(result.max_row + 1 + result.lost, _index_next_row(collection)))
            items_check = check_table(collection.guard, keep=keep)
        _report_table(report, items_check)
        report.damaged_files += [f for f in ledger_check.damaged_files if f not in report.damaged_files]
        table = items_check.data
        if table is None:
            import pyarrow as pa

            table = pa.table({"id": pa.array([], pa.string()), "_row": pa.array([], pa.int64()),
                              "vector": pa.array([], pa.list_(pa.float32(), collection.dim)),
                              "source": pa.array([], pa.string()), "_ok": pa.array([], pa.bool_())})
        ids = table.column("id").to_pylist()
        counts = Counter(ids)
        dup = sorted(i for i, c in counts.items() if c > 1)
        report.duplicated, report.duplicated_count = dup[:20], len(dup)
        missing = sorted(expected - set(counts))
        report.missing, report.missing_count = missing[:20], len(missing)
        if missing and ledger_rows is not None:
            report.missing_by_run = _runs_of(ledger_rows, set(missing))
        phantoms = sorted(set(counts) - expected)
        if repair and phantoms and not ledger_check.damaged:
            recorded = _record_phantoms(collection, ledger_rows, table, phantoms, LedgerEntry)
            if recorded:
                report.repaired.append(f"ledger: recorded {len(recorded)} stored item(s) that had no accepted row as "
                                       "accepted (reason_code recovered)")
                phantoms = sorted(set(phantoms) - recorded)
        report.phantoms, report.phantom_count = phantoms[:20], len(phantoms)
        rows = table.column("_row").to_numpy().astype(np.int64)
        vecs, good = _matrix(table, collection.dim)
        report.bad_vectors = int((~good).sum())
        if len(np.unique(rows)) != len(rows):
            report.index_problems.append("row numbers are not unique in the table")
        # rows of files that cannot be read are unknown: the index cannot be judged against them
        unusable = not repair and (items_check.version is None or bool(items_check.bad_manifests)
                                   or any(f.error for f in items_check.fragments))

        def check_index() -> None:
            report.index_problems = [p for p in report.index_problems if p.startswith("row numbers")]
            report.index_compared = report.index_mismatches = 0
            report.index_mismatch_ids = []
            stamp = faiss_index.read_stamp(collection.layout.faiss_dir)
            if stamp is None:
                report.index_problems.append("no FAISS index")
                return
            try:
                index, stamp = faiss_index.load_index(collection.layout.faiss_dir, collection.encoder["fingerprint"],
                                                      cached=False)
            except Exception as exc:  # EncoderMismatchError / IndexIntegrityError: both mean rebuild
                report.index_problems.append(str(exc).split(";")[0])
                return
            if not faiss_index.verify_lists(collection.layout.faiss_dir, stamp):
                report.index_problems.append("the index's on-disk inverted lists do not match its stamp")
            if stamp.table_version != items_check.version:
                report.index_problems.append(f"index is of table version {stamp.table_version}, table is at "
                                             f"{items_check.version}")
            live = np.setdiff1d(faiss_index.index_ids(index), np.asarray(stamp.deleted, np.int64))
            extra, absent = np.setdiff1d(live, rows), np.setdiff1d(rows[good], live)
            if len(extra):
                report.index_problems.append(f"{len(extra)} index entries have no table row")
            if len(absent):
                report.index_problems.append(f"{len(absent)} table rows are not in the index")
            _compare_with_index(report, index, rows, vecs, good, ids)
            if len(rows) and not report.index_problems:
                _self_search(report, index, stamp, rows, vecs, good, sample, k)

        if unusable:
            report.notes.append("the rows of files that cannot be read count as missing, and the index was not "
                                "checked (run with --repair)")
        else:
            check_index()
            table_repaired = any(r["table"] == "items" for r in report.repairs)
            if repair and (report.index_problems or table_repaired):
                stamp = refresh(collection, rebuild=True)
                report.repaired.append(f"rebuilt the FAISS index ({stamp.factory}, {stamp.ntotal} vectors)")
                check_index()
                if table_repaired and bm25_index.read_stamp(collection.layout.bm25_dir) is not None:
                    refresh_bm25(collection, force=True)
                    report.repaired.append("rebuilt the BM25 index")
        if report.unchecked_rows:
            report.notes.append(f"{report.unchecked_rows} rows have no checksum (written before caselens kept row "
                                "checksums): silent changes to them are found only where the index keeps vectors")
        if repair and (report.missing_count or report.duplicated_count or report.bad_vectors):
            report.repaired.append("items the table lacks are not invented and stored rows are never dropped: "
                                   "ingest the missing ones again (verify --repair --reingest); review duplicated ids")
    report.ok = not (report.missing_count or report.duplicated_count or report.bad_vectors or report.index_problems
                     or report.table_problems or report.ledger_problems or report.phantom_count)
    report.seconds = round(time.perf_counter() - start, 3)
    return report


def _report_table(report: VerifyReport, check: Any) -> None:
    report.table_version = check.version
    report.table_problems = check.problems()
    report.damaged_files = check.damaged_files
    report.checksum_mismatches = check.bad_rows
    report.checksum_mismatch_ids = check.bad_examples[:20]
    report.unchecked_rows = check.unchecked_rows
    report.items = sum(f.rows for f in check.fragments)


def _runs_of(ledger_rows: Any, ids: set[str]) -> dict[str, int]:
    """run -> how many of ``ids`` it was the last to accept."""
    import pyarrow as pa
    import pyarrow.compute as pc

    accepted = ledger_rows.filter(pc.and_(pc.equal(ledger_rows.column("status"), "accepted"),
                                          pc.is_in(ledger_rows.column("item_id"), value_set=pa.array(sorted(ids), pa.string()))))
    last: dict[str, str] = {}
    for item, run in zip(accepted.column("item_id").to_pylist(), accepted.column("last_run").to_pylist()):
        last[item] = run  # rows are in seq order: the last acceptance wins
    return dict(Counter(last.values()))


def _index_next_row(collection: Collection) -> int:
    """One past the largest row number the FAISS index holds (0 without a readable index)."""
    try:
        index, _ = faiss_index.load_index(collection.layout.faiss_dir, collection.encoder["fingerprint"], cached=False)
    except (IndexIntegrityError, EncoderMismatchError, OSError):
        return 0
    ids = faiss_index.index_ids(index)
    return int(ids.max()) + 1 if len(ids) else 0


def _record_phantoms(collection: Collection, ledger_rows: Any, table: Any, phantoms: list[str],
                     entry: Any) -> set[str]:
    """Give stored items that have no accepted ledger row one (input from their duplicate row, else
    their source); items the ledger says were deleted are left as they are. Returns their ids."""
    deleted = set()
    inputs: dict[str, str] = {}
    if ledger_rows is not None:
        for item, status, inp in zip(ledger_rows.column("item_id").to_pylist(), ledger_rows.column("status").to_pylist(),
                                     ledger_rows.column("input").to_pylist()):
            if status == "deleted":
                deleted.add(item)
            elif status == "duplicate":
                inputs.setdefault(item, inp)
    sources = dict(zip(table.column("id").to_pylist(), table.column("source").to_pylist()))
    entries = [entry(input=inputs.get(i) or sources.get(i) or i, status="accepted", item_id=i, reason_code="recovered",
                     reason="stored without an accepted ledger row (a run stopped between its table and ledger "
                            "writes, or ledger rows were lost); recorded by verify --repair")
               for i in phantoms if i not in deleted]
    collection.record(f"verify-repair-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}", entries)
    return {e.item_id for e in entries}


def _compare_with_index(report: VerifyReport, index: faiss.Index, rows: np.ndarray, vecs: np.ndarray,
                        good: np.ndarray, ids: list[str]) -> None:
    """Compare the table's vectors with the copy the index keeps (where it keeps one)."""
    kept = index_vectors(index, copy=False)
    if kept is None:
        return
    index_ids, index_vecs, exact = kept
    order = np.argsort(index_ids, kind="stable")
    sorted_ids = index_ids[order]
    pos = np.minimum(np.searchsorted(sorted_ids, rows), max(len(sorted_ids) - 1, 0))
    found = good & (len(sorted_ids) > 0) & (sorted_ids[pos] == rows if len(sorted_ids) else False)
    if not found.any():
        return
    mine = vecs[found]
    theirs = index_vecs[order[pos[found]]]
    if exact:
        differ = (mine != theirs).any(axis=1)
    else:  # a scalar quantiser keeps each component to ~1/255 of its range
        norms = np.linalg.norm(mine, axis=1) * np.linalg.norm(theirs, axis=1)
        cosine = (mine * theirs).sum(axis=1) / np.maximum(norms, 1e-12)
        differ = cosine < 0.98
    report.index_compared, report.index_exact = int(found.sum()), bool(exact)
    report.index_mismatches = int(differ.sum())
    if report.index_mismatches:
        where = np.flatnonzero(found)[differ]
        report.index_mismatch_ids = [ids[i] for i in where[:20]]
        report.index_problems.append(f"{report.index_mismatches} table vectors differ from the index's "
                                     f"{'exact' if exact else 'decoded'} copy")


def _self_search(report: VerifyReport, index: faiss.Index, stamp: Any, rows: np.ndarray, vecs: np.ndarray,
                 good: np.ndarray, sample: int | None, k: int) -> None:
    pick = np.flatnonzero(good)
    if sample is not None and sample < len(pick):
        pick = np.sort(np.random.default_rng(0).choice(pick, sample, replace=False))
    report.self_checked = len(pick)
    missed = 0
    for begin in range(0, len(pick), 4096):
        part = pick[begin:begin + 4096]
        scores, found = faiss_index.search_index(index, vecs[part], k, params=stamp.params, deleted=stamp.deleted)
        for j, p in enumerate(part):
            if rows[p] in found[j]:
                continue
            # an identical vector stored under another row may take the place: still found
            own = float(vecs[p] @ vecs[p])
            if not (len(found[j]) and found[j][0] >= 0 and scores[j][0] >= own - 1e-4 and
                    np.allclose(vecs[rows == found[j][0]][:1], vecs[p], atol=1e-6)):
                missed += 1
    report.self_missed = missed
    if missed > max(0, int(0.05 * len(pick))):
        report.index_problems.append(f"{missed} of {len(pick)} items do not find themselves in their top {k}")

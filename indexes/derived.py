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

import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np

from caselens.errors import IndexIntegrityError
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
    """Result of ``verify``: problems found and what was repaired."""

    collection: str
    items: int  # rows in the table
    expected: int  # ids the ledger says are stored (accepted and not deleted since)
    missing: list[str] = field(default_factory=list)  # ledger-accepted ids not in the table (first 20)
    missing_count: int = 0
    duplicated: list[str] = field(default_factory=list)  # ids stored more than once (first 20)
    duplicated_count: int = 0
    bad_vectors: int = 0  # rows whose vector is missing, of the wrong size or not finite
    index_problems: list[str] = field(default_factory=list)  # index vs table disagreements
    self_checked: int = 0  # items searched for themselves
    self_missed: int = 0  # items that did not find themselves in their top-k
    repaired: list[str] = field(default_factory=list)  # what repair did
    ok: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _expected_ids(ledger: list[dict]) -> set[str]:
    """Ids whose last ledger event is ``accepted`` (``deleted`` later removes them)."""
    state: dict[str, bool] = {}
    for row in sorted(ledger, key=lambda r: r["time"]):  # stable: equal times keep append order
        if not row["item_id"]:
            continue
        if row["status"] == "accepted":
            state[row["item_id"]] = True
        elif row["status"] == "deleted":
            state[row["item_id"]] = False
    return {i for i, present in state.items() if present}


def verify(collection: Collection, repair: bool = False, sample: int | None = None,
           k: int = 10) -> VerifyReport:
    """Check that every item the ledger accepted is in the table exactly once with a finite
    vector of the right dimension, that the FAISS index holds exactly the table's rows at its
    version, and that each item (or ``sample`` of them) finds itself in its top ``k``.

    With ``repair``, a disagreeing or damaged index is rebuilt from the table; table rows are
    never dropped (missing or duplicated items are reported for re-ingest or review).
    """
    report = VerifyReport(collection=collection.name, items=collection.count(), expected=0)
    table = collection.rows(columns=["id", "_row", "vector"])
    ids = table.column("id").to_pylist()
    counts = Counter(ids)
    dup = sorted(i for i, c in counts.items() if c > 1)
    report.duplicated, report.duplicated_count = dup[:20], len(dup)
    expected = _expected_ids(collection.ledger())
    report.expected = len(expected)
    missing = sorted(expected - set(counts))
    report.missing, report.missing_count = missing[:20], len(missing)
    vec_col = table.column("vector")
    rows = table.column("_row").to_numpy().astype(np.int64)
    good = np.ones(len(rows), bool)
    if vec_col.null_count:
        good &= ~np.asarray(vec_col.is_null().to_numpy(zero_copy_only=False))
    if len(rows):
        flat = np.asarray(vec_col.combine_chunks().flatten().to_numpy(zero_copy_only=False), np.float32)
        if flat.size == good.sum() * collection.dim:
            vecs = np.zeros((len(rows), collection.dim), np.float32)
            vecs[good] = flat.reshape(-1, collection.dim)
            good &= np.isfinite(vecs).all(axis=1)
        else:
            good[:] = False
            vecs = np.zeros((len(rows), collection.dim), np.float32)
    else:
        vecs = np.zeros((0, collection.dim), np.float32)
    report.bad_vectors = int((~good).sum())
    if len(np.unique(rows)) != len(rows):
        report.index_problems.append("row numbers are not unique in the table")

    def check_index() -> None:
        report.index_problems = [p for p in report.index_problems if p.startswith("row numbers")]
        stamp = faiss_index.read_stamp(collection.layout.faiss_dir)
        if stamp is None:
            report.index_problems.append("no FAISS index")
            return
        try:
            index, stamp = faiss_index.load_index(collection.layout.faiss_dir, collection.encoder["fingerprint"], cached=False)
        except Exception as exc:  # EncoderMismatchError / IndexIntegrityError: both mean rebuild
            report.index_problems.append(str(exc).split(";")[0])
            return
        if not faiss_index.verify_lists(collection.layout.faiss_dir, stamp):
            report.index_problems.append("the index's on-disk inverted lists do not match its stamp")
        if stamp.table_version != collection.version:
            report.index_problems.append(f"index is of table version {stamp.table_version}, table is at "
                                         f"{collection.version}")
        live = np.setdiff1d(faiss_index.index_ids(index), np.asarray(stamp.deleted, np.int64))
        extra, absent = np.setdiff1d(live, rows), np.setdiff1d(rows[good], live)
        if len(extra):
            report.index_problems.append(f"{len(extra)} index entries have no table row")
        if len(absent):
            report.index_problems.append(f"{len(absent)} table rows are not in the index")
        if len(rows) and not report.index_problems:
            pick = np.flatnonzero(good)
            if sample is not None and sample < len(pick):
                pick = np.sort(np.random.default_rng(0).choice(pick, sample, replace=False))
            report.self_checked = len(pick)
            missed = 0
            for start in range(0, len(pick), 4096):
                part = pick[start:start + 4096]
                scores, found = faiss_index.search_index(index, vecs[part], k, params=stamp.params,
                                                         deleted=stamp.deleted)
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

    check_index()
    if repair and report.index_problems:
        stamp = refresh(collection, rebuild=True)
        report.repaired.append(f"rebuilt the FAISS index ({stamp.factory}, {stamp.ntotal} vectors)")
        check_index()
    if repair and (report.missing_count or report.duplicated_count or report.bad_vectors):
        report.repaired.append("table problems are not repaired automatically (no data is dropped): re-ingest "
                               "missing items; review duplicated ids")
    report.ok = not (report.missing_count or report.duplicated_count or report.bad_vectors or report.index_problems)
    return report

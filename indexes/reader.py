"""Dense ranking for readers: the last stamped index plus an exact scan of the rows since.

A :class:`Reader` never takes the write lock and never waits for a writer. Each query reads the
snapshot of the latest committed table version (:mod:`caselens.indexes.snapshot`) and the last
stamped FAISS index, whatever version that was stamped with (:func:`caselens.indexes.derived.load_for_read`):

- rows of the snapshot that the index does not hold (committed since it was stamped) are ranked
  exactly, brute force over their vectors, with the same filters;
- rows the index holds that the snapshot does not (deleted since, or added after the snapshot's
  version by a writer that refreshed the index meanwhile) never rank: they are excluded like
  tombstones.

So a search started during an ingest sees every row committed before it began. Row numbers are
never reused (``Collection`` keeps a high-water mark), which makes "in the index" and "in the
snapshot" comparable by number alone. With no usable index, every row is ranked exactly (and a
warning says to run ``caselens index``).

A collection with an adapter is ranked in the adapter's space (:mod:`caselens.indexes.space`):
the index holds adapted vectors, the rows since are adapted when read, and :meth:`ReadView.rank`
adapts each query, so every kind of query (image, text, a stored item's vector) passes through
the same adapter. A new adapter is picked up at the next search (its record file is probed like
the index stamp); an index of another space is not read meanwhile (rows rank exactly).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from time import monotonic
from typing import Any

import faiss
import numpy as np

from caselens.indexes import faiss_index, subset_index
from caselens.indexes.collection import Collection
from caselens.indexes.derived import load_for_read
from caselens.indexes.snapshot import Selection, Snapshot, SnapshotReader
from caselens.indexes.space import VectorSpace, record_key, space_of

log = logging.getLogger(__name__)

EXACT_BELOW = 50_000  # with an HNSW index, filtered candidate sets up to this size are ranked exactly
STAMP_RECHECK_S = 1.0  # a view whose index holds its snapshot exactly looks for a rebuilt one this often
# per view: what is derived from filters' rows (selectors, subset indexes, vectors), kept
FILTER_MEMO_BYTES = int(os.environ.get("CASELENS_FILTER_MEMO_BYTES", str(256 << 20)))
SUBSET_AT_ONCE = 20_000  # filters selecting up to this many indexed rows get an index of their own at once
FILTER_CANDIDATES = 300  # allowed rows an IVF search through a filter's bitmap sees, per hit asked


class _Memo:
    """What a view derives from the rows of a filter (:class:`_Plan`: an index of its rows, a FAISS
    ID selector, their vectors), kept for the next search with the same filter; least recently
    used entries go past a byte budget."""

    def __init__(self, budget: int):
        self.budget = budget
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Any, make: Callable[[], tuple[Any, int]]) -> Any:
        """The value kept for ``key``, or ``make()``'s (value, bytes) kept now (unless too large)."""
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit[0]
        value, size = make()
        if size <= self.budget // 4:
            with self._lock:
                if key not in self._items:
                    self._store(key, value, size)
        return value

    def put(self, key: Any, value: Any, size: int) -> None:
        """Keep ``value`` for ``key`` (in place of what was kept), unless too large."""
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if size <= self.budget // 4:
                self._store(key, value, size)

    def _store(self, key: Any, value: Any, size: int) -> None:
        self._items[key] = (value, size)
        self._bytes += size
        while self._bytes > self.budget and len(self._items) > 1:
            _, (_, dropped) = self._items.popitem(last=False)
            self._bytes -= dropped


@dataclass
class ReadView:
    """One snapshot with the index it is read through, and the rows the index does not hold."""

    snapshot: Snapshot
    index: Any  # faiss.Index or None
    stamp: faiss_index.IndexStamp | None
    excluded: list[int]  # ids in the index that must never rank (tombstones, rows not in the snapshot)
    delta_rows: np.ndarray  # sorted rows of the snapshot the index does not hold
    delta_vectors: np.ndarray  # their vectors (in ``space``), same order
    space: VectorSpace  # where vectors are compared: the encoder's, or the collection's adapter's
    live: np.ndarray | None = None  # sorted ids the index serves (kept for the next view of the same index)
    memo: _Memo = field(default_factory=lambda: _Memo(FILTER_MEMO_BYTES), repr=False)

    def __post_init__(self) -> None:
        # the index holds exactly the snapshot's rows (nothing newer to wait for)
        self.complete = self.stamp is not None and self.stamp.table_version == self.snapshot.version

    def rank(self, query: np.ndarray, k: int, allowed: np.ndarray | Selection | None = None) -> list[tuple[float, int]]:
        """Top-``k`` (cosine, row) for one unit ``query`` of the collection's encoder among the
        snapshot's rows (only the ``allowed`` rows when given: sorted row numbers, or a
        :class:`Selection` of this snapshot, whose plan is then kept for the next search with it).
        The query passes through the collection's adapter here when it has one."""
        query = np.ascontiguousarray(query, np.float32).reshape(1, -1)
        if self.space.adapted:
            query = self.space.apply(query)
        return self.rank_in_space(query, k, allowed)

    def rank_in_space(self, query: np.ndarray, k: int,
                      allowed: np.ndarray | Selection | None = None) -> list[tuple[float, int]]:
        """:meth:`rank` for a ``query`` already in this view's :attr:`space` (adapted when the
        collection has an adapter)."""
        query = np.ascontiguousarray(query, np.float32).reshape(1, -1)
        if allowed is not None:
            return self._rank_filtered(query, k, allowed)
        found: list[tuple[float, int]] = []
        index = self.index
        if index is not None and index.ntotal:
            scores, rows = faiss_index.search_index(index, query, k, params=self.stamp.params, deleted=self.excluded)
            found = [(s, r) for s, r in zip(scores[0].tolist(), rows[0].tolist()) if r >= 0]
        if not len(self.delta_rows):
            return found  # (FAISS returns them best first)
        found += _exact_top(self.delta_vectors, self.delta_rows, query, k)
        found.sort(key=lambda sr: -sr[0])  # stable: ties keep index order
        return found[:k]

    # ------------------------------------------------------------ filtered
    def _rank_filtered(self, query: np.ndarray, k: int, allowed: np.ndarray | Selection) -> list[tuple[float, int]]:
        """Top-``k`` among the allowed rows: the index's share through the index, the rows since
        it exactly. How the index ranks a filter's rows (:class:`_Plan`) is kept for the next
        search with that filter; a filter that is another one less a few rows (a per-query
        exclusion) is ranked through the other one's plan, those rows left out by an ID selector."""
        selection = allowed if isinstance(allowed, Selection) else None
        rows = allowed.rows if selection is not None else np.asarray(allowed, np.int64)
        found: list[tuple[float, int]] = []
        index = self.index
        if index is not None and index.ntotal and len(rows):
            removed = selection.removed if selection is not None else None
            if removed is not None and selection.base is None:  # every row but a few
                batch = faiss.IDSelectorBatch(np.ascontiguousarray(np.union1d(self.excluded, removed), np.int64))
                but = faiss.IDSelectorNot(batch)  # (the batch lives as long as the selector)
                scores, ids = faiss_index.search_index(index, query, k, params=self.stamp.params,
                                                       selector=(but, len(rows)), selectivity=1.0)
                found += [(s, r) for s, r in zip(scores[0].tolist(), ids[0].tolist()) if r >= 0]
            else:
                target = selection.base if removed is not None else selection
                plan = self._plan_of(target) if target is not None else self._plan(rows, True)
                found += plan.run(self, query, k, removed)
        if len(self.delta_rows):
            keep = np.isin(self.delta_rows, rows, assume_unique=True)
            found += _exact_top(self.delta_vectors[keep], self.delta_rows[keep], query, k)
        found.sort(key=lambda sr: -sr[0])  # stable: ties keep index order
        return found[:k]

    def _plan_of(self, selection: Selection) -> "_Plan":
        """The plan kept for ``selection``: made at its first search, made again at a later one when
        an index of its own rows was not worth building for one search but fits."""
        key = (selection, "plan")
        made: list[bool] = []
        plan = self.memo.get(key, lambda: made.append(True) or self._plan(selection.rows, True).kept())
        if plan.upgrade and not made:
            plan = self._plan(selection.rows, False)
            self.memo.put(key, plan, plan.nbytes)
        return plan

    def _plan(self, rows: np.ndarray, first: bool) -> "_Plan":
        """How the index ranks the allowed ``rows`` it holds (see :class:`_Plan`)."""
        index = self.index
        indexed = rows if not len(self.delta_rows) else np.setdiff1d(rows, self.delta_rows, assume_unique=True)
        if self.excluded:  # (tombstones are deleted rows: never allowed; left out to be sure)
            indexed = np.setdiff1d(indexed, np.asarray(self.excluded, np.int64), assume_unique=True)
        if not len(indexed):
            return _Plan("none")
        if len(indexed) <= EXACT_BELOW and faiss_index.hnsw_of(index) is not None:
            vectors = faiss_index.stored_vectors(index, indexed)
            if vectors is None:  # a graph over compressed vectors: read them from the table
                indexed, vectors = self.snapshot.vectors(indexed)
                vectors = self.space.apply(vectors)
            return _Plan("exact", rows=indexed, vectors=vectors, nbytes=indexed.nbytes + vectors.nbytes)
        ivf = subset_index.supports(index)
        size = subset_index.subset_bytes(index, len(indexed)) if ivf else 0
        fits = ivf and size <= self.memo.budget // 4
        if fits and (not first or len(indexed) <= SUBSET_AT_ONCE):
            sub = subset_index.subset_index(index, indexed)
            counts = subset_index.list_sizes(sub)
            return _Plan("subset", index=sub, count=len(indexed), counts=counts, nbytes=size + counts.nbytes)
        selector, bits = faiss_index.bitmap_selector(indexed)
        counts = subset_index.list_counts(index, indexed) if ivf else None
        return _Plan("bitmap", selector=selector, bits=bits, count=len(indexed), counts=counts, upgrade=fits,
                     nbytes=bits.nbytes + (counts.nbytes if counts is not None else 0))


@dataclass
class _Plan:
    """How a view's index ranks the rows of one filter.

    - ``exact``: a set of up to :data:`EXACT_BELOW` rows in an HNSW graph (which a sparse filter
      cannot be walked through), ranked from the vectors the graph keeps (``rows``, ``vectors``);
    - ``subset``: an IVF index of these rows' codes (:mod:`caselens.indexes.subset_index`; the
      same scores), which visits only them. Built at once for up to :data:`SUBSET_AT_ONCE`
      rows, at the filter's next search for more (``upgrade``), when it fits the memo's budget;
    - ``bitmap``: the view's index through a bitmap ID selector.

    With IVF, the rows each list holds (``counts``) decide ``nprobe`` per query: the nearest
    lists, at least as many as unfiltered, until they hold :data:`FILTER_CANDIDATES` allowed
    rows per hit asked -- a filter independent of the vectors costs what an unfiltered search
    costs, one that avoids the query's neighbourhood (``modality = 'CT'`` for a radiograph)
    probes on until its rows are reached. Other index types widen ``nprobe``/``efSearch`` by
    the selectivity.
    """

    kind: str
    rows: np.ndarray | None = None
    vectors: np.ndarray | None = None
    index: Any = None
    selector: Any = None
    bits: np.ndarray | None = None  # (the selector's bitmap: alive as long as the plan)
    count: int = 0
    counts: np.ndarray | None = None  # (IVF) the plan's rows in each list
    upgrade: bool = False
    nbytes: int = 0

    def kept(self) -> tuple["_Plan", int]:
        return self, self.nbytes

    def run(self, view: ReadView, query: np.ndarray, k: int, removed: np.ndarray | None) -> list[tuple[float, int]]:
        """Top-``k`` of this plan's rows, less the ``removed`` ones."""
        if self.kind == "none":
            return []
        if self.kind == "exact":
            rows, vectors = self.rows, self.vectors
            if removed is not None:
                keep = ~np.isin(rows, removed)
                rows, vectors = rows[keep], vectors[keep]
            return _exact_top(vectors, rows, query, k)
        leave_out = None
        if removed is not None and len(removed):
            batch = faiss.IDSelectorBatch(np.ascontiguousarray(removed, np.int64))
            leave_out = (batch, faiss.IDSelectorNot(batch))  # (the batch lives as long as the selector)
        params, wanted = view.stamp.params, min(self.count, FILTER_CANDIDATES * k)
        if self.kind == "subset":
            selector = leave_out[1] if leave_out is not None else None
            scores, ids = subset_index.search_covering(self.index, query, k, selector, self.counts, wanted, params)
        else:
            both = faiss.IDSelectorAnd(self.selector, leave_out[1]) if leave_out is not None else self.selector
            if self.counts is not None:
                scores, ids = subset_index.search_covering(view.index, query, k, both, self.counts, wanted, params)
            else:
                scores, ids = faiss_index.search_index(view.index, query, k, params=params, selector=(both, self.count))
        return [(s, r) for s, r in zip(scores[0].tolist(), ids[0].tolist()) if r >= 0]


EXACT_NUMPY_BELOW = 64  # rows ranked exactly by numpy; more: by FAISS on one thread (see _exact_top)


def _exact_top(vectors: np.ndarray, rows: np.ndarray, query: np.ndarray, k: int) -> list[tuple[float, int]]:
    """Top-``k`` (score, row) of ``rows`` by inner product with the one ``query``, ties by row.

    Above a few dozen rows the scan runs in FAISS on one thread: numpy's matrix-vector product
    would hand it to BLAS threads, which spin while the other core is busy (an ingest beside the
    searches): measured, p99 8.9 ms instead of 1.9 ms for 4,000 rows since the index."""
    if not len(rows):
        return []
    if len(rows) < EXACT_NUMPY_BELOW:
        scores = vectors @ query[0]
        top = np.argsort(-scores, kind="stable")[:k]
        return list(zip(scores[top].astype(float).tolist(), rows[top].tolist()))
    with faiss_index.omp_threads(1):
        scores, where = faiss.knn(np.ascontiguousarray(query, np.float32), np.ascontiguousarray(vectors, np.float32),
                                  min(k, len(rows)), metric=faiss.METRIC_INNER_PRODUCT)
    found = [(float(s), int(rows[i])) for s, i in zip(scores[0].tolist(), where[0].tolist()) if i >= 0]
    found.sort(key=lambda sr: (-sr[0], sr[1]))
    return found


def _view(snapshot: Snapshot, loaded: tuple[Any, faiss_index.IndexStamp] | None,
          previous: ReadView | None, space: VectorSpace) -> ReadView:
    if loaded is None:  # no usable index: every row ranks exactly
        rows, vectors = snapshot.vectors(snapshot.rows)
        return ReadView(snapshot, None, None, [], rows, space.apply(vectors), space)
    index, stamp = loaded
    if stamp.table_version == snapshot.version:  # the index holds exactly this version's rows
        return ReadView(snapshot, index, stamp, list(stamp.deleted), np.zeros(0, np.int64),
                        np.zeros((0, space.dim), np.float32), space)
    if previous is not None and previous.index is index and previous.live is not None:
        live = previous.live  # the index's live ids: listed once per loaded index, not per write
    else:
        live = np.setdiff1d(faiss_index.index_ids(index), np.asarray(stamp.deleted, np.int64))
    gone = live[~snapshot.contains(live)]
    excluded = sorted(set(stamp.deleted) | set(gone.tolist()))
    present = np.zeros(max(snapshot.max_row, int(live[-1]) if len(live) else -1) + 1, bool)
    present[live] = True
    delta = snapshot.rows[~present[snapshot.rows]]  # (linear time: no sort of a million rows per write)
    have_rows, have_vectors = np.zeros(0, np.int64), np.zeros((0, space.dim), np.float32)
    if (previous is not None and previous.stamp is not None and previous.stamp.checksum == stamp.checksum
            and previous.space is space):
        keep = np.isin(previous.delta_rows, delta, assume_unique=True)  # read once, kept while valid
        have_rows, have_vectors = previous.delta_rows[keep], previous.delta_vectors[keep]
    need = np.setdiff1d(delta, have_rows, assume_unique=True)
    rows, vectors = snapshot.vectors(need)
    rows, vectors = np.concatenate([have_rows, rows]), np.concatenate([have_vectors, space.apply(vectors)])
    order = np.argsort(rows, kind="stable")
    return ReadView(snapshot, index, stamp, excluded, rows[order], vectors[order], space, live=live)


class Reader:
    """What readers of one collection use: the snapshot reader and the index being read."""

    def __init__(self, collection: Collection):
        self.collection = collection
        self.snapshots = SnapshotReader(collection)
        self._lock = threading.Lock()
        self._loaded: tuple[Any, faiss_index.IndexStamp] | None = None
        self._stamp_key: tuple | None = None  # (inode, mtime, size) of the stamp file last loaded
        self._space: VectorSpace | None = None  # the vector space of the loaded index
        self._space_key: tuple | None = None  # (inode, mtime, size) of the adapter record it came from
        self._view: ReadView | None = None
        self._warned = False
        self._stamp_file = str(collection.layout.faiss_dir / faiss_index.STAMP_FILE)
        self._recheck_at = 0.0  # (monotonic) when a view that is complete looks at the stamp file again

    def invalidate(self) -> None:
        """Forget the snapshot, the loaded index and the view built from them."""
        with self._lock:
            self.snapshots.invalidate()
            self._loaded, self._stamp_key, self._view = None, None, None
            self._space, self._space_key = None, None

    def snapshot(self) -> Snapshot:
        """The snapshot of the latest committed version."""
        return self.snapshots.current()

    def view(self) -> ReadView:
        """The snapshot of the latest committed version read through the last stamped index.

        The table version is probed on every call (:meth:`SnapshotReader.latest_version`). The
        index's stamp file is looked at whenever the snapshot changed or the index does not
        hold exactly the snapshot's rows (a writer will stamp a newer one); an index that does
        is the best there is for that version (a rebuild of the same version, e.g. by
        ``caselens optimize``, is picked up within :data:`STAMP_RECHECK_S`). The adapter's record
        is probed on every call: a new adapter (or its removal) applies from the next search."""
        snapshot = self.snapshots.current()
        view = self._view
        space_key = record_key(self.collection)  # (one stat: a new adapter is used from the next search on)
        if (view is not None and view.snapshot is snapshot and view.complete and monotonic() < self._recheck_at
                and space_key == self._space_key):
            return view
        key = faiss_index.file_key(self._stamp_file)
        if (view is not None and view.snapshot is snapshot and key == self._stamp_key and key is not None
                and space_key == self._space_key):
            self._recheck_at = monotonic() + STAMP_RECHECK_S
            return view
        with self._lock:
            if self._space is None or space_key != self._space_key:  # an adapter fitted, refitted or removed
                self._space, self._space_key = space_of(self.collection), space_key
                self._stamp_key, self._view = None, None
            if key != self._stamp_key or key is None:  # a writer stamped a new index (or none yet)
                self._loaded = load_for_read(self.collection, self._space)
                self._stamp_key = key  # a damaged index is read again only once a writer replaces it
                if self._loaded is None and not self._warned and len(snapshot):
                    log.info("collection %s has no usable FAISS index; ranking exactly (build one with "
                             "`caselens index %s`)", self.collection.name, self.collection.name)
                    self._warned = True
            view = self._view
            if view is None or view.snapshot is not snapshot or view.stamp is not (self._loaded or (None, None))[1]:
                view = _view(snapshot, self._loaded, view, self._space)
                self._view = view
            self._recheck_at = monotonic() + STAMP_RECHECK_S
            return view


_READERS: "weakref.WeakKeyDictionary[Collection, Reader]" = weakref.WeakKeyDictionary()
_READERS_LOCK = threading.Lock()


def reader_of(collection: Collection) -> Reader:
    """The reader of this ``Collection`` object (made on first use, gone with the object)."""
    reader = _READERS.get(collection)
    if reader is None:
        with _READERS_LOCK:
            reader = _READERS.setdefault(collection, Reader(collection))
    return reader

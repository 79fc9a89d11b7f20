"""What a reader sees: one version of a collection's items table.

A :class:`Snapshot` is built from one table version and never changes: its row numbers, the
non-vector columns in memory (the join cache, when they fit), the id map, filters evaluated
against that version, and vectors read at that version. Readers never take the write lock and
never wait for writers: Lance versions are immutable, so a snapshot reads exactly what was
committed at its version while writers go on committing new ones.

:class:`SnapshotReader` owns the version probe and the current snapshot of one collection: each
call of :meth:`SnapshotReader.current` returns the snapshot of the latest committed version,
built incrementally from the previous one when rows were only added (the rows since are read,
not the whole table), and :meth:`SnapshotReader.invalidate` drops everything it holds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from caselens.errors import QueryError, TableDamagedError
from caselens.indexes.collection import CHECKSUM_COLUMN, Collection, lance_filter, take_rows, vectors_of
from caselens.indexes.damage import LanceGuard
from caselens.indexes.filters import Unsupported, conjuncts, parse
from caselens.indexes.join_cache import JoinCache

log = logging.getLogger(__name__)



def join_cache_bytes() -> int:
    """Largest in-memory copy of the non-vector columns a snapshot keeps (``CASELENS_JOIN_CACHE_BYTES``,
    default 512 MiB); above it, values are read from LanceDB per request."""
    return int(os.environ.get("CASELENS_JOIN_CACHE_BYTES", str(512 << 20)))


def _manifest_v1(version: int) -> str:
    """File name of a Lance manifest, naming scheme V1."""
    return f"{version}.manifest"


def _manifest_v2(version: int) -> str:
    """File name of a Lance manifest, naming scheme V2 (newest sorts first)."""
    return f"{(1 << 64) - 1 - version:020d}.manifest"


SELECTIONS_BYTES = 64 << 20  # filter results kept per snapshot (8 bytes a row), least recently used dropped
# a filter that takes out at most this many rows (and this share) of another is searched as that one, less them
REMOVED_FEW, REMOVED_SHARE = 4096, 0.05


class Selection:
    """The rows of one snapshot that match one filter (sorted, read-only).

    When the filter is another one (its first ``AND`` term, :attr:`base`; None: no filter at all)
    with a few rows taken out (a per-query exclusion such as the query's own patient),
    :attr:`removed` lists them: readers then search through what they keep for the base -- the
    same for every query with that filter -- and leave those rows out."""

    def __init__(self, predicate: str, rows: np.ndarray, evaluated: str, base: "Selection | None" = None,
                 removed: np.ndarray | None = None):
        rows.flags.writeable = False
        self.predicate = predicate
        self.rows = rows
        self.evaluated = evaluated  # "memory" (the in-memory columns) or "scan" (the Lance scan)
        self.base = base
        self.removed = removed  # rows = (base's rows, or every row) minus these; None: not known to be few

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + (self.removed.nbytes if self.removed is not None else 0)


class Snapshot:
    """One version of the items table, as a reader sees it (immutable once built)."""

    def __init__(self, version: int, table: Any, dim: int, columns: tuple[str, ...], cache: JoinCache | None,
                 rows: np.ndarray, guard: LanceGuard | None = None):
        self.version = version  # the table version
        self.guard = guard or _unguarded  # Lance reads run inside it: damage -> TableDamagedError
        self.dim = dim
        self.columns = columns  # the non-vector columns, in table order
        self._table = table  # the Lance dataset pinned at this version
        if len(rows) > 1 and not (rows[1:] > rows[:-1]).all():  # rows: the _row column in table order
            order = np.argsort(rows, kind="stable")
            self.rows, self._offsets = rows[order], order.astype(np.int64)
        else:  # appended in order (the usual case): no sort
            self.rows, self._offsets = rows, np.arange(len(rows), dtype=np.int64)
        self.max_row = int(self.rows[-1]) if len(self.rows) else -1
        self._cache = cache  # the non-vector columns in memory (None: too large, read per request)
        self._lock = threading.Lock()
        self._ids: dict[str, int] | None = None
        self._data: pa.Table | None = None
        self._selections: OrderedDict[Any, Selection] = OrderedDict()
        self._selected_bytes = 0

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def join_cache(self) -> JoinCache | None:
        """The non-vector columns in memory, or None when they were too large to keep."""
        return self._cache

    @property
    def data(self) -> pa.Table | None:
        """The non-vector columns of every row (``_row`` included) as one table, or None when
        they were too large to keep (:func:`join_cache_bytes`)."""
        if self._cache is None:
            return None
        with self._lock:
            if self._data is None:
                self._data = self._cache.table()
            return self._data

    # --------------------------------------------------------------- values
    @property
    def names(self) -> tuple[str, ...]:
        """Column names of :meth:`values`' lists (``_row`` first)."""
        return self._cache.names if self._cache is not None else ("_row", *[c for c in self.columns if c != "_row"])

    def values(self, row_ids: Sequence[int]) -> list[list | None]:
        """For each of ``row_ids``, its non-vector values in :attr:`names` order, or None for a row
        number this version does not hold."""
        if self._cache is not None:
            return self._cache.values(row_ids)
        names = self.names
        table = self.take(row_ids, list(names))  # guarded there
        by_row = {r[0]: r for r in zip(*(table.column(c).to_pylist() for c in names))}
        return [list(by_row[r]) if r in by_row else None for r in (int(x) for x in row_ids)]

    def row_dicts(self, row_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Non-vector columns of ``row_ids`` as dicts keyed by row number (missing rows left out)."""
        names = self.names
        return {v[0]: dict(zip(names, v)) for v in self.values(list(row_ids)) if v is not None}

    def contains(self, row_ids: np.ndarray) -> np.ndarray:
        """Which of ``row_ids`` this version holds (a boolean array)."""
        row_ids = np.asarray(row_ids, np.int64)
        if self._cache is not None:  # the row map: linear time
            where = self._cache.where
            held = (row_ids >= 0) & (row_ids < len(where))
            held[held] = where[row_ids[held]] >= 0
            return held
        if not len(self.rows):
            return np.zeros(len(row_ids), bool)
        pos = np.minimum(np.searchsorted(self.rows, row_ids), len(self.rows) - 1)
        return self.rows[pos] == row_ids

    def _column(self, name: str) -> tuple[np.ndarray, pa.ChunkedArray]:
        if self._cache is not None:
            return self._cache.column(name)
        with self.guard():
            table = self._table.to_table(columns=["_row", name])
        return table.column("_row").to_numpy().astype(np.int64), table.column(name)

    def row_of(self, item_id: str) -> int | None:
        """The row number of the item ``item_id`` in this version, or None."""
        with self._lock:
            if self._ids is None:
                rows, ids = self._column("id")
                self._ids = dict(zip(ids.to_pylist(), rows.tolist()))
        return self._ids.get(item_id)

    def texts(self) -> tuple[np.ndarray, list[str]]:
        """(row numbers, texts) of the rows that have text."""
        rows, texts = self._column("text")
        valid = pc.is_valid(texts)
        return rows[np.asarray(valid.to_numpy(zero_copy_only=False), bool)], texts.filter(valid).to_pylist()

    # -------------------------------------------------------------- filters
    def select(self, predicate: str) -> np.ndarray:
        """Sorted row numbers of this version matching the SQL ``predicate``
        (:class:`QueryError` naming the filter when it cannot be applied)."""
        return self.selection(predicate).rows

    def selection(self, predicate: str) -> Selection:
        """The rows of this version matching the SQL ``predicate`` (standard SQL, double-quoted
        identifiers), as a :class:`Selection` kept for the next search with the same filter.

        Evaluated over the in-memory columns (:mod:`caselens.indexes.filters`; each top-level
        ``AND`` term's rows are kept per segment of the join cache, so a filter combined with a
        per-query exclusion evaluates only the exclusion), or by a Lance scan of this version
        when the columns are not in memory or the predicate uses SQL the evaluator does not
        read. :class:`QueryError` naming the filter when it cannot be applied."""
        with self._lock:
            hit = self._selections.get(predicate)
            if hit is not None:
                self._selections.move_to_end(predicate)
                return hit
        selection = None
        if self._cache is not None:
            try:
                selection = self._evaluate(predicate, conjuncts(parse(predicate)))
            except Unsupported:
                pass
        if selection is None:
            selection = Selection(predicate, self.scan(predicate), "scan")
        return self._keep(predicate, lambda: selection)

    def _evaluate(self, predicate: str, terms: tuple) -> Selection:
        """``predicate``'s selection from the in-memory columns: when it is its first ``AND`` term
        (or no filter) less a few rows, as that, less them (so that readers rank it through what
        they keep for that term)."""
        cache = self._cache
        if len(terms) > 1:
            base = self._keep(("terms", terms[0]), lambda: Selection(str(terms[0]), cache.select(terms[:1]), "memory"))
            removed = cache.removed(base.rows, terms[1:], min(REMOVED_FEW, int(REMOVED_SHARE * len(base)) + 1))
            if removed is not None:
                rows = np.delete(base.rows, np.searchsorted(base.rows, removed))
                return Selection(predicate, rows, "memory", base, removed)
            return Selection(predicate, cache.select(terms), "memory")
        rows = cache.select(terms)
        few = min(REMOVED_FEW, int(REMOVED_SHARE * len(self)) + 1)
        removed = cache.removed(None, terms, few) if len(self) - len(rows) < few else None
        return Selection(predicate, rows, "memory", None, removed)

    def _keep(self, key: Any, make: Any) -> Selection:
        """The selection kept under ``key``, or ``make()``'s, kept now (least recently used dropped
        past :data:`SELECTIONS_BYTES`)."""
        with self._lock:
            hit = self._selections.get(key)
            if hit is not None:
                self._selections.move_to_end(key)
                return hit
        selection = make()
        with self._lock:
            old = self._selections.pop(key, None)
            self._selected_bytes += selection.nbytes - (old.nbytes if old is not None else 0)
            self._selections[key] = selection
            while self._selected_bytes > SELECTIONS_BYTES and len(self._selections) > 1:
                _, dropped = self._selections.popitem(last=False)
                self._selected_bytes -= dropped.nbytes
        return selection

    def scan(self, predicate: str) -> np.ndarray:
        """Sorted row numbers of this version matching ``predicate``, by a Lance scan."""
        where = lance_filter(predicate)
        try:
            with self.guard(where, self._table):  # damage while reading: TableDamagedError, not a filter error
                found = self._table.to_table(columns=["_row"], filter=where)
        except TableDamagedError:
            raise
        except Exception as exc:  # Lance raises several types for a bad predicate
            raise QueryError(f"filter {predicate!r} could not be applied: {str(exc).splitlines()[0]}") from None
        return np.sort(found.column("_row").to_numpy().astype(np.int64))

    # -------------------------------------------------------------- vectors
    def take(self, row_ids: Sequence[int], columns: Sequence[str]) -> pa.Table:
        """``columns`` of the rows numbered ``row_ids`` at this version, read by position (no scan)."""
        with self.guard():
            return take_rows(self._table, self.rows, self._offsets, row_ids, columns)

    def vectors(self, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row numbers, vectors) of ``row_ids`` at this version, in the order of the row numbers
        asked (rows this version does not hold are left out)."""
        row_ids = np.unique(np.asarray(row_ids, np.int64))
        if not len(row_ids):
            return vectors_of(pa.table({"_row": pa.array([], pa.int64())}), self.dim)
        if len(row_ids) == len(self.rows):  # all of them: one scan
            with self.guard():
                table = self._table.to_table(columns=["_row", "vector"])
        else:
            table = self.take(row_ids, ["_row", "vector"])
        rows, vectors = vectors_of(table, self.dim)
        order = np.argsort(rows, kind="stable")
        return rows[order], vectors[order]


@contextlib.contextmanager
def _unguarded(*_: Any) -> Iterator[None]:
    yield


def _read_columns(table: Any, columns: Sequence[str], where: str | None = None) -> pa.Table:
    return table.to_table(columns=list(columns), filter=where)


def build_snapshot(collection: Collection, version: int, previous: Snapshot | None = None) -> Snapshot:
    """The snapshot of ``collection`` at table ``version``; when ``previous`` has the same columns
    in memory, only the rows added since are read and prepared (a new segment of its join cache),
    and rows deleted since leave its row map."""
    with collection.guard():
        return _build_snapshot(collection, version, previous)


def _build_snapshot(collection: Collection, version: int, previous: Snapshot | None) -> Snapshot:
    table = collection.dataset(version)
    columns = tuple(f.name for f in table.schema if f.name not in ("vector", CHECKSUM_COLUMN))
    rows_now = _read_columns(table, ["_row"]).column("_row").to_numpy().astype(np.int64)
    n = len(rows_now)
    cache: JoinCache | None = None
    before = previous.join_cache if previous is not None and previous.columns == columns else None
    if before is not None:
        top = len(before.where)  # a row number is never reused: rows from here on are new
        new = rows_now >= top
        if (before.where[rows_now[~new]] >= 0).all():  # the others were all there
            count = int(new.sum())
            added = _read_columns(table, columns, f"_row >= {top}") if count else \
                pa.table({c: pa.array([], table.schema.field(c).type) for c in columns})
            if added.num_rows == count:
                cache = before.extend(added, rows_now)
    if cache is None:
        limit = join_cache_bytes()
        if not n:
            cache = JoinCache.build(pa.table({c: pa.array([], table.schema.field(c).type) for c in columns}))
        elif n * 8 * len(columns) <= limit:  # a lower bound before reading; checked after
            data = _read_columns(table, columns)
            if data.nbytes <= limit:
                cache = JoinCache.build(data)
    return Snapshot(int(version), table, collection.dim, columns, cache, rows_now, collection.guard)


class SnapshotReader:
    """The current snapshot of one collection and the probe that tells when it is stale.

    Lance commits version v+1 by creating the manifest ``_versions/<name of v+1>.manifest``
    (put-if-not-exists or rename-if-not-exists, whichever process writes), versions are numbered
    without gaps, and the file name follows from the number (naming scheme V1:
    ``{v}.manifest``; V2: ``{2**64 - 1 - v:020}.manifest``). So while the next version's
    manifest does not exist, the snapshot's version is still the latest: one failing ``stat()``
    per search instead of two LanceDB round trips. Existence is not a timestamp, so there is no
    mtime-granularity race. When the layout is not recognised every check goes to LanceDB;
    network file systems that cache failed lookups can hide a new manifest for a while: set
    ``CASELENS_VERSION_PROBE=0`` there.
    """

    def __init__(self, collection: Collection):
        self.collection = collection
        self._versions = collection.layout.versions_dir
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._next_manifest: str | None = None  # the manifest whose existence means "moved on"

    def invalidate(self) -> None:
        """Forget the current snapshot; the next :meth:`current` builds one from scratch."""
        with self._lock:
            self._snapshot, self._next_manifest = None, None

    def latest_version(self) -> int:
        """The latest committed table version (exact; a stat() while nothing was committed)."""
        snapshot, probe = self._snapshot, self._next_manifest
        if snapshot is not None and probe is not None and not os.access(probe, os.F_OK):
            return snapshot.version  # (access() answers without raising: no exception object per search)
        return self.collection.version

    def current(self) -> Snapshot:
        """The snapshot of the latest committed version (built now when the table moved on)."""
        version = self.latest_version()
        snapshot = self._snapshot
        if snapshot is not None and snapshot.version == version:
            return snapshot
        with self._lock:
            snapshot = self._snapshot
            if snapshot is None or snapshot.version != version:
                start = time.perf_counter()
                snapshot = build_snapshot(self.collection, version, snapshot)
                log.debug("snapshot of %s at v%d: %d rows in %.1f ms", self.collection.name, version,
                          len(snapshot), (time.perf_counter() - start) * 1000)
                self._snapshot = snapshot
                self._next_manifest = self._probe_path(version)
            return snapshot

    def _probe_path(self, version: int) -> str | None:
        if os.environ.get("CASELENS_VERSION_PROBE", "1") == "0":
            return None
        for name in (_manifest_v2, _manifest_v1):
            if os.path.exists(os.path.join(self._versions, name(version))):
                return os.path.join(self._versions, name(version + 1))
        return None

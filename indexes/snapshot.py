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
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from caselens.errors import QueryError, TableDamagedError
from caselens.indexes.collection import CHECKSUM_COLUMN, Collection, lance_filter, take_rows, vectors_of
from caselens.indexes.damage import LanceGuard
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


class Snapshot:
    """One version of the items table, as a reader sees it (immutable once built)."""

    def __init__(self, version: int, table: Any, dim: int, columns: tuple[str, ...], data: pa.Table | None,
                 rows: np.ndarray, guard: LanceGuard | None = None):
        self.version = version  # the table version
        self.guard = guard or _unguarded  # Lance reads run inside it: damage -> TableDamagedError
        self.dim = dim
        self.columns = columns  # the non-vector columns, in table order
        self._table = table  # the Lance dataset pinned at this version
        self._data = data  # the non-vector columns in memory (None: too large, read per request)
        order = np.argsort(rows, kind="stable")  # rows: the _row column in table order (offsets)
        self.rows = rows[order]  # every _row number of this version, sorted
        self._offsets = order.astype(np.int64)  # the position of each of them in the table
        self.max_row = int(self.rows[-1]) if len(self.rows) else -1
        self._cache = JoinCache(data.column("_row").to_numpy(), data) if data is not None else None
        self._lock = threading.Lock()
        self._ids: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def data(self) -> pa.Table | None:
        """The non-vector columns of every row (``_row`` included), or None when they were too
        large to keep (:func:`join_cache_bytes`)."""
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
        if not len(self.rows):
            return np.zeros(len(row_ids), bool)
        pos = np.minimum(np.searchsorted(self.rows, row_ids), len(self.rows) - 1)
        return self.rows[pos] == row_ids

    def row_of(self, item_id: str) -> int | None:
        """The row number of the item ``item_id`` in this version, or None."""
        with self._lock:
            if self._ids is None:
                if self._data is not None:
                    ids = self._data.column("id")
                else:
                    with self.guard():
                        ids = self._table.to_table(columns=["id", "_row"])
                if isinstance(ids, pa.Table):
                    self._ids = dict(zip(ids.column("id").to_pylist(), ids.column("_row").to_pylist()))
                else:
                    self._ids = dict(zip(ids.to_pylist(), self._data.column("_row").to_pylist()))
        return self._ids.get(item_id)

    def texts(self) -> tuple[np.ndarray, list[str]]:
        """(row numbers, texts) of the rows that have text."""
        if self._data is not None:
            table = self._data
        else:
            with self.guard():
                table = self._table.to_table(columns=["_row", "text"])
        table = table.filter(pc.is_valid(table.column("text")))
        return table.column("_row").to_numpy().astype(np.int64), table.column("text").to_pylist()

    # -------------------------------------------------------------- filters
    def select(self, predicate: str) -> np.ndarray:
        """Sorted row numbers of this version matching the SQL ``predicate``
        (:class:`QueryError` naming the filter when it cannot be applied)."""
        where = lance_filter(predicate)
        try:
            with self.guard(where, self._table):  # damage while reading: TableDamagedError, not a filter error
                found = self._table.to_table(columns=["_row"], filter=where)
        except TableDamagedError:
            raise
        except Exception as exc:  # LanceDB raises several types for a bad predicate
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
    """The snapshot of ``collection`` at table ``version``; when ``previous`` has the same columns,
    only the rows added since are read, and rows deleted since are dropped from its copy."""
    with collection.guard():
        return _build_snapshot(collection, version, previous)


def _build_snapshot(collection: Collection, version: int, previous: Snapshot | None) -> Snapshot:
    table = collection.dataset(version)
    columns = tuple(f.name for f in table.schema if f.name not in ("vector", CHECKSUM_COLUMN))
    rows_now = _read_columns(table, ["_row"]).column("_row").to_numpy().astype(np.int64)
    n = len(rows_now)
    data: pa.Table | None = None
    if previous is not None and previous.columns == columns and previous.data is not None:
        old = previous.data
        keep = previous.contains(rows_now)  # a row number is never reused: rows past max_row are new
        if not keep.all():
            new_rows = rows_now[~keep]
            added = _read_columns(table, columns, f"_row > {previous.max_row}") \
                if new_rows.min() > previous.max_row else None
            if added is None or added.num_rows != len(new_rows):  # not plain appends: read it all
                old = None
            else:
                old = pa.concat_tables([old, added.select(list(old.column_names))])
        if old is not None:
            if old.num_rows != n:  # rows deleted since: keep the rows this version holds
                old = old.filter(pc.is_in(old.column("_row"), value_set=pa.array(rows_now)))
            data = old
    if data is None and n:
        limit = join_cache_bytes()
        if n * 8 * len(columns) <= limit:  # a lower bound before reading; checked after
            data = _read_columns(table, columns)
            if data.nbytes > limit:
                data = None
    elif data is None:
        data = pa.table({c: pa.array([], table.schema.field(c).type) for c in columns})
    return Snapshot(int(version), table, collection.dim, columns, data, rows_now, collection.guard)


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
        if snapshot is not None and probe is not None:
            try:
                os.stat(probe)
            except FileNotFoundError:
                return snapshot.version
            except OSError:
                pass
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

"""A collection: one LanceDB database folder holding the items table and the ingest ledger.

Layout of ``<home>/<name>/``::

    lance/items.lance    ids, vectors, metadata columns, provenance (the source of truth)
    lance/ledger.lance   one row per input per ingest run: accepted, duplicate or rejected + reason
    faiss/index.faiss    derived index, stamped by faiss/index.json
    secret.key           per-collection key for pseudonyms (never printed, never stored in a table)

The encoder that produced the vectors is recorded as JSON in the items table's schema metadata
under the key ``caselens``; every later write and search is checked against it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from caselens.errors import (BadVectorError, CollectionNotFoundError, EncoderMismatchError,
                             IndexIntegrityError)
from caselens.faults import fault_point
from caselens.indexes import faiss_index

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ITEMS = "items"
LEDGER = "ledger"
_TAKE = pc.get_function("take")  # called directly: pc.take's Python wrapper costs more than the take
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Columns every items table has; metadata keys become further columns beside them.
CORE_COLUMNS = ("id", "_row", "kind", "vector", "source", "text", "provenance")
# Metadata columns created up front so filters on them always parse.
STANDARD_METADATA = ("label", "patient_id", "modality", "body_part", "study_uid", "series_uid")
LEDGER_SCHEMA = pa.schema([
    pa.field("run_id", pa.string()),
    pa.field("time", pa.string()),
    pa.field("input", pa.string()),
    pa.field("item_id", pa.string()),
    pa.field("status", pa.string()),  # accepted | duplicate | rejected
    pa.field("reason_code", pa.string()),
    pa.field("reason", pa.string()),
])


def _manifest_v1(version: int) -> str:
    """File name of a Lance manifest, naming scheme V1."""
    return f"{version}.manifest"


def _manifest_v2(version: int) -> str:
    """File name of a Lance manifest, naming scheme V2 (newest sorts first)."""
    return f"{(1 << 64) - 1 - version:020d}.manifest"


class MetadataTypeError(ValueError):
    """A metadata value that does not fit the type of its existing column."""


def default_home() -> Path:
    """Where collections live: ``$CASELENS_HOME`` or ``./caselens-data``."""
    return Path(os.environ.get("CASELENS_HOME", "caselens-data")).expanduser()


def list_collections(home: Path | None = None) -> list[str]:
    """Names of the collections under ``home``."""
    home = Path(home) if home else default_home()
    if not home.is_dir():
        return []
    return sorted(p.name for p in home.iterdir() if (p / "lance" / f"{ITEMS}.lance").exists())


def column_name(key: str) -> str:
    """The column a metadata key is stored in: lower-case letters, digits and underscores."""
    name = re.sub(r"[^0-9a-zA-Z_]+", "_", key.strip()).strip("_").lower() or "field"
    if name[0].isdigit():
        name = f"m_{name}"
    if name in CORE_COLUMNS or name.startswith("_"):
        name = f"meta_{name.lstrip('_')}"
    return name


@dataclass(frozen=True)
class LedgerEntry:
    """The fate of one input in one ingest run."""

    input: str  # what was read: a path (relative to the source root) or a corpus row reference
    status: str  # "accepted", "duplicate" (already stored, nothing added) or "rejected"
    item_id: str = ""  # id of the stored item, when there is one
    reason_code: str = ""  # short machine-readable reason for rejections ("corrupt_image", ...)
    reason: str = ""  # human-readable reason with the hint to fix


class _JoinCache:
    """The non-vector columns of one table version in memory, for joining search hits.

    A search joins ~10 rows right after FAISS has streamed its lists through the CPU caches, and
    then every library call is slow: an Arrow take and conversion of 10 rows costs 100-200 us
    there (20-40 us in a tight loop). So few rows are read straight from the Arrow buffers in
    plain Python (string offsets and bytes, int64/float64 values, validity bits; ~3-5 us a row
    there), many rows (batch joins) and tables with columns of other types go through one Arrow
    take. Strings with few distinct values are dictionary-encoded (one index to read, nothing
    to decode), ``_row`` is not stored (it is what was asked) and columns without any value are
    not read. ``where`` maps a ``_row`` number to its position (-1: no such row).
    """

    PYTHON_BELOW = 32  # rows read from the buffers in plain Python below this many, Arrow above

    def __init__(self, version: int, rows: np.ndarray, table: pa.Table):
        self.version = version
        top = int(rows.max()) + 1 if len(rows) else 0
        dtype = np.int32 if len(rows) < 2**31 else np.int64
        self.where = np.full(top, -1, dtype)  # position of each _row number, -1: none
        self.where[rows] = np.arange(len(rows), dtype=dtype)
        self._where = memoryview(self.where)  # indexing it gives Python ints, no numpy scalars
        # Columns without a single value (standard metadata the collection does not use) are
        # not read per search: kept aside, filled in as None. Nor is _row: it is what was asked.
        empty = [c for c in table.column_names
                 if c != "_row" and table.num_rows and table.column(c).null_count == table.num_rows]
        table = table.drop_columns(["_row", *empty]).combine_chunks()
        for i, name in enumerate(table.column_names):  # few distinct strings (kind, modality, ...):
            column = table.column(i)  # dictionary-encoded, one index to read and nothing to decode
            if not pa.types.is_string(column.type) or column.num_chunks != 1:
                continue
            few = min(1 << 16, table.num_rows // 8)
            sample = column.chunk(0).slice(0, 8192)
            if pc.count_distinct(sample).as_py() > max(1, len(sample) // 8):  # ids, paths: not worth it
                continue
            encoded = column.chunk(0).dictionary_encode()
            if len(encoded.dictionary) <= few:
                table = table.set_column(i, name, encoded)
        batches = table.to_batches()  # one record batch: take and conversion cost less than a table's
        self.data = batches[0] if len(batches) == 1 else table
        self.names = ("_row", *table.column_names, *empty)
        self.nones = [None] * len(empty)
        readers = [_buffer_reader(c) for c in self.data.columns] if len(batches) == 1 else [None]
        self.readers = None if None in readers else readers  # None: every read goes through Arrow

    @classmethod
    def load(cls, table: Any, columns: list[str], version: int, limit: int) -> _JoinCache | None:
        """The cache of ``columns`` of the LanceDB ``table`` as checked out, or None when it would
        take more than ``limit`` bytes."""
        data = table.search().select(columns).limit(max(1, table.count_rows())).to_arrow()
        rows = data.column("_row").to_numpy()
        top = int(rows.max()) + 1 if len(rows) else 0
        if data.nbytes + top * (4 if len(rows) < 2**31 else 8) > limit:
            return None
        return cls(version, rows, data)

    def values(self, row_ids: Sequence[int]) -> list[list | None]:
        """For each of ``row_ids``, its values in :attr:`names` order, or None for a row number
        not held here."""
        want = row_ids if isinstance(row_ids, list) else np.asarray(row_ids, np.int64).tolist()
        where, n, nones = self._where, len(self._where), self.nones
        out: list[list | None] = []
        if self.readers is not None and len(want) < self.PYTHON_BELOW:
            readers = self.readers
            for r in want:
                if not 0 <= r < n or (p := where[r]) < 0:
                    out.append(None)
                    continue
                values = [r]
                for valid, a, data, off in readers:
                    q = p + off
                    if valid is not None and not valid[q >> 3] >> (q & 7) & 1:
                        values.append(None)
                    elif data is None:  # a number
                        values.append(a[q])
                    elif type(data) is list:  # a dictionary-encoded string: index a, strings data
                        values.append(data[a[q]])
                    else:  # a string: offsets a, bytes data
                        values.append(str(data[a[q]:a[q + 1]], "utf-8"))
                out.append(values + nones)
            return out
        if not want:
            return out
        asked = np.asarray(want, np.int64)
        pos = np.full(len(asked), -1, self.where.dtype)
        known = (asked >= 0) & (asked < n)
        pos[known] = self.where[asked[known]]
        found = pos >= 0
        taken = _TAKE.call([self.data, pa.array(pos[found])]).columns if found.any() else []
        columns = [(c.cast(c.type.value_type) if pa.types.is_dictionary(c.type) else c).to_pylist()
                   for c in taken]  # (a dictionary column converts value by value: decoded first)
        rows = [[*row, *nones] for row in zip(asked[found].tolist(), *columns)]
        if len(rows) == len(want):
            return rows
        it = iter(rows)
        return [next(it) if ok else None for ok in found.tolist()]


def _buffer_reader(column: pa.Array) -> tuple | None:
    """(validity bits or None, values -- offsets for strings, indices for dictionary-encoded
    strings -- as a typed memoryview, string bytes / the dictionary's strings as a list / None,
    array offset) to read single values of ``column`` in plain Python; None for a type that is
    read through Arrow only."""
    kind = column.type
    is_text = pa.types.is_string
    strings: Any = None
    if pa.types.is_dictionary(kind) and is_text(kind.value_type) and pa.types.is_int32(kind.index_type):
        strings = column.dictionary.to_pylist()
        column, fmt = column.indices, "i"
    elif is_text(kind) or pa.types.is_large_string(kind):
        fmt = "i" if is_text(kind) else "q"
    elif pa.types.is_int64(kind):
        fmt = "q"
    elif pa.types.is_float64(kind):
        fmt = "d"
    else:
        return None
    buffers = column.buffers()
    try:
        values = memoryview(buffers[1]).cast("B").cast(fmt)
        if strings is None and (is_text(kind) or pa.types.is_large_string(kind)):
            strings = memoryview(buffers[2]).cast("B") if buffers[2] is not None else memoryview(b"")
        valid = memoryview(buffers[0]).cast("B") if buffers[0] is not None and column.null_count else None
    except (TypeError, ValueError, IndexError):
        return None
    return valid, values, strings, column.offset


_LOCKS: dict[str, threading.RLock] = {}
_LOCK_DEPTH: dict[str, int] = {}
_LOCKS_GUARD = threading.Lock()
# Facts about a collection that only its writers change (schema, next row number), kept while
# this process holds its write lock and dropped when the lock is released: no other process can
# write meanwhile (flock), and every write of this process goes through Collection methods that
# update or drop them. Keyed by collection root; "owner" is the thread holding the lock (other
# threads of this process, which wait for that lock, never read them).
_HELD: dict[str, dict[str, Any]] = {}


def _process_lock(root: Path) -> threading.RLock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(str(root), threading.RLock())


class Collection:
    """One collection: LanceDB items table + ledger + derived FAISS index."""

    def __init__(self, root: Path, db: lancedb.DBConnection, table: Any):
        self.root = root
        self.name = root.name
        self._db = db
        self._table = table
        self.info: dict[str, Any] = json.loads(table.schema.metadata[b"caselens"])
        self._index_dir = root / "faiss"
        self._stamp_file = self._index_dir / faiss_index.STAMP_FILE
        self._versions_dir = root / "lance" / f"{ITEMS}.lance" / "_versions"
        # (version, path of the next version's manifest) as of the last LanceDB version check
        self._probe: tuple[int, str] | None = None
        # ((inode, mtime, size) of the stamp file, index, stamp) last served by index()
        self._served: tuple[tuple[int, int, int], Any, faiss_index.IndexStamp] | None = None

    # ----------------------------------------------------------------- opening
    @staticmethod
    def validate_name(name: str) -> str:
        if not _NAME_RE.match(name):
            raise ValueError(f"collection name {name!r} is not allowed: use 1-64 letters, digits, "
                             "'_', '-' or '.', starting with a letter or digit")
        return name

    @classmethod
    def exists(cls, name: str, home: Path | None = None) -> bool:
        home = Path(home) if home else default_home()
        return (home / name / "lance" / f"{ITEMS}.lance").exists()

    @classmethod
    def open(cls, name: str, home: Path | None = None) -> "Collection":
        """Open an existing collection; :class:`CollectionNotFoundError` names what exists."""
        home = Path(home) if home else default_home()
        cls.validate_name(name)
        root = home / name
        if not cls.exists(name, home):
            known = ", ".join(list_collections(home)) or "none"
            raise CollectionNotFoundError(
                f"collection {name!r} not found under {home} (collections there: {known}); "
                "create it with `caselens ingest` or pass --home")
        db = lancedb.connect(str(root / "lance"))
        return cls(root, db, db.open_table(ITEMS))

    @classmethod
    def create(cls, name: str, encoder: dict[str, Any], home: Path | None = None) -> "Collection":
        """Create a collection for vectors from ``encoder`` (its JSON record: spec, options,
        fingerprint, dim, modalities)."""
        home = Path(home) if home else default_home()
        cls.validate_name(name)
        root = home / name
        if cls.exists(name, home):
            raise FileExistsError(f"collection {name!r} already exists in {home}")
        (root / "lance").mkdir(parents=True, exist_ok=True)
        info = {"format_version": FORMAT_VERSION, "name": name, "encoder": encoder,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        fields = [
            pa.field("id", pa.string(), nullable=False),
            pa.field("_row", pa.int64(), nullable=False),
            pa.field("kind", pa.string()),
            pa.field("vector", pa.list_(pa.float32(), int(encoder["dim"]))),
            pa.field("source", pa.string()),
            pa.field("text", pa.string()),
            pa.field("provenance", pa.string()),
        ] + [pa.field(c, pa.string()) for c in STANDARD_METADATA]
        schema = pa.schema(fields, metadata={"caselens": json.dumps(info, sort_keys=True)})
        db = lancedb.connect(str(root / "lance"))
        table = db.create_table(ITEMS, schema=schema)
        db.create_table(LEDGER, schema=LEDGER_SCHEMA)
        key = root / "secret.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
        log.info("created collection %s at %s", name, root)
        return cls(root, db, table)

    # ------------------------------------------------------------------ facts
    @property
    def encoder(self) -> dict[str, Any]:
        """The JSON record of the encoder this collection's vectors came from."""
        return self.info["encoder"]

    @property
    def dim(self) -> int:
        return int(self.encoder["dim"])

    @property
    def version(self) -> int:
        """Current version of the items table (grows with every write), asked of LanceDB."""
        self._table.checkout_latest()
        self._seen_version = int(self._table.version)
        self._checked_at = time.monotonic()
        self._arm_probe(self._seen_version)
        return self._seen_version

    # Every LanceDB call from Python is a round trip through LanceDB's background event loop
    # thread and its Rust runtime (thread hand-offs: 0.15 ms in a tight loop, 0.3-0.4 ms right
    # after a FAISS search, more when the cores are busy), and the version check takes two of
    # them (checkout, version). A search does not need them when the table has not moved on,
    # and that can be told exactly from the file system: Lance commits version v+1 by creating
    # the manifest file ``_versions/<name of v+1>.manifest`` (put-if-not-exists or
    # rename-if-not-exists, whichever process writes), versions are numbered without gaps, and
    # the file name follows from the number (naming scheme V1: ``{v}.manifest``; V2:
    # ``{2**64 - 1 - v:020}.manifest``). So while the next version's manifest does not exist,
    # the version last read from LanceDB is still the latest: one failing stat() per search.
    # Existence is not a timestamp, so there is no mtime-granularity race, which a check of the
    # ``_versions`` folder's mtime would have: two commits within one tick of a coarse
    # file-system clock (1-10 ms on ext4/xfs, 1-2 s on ext3/FAT/some network file systems) leave
    # the same mtime, and a reader that looked in between would miss the second one.
    # When the layout is not recognised (no manifest under either name for the version LanceDB
    # reports), every check goes to LanceDB. Network file systems that cache failed lookups (NFS
    # without ``lookupcache=positive``) could hide a new manifest for a while: set
    # CASELENS_VERSION_PROBE=0 there.
    def _arm_probe(self, version: int) -> None:
        self._probe = None
        if os.environ.get("CASELENS_VERSION_PROBE", "1") == "0":
            return
        for name in (_manifest_v2, _manifest_v1):
            if os.path.exists(os.path.join(self._versions_dir, name(version))):
                self._probe = (version, os.path.join(self._versions_dir, name(version + 1)))
                return

    def _latest_version(self) -> int:
        """The current table version, like :attr:`version`, but without a LanceDB round trip
        while the next version's manifest does not exist (exact, see :meth:`_arm_probe`)."""
        probe = self._probe
        if probe is not None:
            try:
                os.stat(probe[1])
            except FileNotFoundError:
                self._seen_version = probe[0]
                self._checked_at = time.monotonic()
                return probe[0]
            except OSError:
                pass
        return self.version

    def secret(self) -> bytes:
        """The collection's pseudonym key."""
        return bytes.fromhex((self.root / "secret.key").read_text().strip())

    def count(self, where: str | None = None) -> int:
        self._table.checkout_latest()
        return int(self._table.count_rows(where) if where else self._table.count_rows())

    def columns(self) -> list[str]:
        return [f.name for f in self._table.schema]

    def metadata_columns(self) -> list[str]:
        return [c for c in self.columns() if c not in CORE_COLUMNS]

    def check_encoder(self, encoder: dict[str, Any]) -> None:
        """Refuse an encoder whose fingerprint differs from the one the collection was built with."""
        mine = self.encoder["fingerprint"]
        if encoder["fingerprint"] != mine:
            raise EncoderMismatchError(
                f"collection {self.name!r} holds vectors from encoder {self.encoder['spec']} "
                f"(fingerprint {mine}); got {encoder['spec']} (fingerprint {encoder['fingerprint']}). "
                "Vectors from different encoders cannot be searched together: ingest into a new "
                "collection, or use the collection's own encoder.")

    # ------------------------------------------------------------------ locks
    @contextlib.contextmanager
    def write_lock(self) -> Iterator[None]:
        """Exclusive lock held by writers of this collection (ingest, add, delete, index updates).

        Re-entrant within one process (an ingest holding it may call :meth:`add`); exclusive
        between processes (``flock``) and between threads."""
        lock = _process_lock(self.root)
        with lock:
            depth = _LOCK_DEPTH.get(str(self.root), 0)
            _LOCK_DEPTH[str(self.root)] = depth + 1
            try:
                if depth:
                    yield
                    return
                with open(self.root / ".lock", "a") as fh:
                    fcntl.flock(fh, fcntl.LOCK_EX)
                    _HELD[str(self.root)] = {"owner": threading.get_ident()}
                    fault_point("lock.acquired")
                    try:
                        yield
                    finally:
                        _HELD.pop(str(self.root), None)
                        fcntl.flock(fh, fcntl.LOCK_UN)
            finally:
                _LOCK_DEPTH[str(self.root)] = depth

    def _held(self) -> dict[str, Any] | None:
        """The facts kept while this thread holds the write lock (see :data:`_HELD`), else None."""
        held = _HELD.get(str(self.root))
        return held if held is not None and held["owner"] == threading.get_ident() else None

    def _schema(self) -> pa.Schema:
        """The items table's schema: asked of LanceDB (a round trip), or kept while this thread
        holds the write lock (only writers change it, and they drop the kept one)."""
        held = self._held()
        if held is None:
            return self._table.schema
        if "schema" not in held:
            held["schema"] = self._table.schema
            held["types"] = {f.name: f.type for f in held["schema"]}
        return held["schema"]

    def _column_types(self) -> dict[str, pa.DataType]:
        held = self._held()
        if held is None:
            return {f.name: f.type for f in self._table.schema}
        self._schema()
        return held["types"]

    # ------------------------------------------------------------------ reads
    def existing_ids(self, ids: Iterable[str] | None = None) -> set[str]:
        """Ids already stored (restricted to ``ids`` when given)."""
        self._table.checkout_latest()
        if ids is not None:
            ids = list(ids)
            if not ids:
                return set()
            found: set[str] = set()
            for start in range(0, len(ids), 500):
                part = ids[start:start + 500]
                quoted = ",".join("'" + i.replace("'", "''") + "'" for i in part)
                rows = self._table.search().where(f"id IN ({quoted})").select(["id"]).limit(len(part)).to_arrow()
                found.update(rows.column("id").to_pylist())
            return found
        n = self.count()
        return set(self._table.search().select(["id"]).limit(n).to_arrow().column("id").to_pylist()) if n else set()

    def rows(self, where: str | None = None, columns: Sequence[str] | None = None,
             limit: int | None = None) -> pa.Table:
        """Rows matching the SQL predicate ``where`` (all rows when None)."""
        self._table.checkout_latest()
        query = self._table.search()
        if where:
            query = query.where(where)
        if columns:
            query = query.select(list(columns))
        return query.limit(limit or max(1, self.count())).to_arrow()

    def rows_by_row_ids(self, row_ids: Sequence[int], columns: Sequence[str] | None = None) -> dict[int, dict]:
        """Rows keyed by their ``_row`` number."""
        if not len(row_ids):
            return {}
        cached = self.row_values(row_ids) if columns is None else None
        if cached is not None:
            names, values = cached  # names[0] is "_row"
            return {v[0]: dict(zip(names, v)) for v in values if v is not None}
        cols = list(columns) if columns else [c for c in self.columns() if c != "vector"]
        if "_row" not in cols:
            cols.append("_row")
        return {row["_row"]: row for row in self.take(row_ids, cols).to_pylist()}

    def _fresh_version(self) -> int:
        """The table version, checked again unless that happened in the last 50 ms (reads of
        one search share the snapshot its index was chosen for)."""
        if time.monotonic() - getattr(self, "_checked_at", -1.0) > 0.05:
            return self._latest_version()
        return self._seen_version

    def row_values(self, row_ids: Sequence[int]) -> tuple[tuple[str, ...], list[list | None]] | None:
        """(column names, for each of ``row_ids`` its values or None when there is no such row)
        of the non-vector columns, from an in-memory copy of the table (per table version) when
        it fits ``CASELENS_JOIN_CACHE_BYTES`` (default 512 MB, read when a table version is
        first joined); None otherwise (use :meth:`rows_by_row_ids`). Search hits join their
        metadata here in microseconds instead of a LanceDB round trip."""
        version = self._fresh_version()
        cache = getattr(self, "_join_cache", None)
        if cache is None or cache.version != version:
            if getattr(self, "_join_cache_off", None) == version:
                return None
            self._join_cache = None
            limit = int(os.environ.get("CASELENS_JOIN_CACHE_BYTES", str(512 << 20)))
            cache = None
            if limit > 0:
                cache = _JoinCache.load(self._table, [c for c in self.columns() if c != "vector"], version, limit)
            if cache is None:  # off, or too large to keep: LanceDB takes by row address instead
                self._join_cache_off = version
                return None
            self._join_cache = cache
        return cache.names, cache.values(row_ids)

    def take(self, row_ids: Sequence[int], columns: Sequence[str]) -> pa.Table:
        """Columns of the rows numbered ``row_ids`` (missing ones left out), read by LanceDB row
        address: no scan, whatever the table size. The ``_row`` -> address map is built once
        per table version (one scan of ``_row``) and kept in memory."""
        version = self._fresh_version()
        cached = getattr(self, "_address_map", None)
        if cached is None or cached[0] != version:
            if self._table.count_rows() == 0:
                return self._table.search().select(list(columns)).limit(1).to_arrow().slice(0, 0)
            got = self._table.search().select(["_row"]).with_row_id(True).limit(self._table.count_rows()).to_arrow()
            rows = got.column("_row").to_numpy()
            order = np.argsort(rows, kind="stable")
            cached = (version, rows[order], got.column("_rowid").to_numpy()[order])
            self._address_map = cached
        _, rows, addresses = cached
        want = np.asarray(row_ids, np.int64)
        pos = np.minimum(np.searchsorted(rows, want), max(0, len(rows) - 1))
        found = rows[pos] == want if len(rows) else np.zeros(len(want), bool)
        wanted = [int(a) for a in addresses[pos[found]]]
        if not wanted:
            return self._table.search().select(list(columns)).limit(1).to_arrow().slice(0, 0)
        return self._table.take_row_ids(wanted).select(list(columns)).to_arrow()

    def vectors(self, where: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(row numbers, vector matrix) of the rows matching ``where``."""
        table = self.rows(where, ["_row", "vector"])
        if table.num_rows == 0:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        flat = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return (table.column("_row").to_numpy().astype(np.int64),
                np.asarray(flat, np.float32).reshape(-1, self.dim))

    # ----------------------------------------------------------------- writes
    def add_metadata_columns(self, metadata: dict[str, Any]) -> None:
        """Create the columns that the (coerced, see :meth:`coerce_metadata`) ``metadata`` needs and
        the table lacks, typed by its values (numbers: DOUBLE, else STRING), so that later
        metadata is coerced to them. An ingest that buffers rows calls this for each accepted
        item, so every item meets the columns its predecessors made, as when rows are written
        one by one."""
        with self.write_lock():
            self._ensure_columns([metadata])

    def _ensure_columns(self, rows: list[dict]) -> None:
        schema = self._column_types()
        missing: dict[str, str] = {}
        for row in rows:
            for key, value in row.items():
                if key in schema or key in missing or value is None:
                    continue
                is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
                missing[key] = "CAST(NULL AS DOUBLE)" if is_num else "CAST(NULL AS STRING)"
        if missing:
            self._table.add_columns(missing)
            self._checked_at = -1.0  # cached version is stale
            held = self._held()
            if held is not None:
                held.pop("schema", None)
                held.pop("types", None)
            log.info("collection %s: new metadata columns %s", self.name, sorted(missing))

    def coerce_metadata(self, metadata: dict[str, Any]) -> dict[str, Any]:
        """Metadata keyed by column name with values converted to the columns' types.

        Raises :class:`MetadataTypeError` for a value that cannot be converted.
        """
        types = self._column_types()
        out: dict[str, Any] = {}
        for key, value in metadata.items():
            col = column_name(key)
            if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
                out[col] = None
                continue
            kind = types.get(col)
            if kind is not None and pa.types.is_floating(kind):
                try:
                    out[col] = float(value)
                except (TypeError, ValueError):
                    raise MetadataTypeError(f"metadata {key!r}={value!r} is not a number, but column "
                                            f"{col!r} holds numbers") from None
            elif kind is not None and pa.types.is_string(kind):
                out[col] = str(value)
            else:
                out[col] = value if isinstance(value, (int, float, str)) and not isinstance(value, bool) else str(value)
        return out

    def add(self, records: list[dict[str, Any]], vectors: np.ndarray) -> int:
        """Append ``records`` (id, kind, source, text, provenance dict, metadata dict) with their
        ``vectors``; returns the new table version. Vectors must be finite and of the right size."""
        if not records:
            return self.version
        vectors = np.asarray(vectors, np.float32)
        if vectors.shape != (len(records), self.dim):
            raise BadVectorError(f"expected {len(records)} vectors of dimension {self.dim}, got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise BadVectorError("refusing to store vectors with NaN or infinite values")
        with self.write_lock():  # row numbers must not be handed out twice
            return self._add_locked(records, vectors)

    def _add_locked(self, records: list[dict[str, Any]], vectors: np.ndarray) -> int:
        start = self._next_row()
        rows = []
        for i, rec in enumerate(records):
            row = {"id": rec["id"], "_row": start + i, "kind": rec["kind"], "source": rec.get("source"),
                   "text": rec.get("text"), "provenance": json.dumps(rec.get("provenance", {}), sort_keys=True)}
            row.update(self.coerce_metadata(rec.get("metadata", {})))
            rows.append(row)
        self._ensure_columns(rows)
        schema = self._schema()
        columns = {f.name: [r.get(f.name) for r in rows] for f in schema if f.name != "vector"}
        columns["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), self.dim)
        fault_point("table.commit.before")
        self._table.add(pa.table({f.name: columns[f.name] for f in schema}, schema=schema))
        fault_point("table.commit.after")
        self._checked_at = -1.0  # cached version is stale
        held = self._held()
        if held is not None:
            held["next_row"] = start + len(rows)
        return self.version

    def _next_row(self) -> int:
        """The next free ``_row`` number: one past the largest stored (a scan of ``_row``), kept
        while this thread holds the write lock, so that a run of adds scans once, not per add."""
        held = self._held()
        if held is not None and "next_row" in held:
            return held["next_row"]
        n = self.count()
        if n == 0:
            nxt = 0
        else:
            rows = self._table.search().select(["_row"]).limit(n).to_arrow().column("_row")
            nxt = int(pa.compute.max(rows).as_py()) + 1
        if held is not None:
            held["next_row"] = nxt
        return nxt

    def compact(self) -> None:
        """Merge the small files that batch-wise writes leave behind (keeps all data and versions)."""
        from datetime import timedelta

        fault_point("table.compact.before")
        self._table.optimize(cleanup_older_than=timedelta(days=7))
        fault_point("table.compact.after")
        self._checked_at = -1.0  # cached version is stale

    def record(self, run_id: str, entries: Sequence[LedgerEntry]) -> None:
        """Append ingest outcomes to the ledger."""
        if not entries:
            return
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        ledger = self._db.open_table(LEDGER)
        fault_point("ledger.write.before")
        ledger.add(pa.table({
            "run_id": [run_id] * len(entries), "time": [now] * len(entries),
            "input": [e.input for e in entries], "item_id": [e.item_id for e in entries],
            "status": [e.status for e in entries], "reason_code": [e.reason_code for e in entries],
            "reason": [e.reason for e in entries]}, schema=LEDGER_SCHEMA))
        fault_point("ledger.write.after")

    def ledger(self, run_id: str | None = None) -> list[dict]:
        """Ledger rows, optionally of one run."""
        table = self._db.open_table(LEDGER)
        query = table.search()
        if run_id:
            query = query.where(f"run_id = '{run_id}'")
        return query.limit(max(1, table.count_rows())).to_arrow().to_pylist()

    def ledger_ids(self, status: str = "accepted") -> set[str]:
        """Item ids that have a ledger row of ``status`` (one scan of two ledger columns)."""
        if status not in ("accepted", "duplicate", "rejected", "deleted"):
            raise ValueError(f"ledger status {status!r} is not one of accepted, duplicate, rejected, deleted")
        table = self._db.open_table(LEDGER)
        n = table.count_rows()
        if not n:
            return set()
        rows = table.search().where(f"status = '{status}'").select(["item_id"]).limit(n).to_arrow()
        return {i for i in rows.column("item_id").to_pylist() if i}

    @property
    def ledger_path(self) -> Path:
        return self.root / "lance" / f"{LEDGER}.lance"

    # ------------------------------------------------------------------ index
    @property
    def index_dir(self) -> Path:
        return self._index_dir

    def build_index(self, *, rebuild: bool = False, config: Any = None,
                    progress: bool = False) -> faiss_index.IndexStamp:
        """Bring the FAISS index to the current table version and return its stamp.

        With a usable index of this encoder, new rows are added and deleted rows removed
        (no retraining); with ``rebuild``, a ``config``
        (:class:`~caselens.indexes.index_choice.ChoiceConfig`) or no usable index, the index
        type is chosen by measuring recall (see :mod:`caselens.indexes.index_choice`) and built
        from all vectors. ``progress`` shows a progress bar for full builds."""
        from caselens.indexes import maintenance

        with self.write_lock():
            if self.index_dir.exists():  # left by a writer that was killed mid-write
                faiss_index.remove_stale_temporaries(self.index_dir)
            if not rebuild and config is None:
                try:
                    index, stamp = faiss_index.load_index(self.index_dir, self.encoder["fingerprint"], cached=False)
                except IndexIntegrityError:
                    pass
                else:
                    updated = maintenance.update_index(self, index, stamp)
                    if updated is not None:
                        return updated
            return maintenance.full_build(self, config, progress=progress)

    def update_index(self) -> faiss_index.IndexStamp:
        """Incremental refresh: add new rows and remove deleted ones (full build when no index)."""
        return self.build_index()

    def index(self) -> tuple[Any, faiss_index.IndexStamp]:
        """The FAISS index for the current table version: loaded when fresh (kept in memory
        between calls of this process), brought up to date when stale (new rows added, deleted
        rows removed), rebuilt when damaged, refused (:class:`EncoderMismatchError`) when built
        by another encoder."""
        version = self._latest_version()
        served = self._served
        if served is not None:
            # The index served last time, while the table is at its version and the stamp file is
            # the same file (inode, mtime, size: writers rename a new stamp into place after the
            # index): no stamp parsing, no index file check. The index was verified for this
            # table version, so a stamp replaced unseen (a rebuild at this same table version,
            # within one clock tick, by a file that got the same inode and size) could only delay
            # the switch to the rebuilt index, never serve rows of another table version.
            key, index, stamp = served
            if stamp.table_version == version and faiss_index.file_key(self._stamp_file) == key:
                return index, stamp
        self._served = None
        fingerprint = self.encoder["fingerprint"]
        key = faiss_index.file_key(self._stamp_file)
        stamp = faiss_index.read_stamp(self.index_dir)
        if stamp is not None and stamp.encoder_fingerprint != fingerprint:
            faiss_index.load_index(self.index_dir, fingerprint)  # raises EncoderMismatchError
        if stamp is not None and stamp.table_version == version:
            try:
                index, stamp = faiss_index.load_index(self.index_dir, fingerprint, mmap=self._mmap(stamp),
                                                      stamp=stamp)
                if key is not None and faiss_index.file_key(self._stamp_file) == key:  # no writer in between
                    self._served = (key, index, stamp)
                return index, stamp
            except IndexIntegrityError as exc:
                log.warning("%s; rebuilding", exc)
                with self.write_lock():
                    from caselens.indexes import maintenance

                    maintenance.full_build(self, None)
        elif stamp is not None:
            log.info("FAISS index of %s is stale (table v%d, index v%d); updating",
                     self.name, version, stamp.table_version)
            self.build_index()
        else:
            self.build_index()
        return faiss_index.load_index(self.index_dir, fingerprint, mmap=self._mmap(faiss_index.read_stamp(self.index_dir)))

    def _mmap(self, stamp: faiss_index.IndexStamp | None) -> bool:
        """Memory-map IVF indexes larger than ``CASELENS_MMAP_ABOVE`` bytes (default 4 GiB)."""
        if stamp is None or not faiss_index.factory_lists(stamp.factory):
            return False
        limit = int(os.environ.get("CASELENS_MMAP_ABOVE", str(4 << 30)))
        try:
            return (self.index_dir / faiss_index.INDEX_FILE).stat().st_size > limit
        except OSError:
            return False

    def row_ids(self) -> np.ndarray:
        """Every ``_row`` number in the table (unsorted)."""
        if self.count() == 0:
            return np.zeros(0, np.int64)
        return self._table.search().select(["_row"]).limit(self.count()).to_arrow().column("_row").to_numpy().astype(np.int64)

    def vectors_for_rows(self, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row numbers, vectors) of the rows numbered ``row_ids`` (in table order)."""
        row_ids = np.unique(np.asarray(row_ids, np.int64))
        if not len(row_ids):
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        if row_ids[-1] - row_ids[0] + 1 == len(row_ids) and len(row_ids) > 50_000:  # appends: a range scan
            return self.vectors(f"_row >= {int(row_ids[0])} AND _row <= {int(row_ids[-1])}")
        table = self.take(row_ids, ["_row", "vector"])
        if table.num_rows == 0:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        flat = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return (table.column("_row").to_numpy().astype(np.int64),
                np.asarray(flat, np.float32).reshape(-1, self.dim))

    def delete(self, ids: Sequence[str], run_id: str | None = None) -> int:
        """Delete the items with these ``ids`` from the table, note each in the ledger as
        ``deleted``, and remove them from the FAISS index (no rebuild); returns how many were
        deleted. Searches made after this returns never see them."""
        wanted = sorted(set(ids))
        if not wanted:
            return 0
        with self.write_lock():
            present = sorted(self.existing_ids(wanted))
            held = self._held()
            if held is not None:  # as before: the next row number follows the largest left
                held.pop("next_row", None)
            for i in range(0, len(present), 1000):
                quoted = ",".join("'" + x.replace("'", "''") + "'" for x in present[i:i + 1000])
                self._table.delete(f"id IN ({quoted})")
                self._checked_at = -1.0  # cached version is stale
            self.record(run_id or f"delete-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}",
                        [LedgerEntry(input=f"delete {x}", status="deleted", item_id=x, reason_code="deleted",
                                     reason="deleted on request") for x in present])
            if present and faiss_index.read_stamp(self.index_dir) is not None:
                self.build_index()
        return len(present)

    def verify(self, repair: bool = False, sample: int | None = None) -> Any:
        """Check ledger, table and FAISS index agree (see :func:`caselens.indexes.maintenance.verify`)."""
        from caselens.indexes import maintenance

        return maintenance.verify(self, repair=repair, sample=sample)

    def optimize(self, config: Any = None, force: bool = False) -> Any:
        """Compact the table and retrain the index when drift lowered recall below target
        (see :func:`caselens.indexes.maintenance.optimize`)."""
        from caselens.indexes import maintenance

        return maintenance.optimize(self, config=config, force=force)

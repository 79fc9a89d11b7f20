"""A collection's source of truth: the LanceDB items table and the ingest ledger.

The tables are Lance datasets in LanceDB's layout (``lance/items.lance``, ``lance/ledger.lance``;
``lancedb.connect(<collection>/lance).open_table("items")`` opens them), read and written with
the ``lance`` library itself: it imports in a fraction of the time LanceDB's Python package
takes, which every command and every cold search would otherwise pay.

:class:`Collection` owns the items table (ids, vectors, metadata columns, provenance; the encoder
record as JSON in the schema metadata under the key ``caselens``), the ledger (every input and its
outcome, :mod:`caselens.indexes.ledger`), the pseudonym key and the folder
(:class:`~caselens.indexes.layout.Layout` names every file). Every row carries a checksum over its
vector and stored fields (:func:`row_checksums`, computed by :func:`caselens.indexes.rows.arrow_rows`,
which builds the rows of every writer; checked by ``verify``). Every Lance call runs inside the collection's
:class:`~caselens.indexes.damage.LanceGuard`, so a damaged file surfaces as a
:class:`~caselens.errors.TableDamagedError` naming the collection and the file, never as Lance's
own error. Writers hold :attr:`Collection.lock`; readers never do: they read a
:class:`~caselens.indexes.snapshot.Snapshot` of one table version. The derived indexes (FAISS,
BM25) are kept by :mod:`caselens.indexes.derived`, which imports this module and is never
imported by it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from caselens.errors import (BadVectorError, CollectionNotFoundError, ConfigError, EncoderMismatchError,
                             PseudonymKeyError, TableDamagedError)
from caselens.faults import fault_point
from caselens.files import atomic_write_bytes, default_home
from caselens.indexes.checksums import CHECKSUM_COLUMN, row_checksums
from caselens.indexes.damage import LanceGuard, newest_readable
from caselens.indexes.layout import Layout
from caselens.indexes.ledger import LEDGER_SCHEMA, Ledger, LedgerEntry
from caselens.indexes.lock import WriteLock
from caselens.indexes.rows import (CORE_COLUMNS, MetadataTypeError, arrow_rows, coerce_metadata, column_name,
                                   missing_columns, table_row)
from caselens.indexes.lance_lib import lance

# row_checksums is public here too: every writer of rows (Collection.add, the distributed runner through
# caselens.indexes.rows.arrow_rows) computes ``_checksum`` with it (canonical form: caselens.indexes.checksums).
__all__ = ["CHECKSUM_COLUMN", "CORE_COLUMNS", "Collection", "LEDGER_SCHEMA", "LedgerEntry", "MetadataTypeError",
           "STANDARD_METADATA", "column_name", "lance_filter", "list_collections", "quote", "row_checksums",
           "take_rows", "vectors_of"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Metadata columns created up front so filters on them always parse.
STANDARD_METADATA = ("label", "patient_id", "modality", "body_part", "study_uid", "series_uid")


def list_collections(home: Path | None = None) -> list[str]:
    """Names of the collections under ``home``."""
    home = Path(home) if home else default_home()
    if not home.is_dir():
        return []
    return sorted(p.name for p in home.iterdir() if Layout(p).exists())


def lance_filter(predicate: str | None) -> str | None:
    """An SQL predicate in Lance's dialect: standard double-quoted identifiers (``"group" = 'a'``)
    become the backticked ones Lance reads (where double quotes would make a string); single-quoted
    strings are left as they are."""
    if not predicate or '"' not in predicate:
        return predicate or None
    out, i, n = [], 0, len(predicate)
    while i < n:
        c = predicate[i]
        if c == "'":  # a string literal: copied whole ('' is an escaped quote inside it)
            j = i + 1
            while j < n and not (predicate[j] == "'" and (j + 1 >= n or predicate[j + 1] != "'")):
                j += 2 if predicate[j] == "'" else 1
            out.append(predicate[i:j + 1])
            i = j + 1
        elif c == '"':
            j = predicate.find('"', i + 1)
            if j < 0:
                return predicate  # unbalanced: let Lance report it
            out.append("`" + predicate[i + 1:j].replace("`", "``") + "`")
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def quote(value: Any) -> str:
    """``value`` as an SQL literal for a predicate (numbers as numbers, anything else a string)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(float(value))
    return "'" + str(value).replace("'", "''") + "'"


def _empty_vectors(dim: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)


def take_rows(dataset: lance.LanceDataset, rows: np.ndarray, offsets: np.ndarray, row_ids: Sequence[int],
              columns: Sequence[str]) -> pa.Table:
    """``columns`` of the rows numbered ``row_ids`` (missing ones left out) of ``dataset``, whose
    sorted ``_row`` numbers are ``rows`` at positions ``offsets``: read by position, no scan."""
    want = np.asarray(row_ids, np.int64)
    if not len(rows) or not len(want):
        return dataset.schema.empty_table().select(list(columns))
    pos = np.minimum(np.searchsorted(rows, want), len(rows) - 1)
    found = rows[pos] == want
    if not found.any():
        return dataset.schema.empty_table().select(list(columns))
    return dataset.take(offsets[pos[found]].tolist(), columns=list(columns))


def vectors_of(table: pa.Table, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(row numbers, float32 vector matrix) of an Arrow table with ``_row`` and ``vector`` columns."""
    if table.num_rows == 0:
        return _empty_vectors(dim)
    flat = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return table.column("_row").to_numpy().astype(np.int64), np.asarray(flat, np.float32).reshape(-1, dim)


class Collection:
    """One collection: the LanceDB items table, the ledger, the pseudonym key and the write lock."""

    def __init__(self, layout: Layout, dataset: lance.LanceDataset | None = None, *,
                 info: dict[str, Any] | None = None):
        self.layout = layout
        self.root = layout.root
        self.name = layout.name
        self.lock = WriteLock(layout.lock_file)
        self.guard = LanceGuard(layout.name, layout.root, layout.items_dir, "items")
        self.ledger_table = Ledger(layout.ledger_dir, self.lock,
                                   LanceGuard(layout.name, layout.root, layout.ledger_dir, "ledger"))
        if info is None:
            with self.guard():
                info = json.loads(dataset.schema.metadata[b"caselens"])
        self.info: dict[str, Any] = info
        self._items = str(layout.items_dir)
        self._offsets: tuple[int, np.ndarray, np.ndarray] | None = None  # (version, sorted _row, their offsets)

    # ----------------------------------------------------------------- opening
    @staticmethod
    def validate_name(name: str) -> str:
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ConfigError(f"collection name {name!r} is not allowed: use 1-64 letters, digits, "
                             "'_', '-' or '.', starting with a letter or digit")
        return name

    @classmethod
    def exists(cls, name: str, home: Path | None = None) -> bool:
        home = Path(home) if home else default_home()
        return Layout(home / name).exists()

    @classmethod
    def open(cls, name: str, home: Path | None = None, *, damaged: bool = False) -> "Collection":
        """Open an existing collection; :class:`CollectionNotFoundError` names what exists, and
        :class:`~caselens.errors.TableDamagedError` says when its latest table version cannot be
        read. With ``damaged`` (for ``verify``), a collection whose latest manifest does not decode
        is opened from the newest version that does (its reads still fail until it is repaired)."""
        home = Path(home) if home else default_home()
        cls.validate_name(name)
        layout = Layout(home / name)
        if not layout.exists():
            known = ", ".join(list_collections(home)) or "none"
            raise CollectionNotFoundError(
                f"collection {name!r} not found under {home} (collections there: {known}); "
                "create it with `caselens ingest` or pass --home")
        guard = LanceGuard(layout.name, layout.root, layout.items_dir, "items")
        try:
            with guard():
                return cls(layout, lance.dataset(str(layout.items_dir)))
        except TableDamagedError:
            if not damaged:
                raise
        dataset, _ = newest_readable(layout.items_dir)
        if dataset is not None:
            return cls(layout, dataset)
        with guard():  # no version decodes: the error of the latest one
            return cls(layout, lance.dataset(str(layout.items_dir)))

    @classmethod
    def create(cls, name: str, encoder: dict[str, Any], home: Path | None = None) -> "Collection":
        """Create a collection for vectors from ``encoder`` (its JSON record: spec, options,
        fingerprint, dim, modalities)."""
        home = Path(home) if home else default_home()
        cls.validate_name(name)
        layout = Layout(home / name)
        if layout.exists():
            raise FileExistsError(f"collection {name!r} already exists in {home}")
        layout.lance_dir.mkdir(parents=True, exist_ok=True)
        key = layout.secret_file
        if not key.exists():  # first: every pseudonym of the collection is keyed by it
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
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
            pa.field(CHECKSUM_COLUMN, pa.int64()),
        ] + [pa.field(c, pa.string()) for c in STANDARD_METADATA]
        schema = pa.schema(fields, metadata={"caselens": json.dumps(info, sort_keys=True)})
        guard = LanceGuard(name, layout.root, layout.items_dir, "items")
        with guard():
            Ledger(layout.ledger_dir, WriteLock(layout.lock_file),
                   LanceGuard(name, layout.root, layout.ledger_dir, "ledger")).create()
            dataset = lance.write_dataset(schema.empty_table(), str(layout.items_dir), schema=schema,
                                          mode="create")  # last: the collection exists once it does
        log.info("created collection %s at %s", name, layout.root)
        return cls(layout, dataset)

    # ------------------------------------------------------------------ facts
    @property
    def encoder(self) -> dict[str, Any]:
        """The JSON record of the encoder this collection's vectors came from."""
        return self.info["encoder"]

    @property
    def dim(self) -> int:
        return int(self.encoder["dim"])

    @property
    def items_path(self) -> Path:
        """The items table's folder (a Lance dataset), for writers of fragments."""
        return self.layout.items_dir

    def dataset(self, version: int | None = None) -> lance.LanceDataset:
        """The items table as a Lance dataset: the latest version, or ``version`` (read-only).
        Calls on it belong inside ``with collection.guard():``."""
        with self.guard():
            return lance.dataset(self._items, version=version)

    @property
    def version(self) -> int:
        """Current version of the items table (grows with every write)."""
        return int(self.dataset().version)

    def secret(self) -> bytes:
        """The collection's pseudonym key (32 bytes); :class:`PseudonymKeyError` when it is missing
        or damaged (pseudonyms under another key would not match the stored ones)."""
        path = self.layout.secret_file
        try:
            key = bytes.fromhex(path.read_text().strip())
        except FileNotFoundError:
            raise PseudonymKeyError(f"collection {self.name!r} has no pseudonym key ({path.name}); restore it "
                                 "from a backup: pseudonyms made under another key do not match") from None
        except ValueError:
            key = b""
        if len(key) < 16:
            raise PseudonymKeyError(f"the pseudonym key of collection {self.name!r} ({path.name}) is empty or "
                                 "damaged; restore it from a backup")
        return key

    def count(self, where: str | None = None) -> int:
        dataset = self.dataset()
        where = lance_filter(where)
        with self.guard(where, dataset):
            return int(dataset.count_rows(filter=where))

    def schema(self) -> pa.Schema:
        """The items table's schema: asked of LanceDB, or kept while this thread holds the write
        lock (only writers change it, and they drop the kept one)."""
        facts = self.lock.facts()
        if facts is None:
            return self.dataset().schema
        if "schema" not in facts:
            facts["schema"] = self.dataset().schema
            facts["types"] = {f.name: f.type for f in facts["schema"]}
        return facts["schema"]

    def columns(self) -> list[str]:
        """The table's columns (the internal ``_checksum`` left out)."""
        return [f.name for f in self.schema() if f.name != CHECKSUM_COLUMN]

    def metadata_columns(self) -> list[str]:
        return [c for c in self.columns() if c not in CORE_COLUMNS]

    def _column_types(self) -> dict[str, pa.DataType]:
        facts = self.lock.facts()
        if facts is None:
            return {f.name: f.type for f in self.schema()}
        self.schema()
        return facts["types"]

    def check_encoder(self, encoder: dict[str, Any]) -> None:
        """Refuse an encoder whose fingerprint differs from the one the collection was built with."""
        mine = self.encoder["fingerprint"]
        if encoder["fingerprint"] != mine:
            raise EncoderMismatchError(
                f"collection {self.name!r} holds vectors from encoder {self.encoder['spec']} "
                f"(fingerprint {mine}); got {encoder['spec']} (fingerprint {encoder['fingerprint']}). "
                "Vectors from different encoders cannot be searched together: ingest into a new "
                "collection, or use the collection's own encoder.")


    # ------------------------------------------------------------------ reads
    def existing_ids(self, ids: Iterable[str] | None = None) -> set[str]:
        """Ids already stored (restricted to ``ids`` when given)."""
        dataset = self.dataset()
        with self.guard():
            if ids is not None:
                ids = list(ids)
                found: set[str] = set()
                for start in range(0, len(ids), 500):
                    part = ids[start:start + 500]
                    rows = dataset.to_table(columns=["id"], filter=f"id IN ({','.join(quote(i) for i in part)})")
                    found.update(rows.column("id").to_pylist())
                return found
            return set(dataset.to_table(columns=["id"]).column("id").to_pylist())

    def rows(self, where: str | None = None, columns: Sequence[str] | None = None,
             limit: int | None = None) -> pa.Table:
        """Rows of the latest table version matching the SQL predicate ``where`` (all when None)."""
        dataset = self.dataset()
        where = lance_filter(where)
        with self.guard(where, dataset):
            return dataset.to_table(columns=list(columns) if columns else None, filter=where, limit=limit)

    def row_ids(self) -> np.ndarray:
        """Every ``_row`` number in the table (unsorted)."""
        return self.rows(columns=["_row"]).column("_row").to_numpy().astype(np.int64)

    def take(self, row_ids: Sequence[int], columns: Sequence[str]) -> pa.Table:
        """Columns of the rows numbered ``row_ids`` (missing ones left out) at the latest version,
        read by position: no scan, whatever the table size (the ``_row`` -> position map is built
        once per table version, one scan of ``_row``)."""
        dataset = self.dataset()
        with self.guard():
            cached = self._offsets
            if cached is None or cached[0] != dataset.version:
                rows = dataset.to_table(columns=["_row"]).column("_row").to_numpy()
                order = np.argsort(rows, kind="stable")
                cached = self._offsets = (dataset.version, rows[order], order.astype(np.int64))
            _, rows, offsets = cached
            return take_rows(dataset, rows, offsets, row_ids, columns)

    def vectors(self, where: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(row numbers, vector matrix) of the rows matching ``where``."""
        return vectors_of(self.rows(where, ["_row", "vector"]), self.dim)

    def vectors_for_rows(self, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row numbers, vectors) of the rows numbered ``row_ids`` (in table order)."""
        row_ids = np.unique(np.asarray(row_ids, np.int64))
        if not len(row_ids):
            return _empty_vectors(self.dim)
        if row_ids[-1] - row_ids[0] + 1 == len(row_ids) and len(row_ids) > 50_000:  # appends: a range scan
            return self.vectors(f"_row >= {int(row_ids[0])} AND _row <= {int(row_ids[-1])}")
        return vectors_of(self.take(row_ids, ["_row", "vector"]), self.dim)

    # ----------------------------------------------------------------- writes
    def add_metadata_columns(self, metadata: dict[str, Any]) -> None:
        """Create the columns that the (coerced, see :meth:`coerce_metadata`) ``metadata`` needs and
        the table lacks, typed by its values (numbers: DOUBLE, else STRING), so that later
        metadata is coerced to them. An ingest that buffers rows calls this for each accepted
        item, so every item meets the columns its predecessors made, as when rows are written
        one by one."""
        with self.lock.hold():
            self._ensure_columns([metadata])

    def _ensure_columns(self, rows: list[dict]) -> None:
        missing = missing_columns(rows, self._column_types())
        if CHECKSUM_COLUMN not in self._column_types():  # made before row checksums: its rows have none
            missing[CHECKSUM_COLUMN] = "CAST(NULL AS BIGINT)"
        if missing:
            with self.guard():
                self.dataset().add_columns(missing)
            facts = self.lock.facts()
            if facts is not None:
                facts.pop("schema", None)
                facts.pop("types", None)
            log.info("collection %s: new columns %s", self.name, sorted(missing))

    def coerce_metadata(self, metadata: dict[str, Any]) -> dict[str, Any]:
        """Metadata keyed by column name with values converted to the columns' types
        (:func:`caselens.indexes.rows.coerce_metadata`); :class:`MetadataTypeError` for a value
        that cannot be converted."""
        return coerce_metadata(metadata, self._column_types())

    def add(self, records: list[dict[str, Any]], vectors: np.ndarray) -> int:
        """Append ``records`` (id, kind, source, text, provenance dict, metadata dict) with their
        ``vectors``; returns the new table version. Vectors must be finite and of the right size.
        Each row gets its checksum (:func:`row_checksums`) over the values as stored."""
        if not records:
            return self.version
        vectors = np.asarray(vectors, np.float32)
        if vectors.shape != (len(records), self.dim):
            raise BadVectorError(f"expected {len(records)} vectors of dimension {self.dim}, got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise BadVectorError("refusing to store vectors with NaN or infinite values")
        with self.lock.hold():  # row numbers must not be handed out twice
            start = self._next_row()
            rows = [table_row(rec, start + i, self.coerce_metadata(rec.get("metadata", {})))
                    for i, rec in enumerate(records)]
            self._ensure_columns(rows)
            self.write_rows(arrow_rows(rows, vectors, self.schema()))  # with their checksums
            self.lock.facts()["next_row"] = start + len(rows)
            return self.version

    def write_rows(self, table: pa.Table) -> None:
        """Append rows that are complete as stored (``_row`` numbers and ``_checksum`` set, the
        table's schema): :meth:`add` and repairs use it. Call holding the write lock."""
        with self.guard():
            fault_point("table.commit.before")
            lance.write_dataset(table, self._items, mode="append")
            fault_point("table.commit.after")

    def _state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.layout.state_file.read_text())
            return state if isinstance(state, dict) else {}
        except (OSError, ValueError):
            return {}

    def keep_next_row(self, next_row: int) -> None:
        """Make sure no row number below ``next_row`` is handed out again (``state.json``); call
        holding the write lock."""
        nxt = max(int(next_row), int(self._state().get("next_row", 0)))
        atomic_write_bytes(self.layout.state_file, json.dumps({**self._state(), "next_row": nxt}).encode())
        facts = self.lock.facts()
        if facts is not None and facts.get("next_row", 0) < nxt:
            facts["next_row"] = nxt

    def next_row(self) -> int:
        """The next free ``_row`` number, for a writer holding :attr:`lock` that numbers rows itself
        (the distributed ingest); see :meth:`_next_row`."""
        if not self.lock.held():
            raise RuntimeError("next_row() is for writers: hold collection.lock first")
        return self._next_row()

    def _next_row(self) -> int:
        """The next free ``_row`` number: past the largest stored and past every number handed out
        before (``state.json`` keeps it across deletions), so a row number is never reused and a
        derived index never confuses a new row with a deleted one. Kept while this thread holds
        the write lock, so that a run of adds scans once, not per add."""
        facts = self.lock.facts()
        if facts is not None and "next_row" in facts:
            return facts["next_row"]
        n = self.count()
        stored = int(pc.max(self.rows(columns=["_row"]).column("_row")).as_py()) + 1 if n else 0
        nxt = max(stored, int(self._state().get("next_row", 0)))
        if facts is not None:
            facts["next_row"] = nxt
        return nxt

    def compact(self) -> None:
        """Merge the small files that batch-wise writes leave behind, in the table and the ledger
        (keeps all data; table versions older than a week are cleaned up)."""
        with self.lock.hold():
            with self.guard():
                dataset = self.dataset()
                fault_point("table.compact.before")
                dataset.optimize.compact_files()
                fault_point("table.compact.after")
                self.dataset().cleanup_old_versions(older_than=timedelta(days=7))
            self.ledger_table.compact()

    def delete(self, ids: Sequence[str], run_id: str | None = None) -> list[str]:
        """Delete the items with these ``ids`` from the table and note each in the ledger as
        ``deleted``; returns the ids deleted. Readers see the deletion from the next table
        version on (their snapshots leave deleted rows out of every ranking); bringing the
        derived indexes up to date is :func:`caselens.indexes.derived.delete`'s job."""
        wanted = sorted(set(ids))
        if not wanted:
            return []
        with self.lock.hold():
            present = sorted(self.existing_ids(wanted))
            if not present:
                return []
            self.keep_next_row(self._next_row())  # numbers of deleted rows are never handed out again
            with self.guard():
                for i in range(0, len(present), 1000):
                    self.dataset().delete(f"id IN ({','.join(quote(x) for x in present[i:i + 1000])})")
            self.record(run_id or f"delete-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}",
                        [LedgerEntry(input=f"delete {x}", status="deleted", item_id=x, reason_code="deleted",
                                     reason="deleted on request") for x in present])
        return present

    # ----------------------------------------------------------------- ledger
    def record(self, run_id: str, entries: Sequence[LedgerEntry]) -> None:
        """Note ingest outcomes in the ledger: one row per input and outcome, a re-run counted in
        its ``runs`` (see :mod:`caselens.indexes.ledger`)."""
        self.ledger_table.record(run_id, entries)

    def ledger(self, run_id: str | None = None, item_ids: Sequence[str] | None = None) -> list[dict]:
        """Ledger rows (in write order), optionally of one run (the rows it was the first or the last
        to meet) or of some items."""
        return self.ledger_table.rows(run_id, item_ids)

    @property
    def ledger_path(self) -> Path:
        return self.layout.ledger_dir

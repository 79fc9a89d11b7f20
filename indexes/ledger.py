"""The ingest ledger: every input of a collection and its outcome, one row per input and outcome.

A row is keyed by (input, item id, status): ``accepted`` (stored), ``duplicate`` (already stored,
nothing added), ``rejected`` (with a reason) or ``deleted``. A run that meets an input with the
same outcome again does not append a row: it adds to that row's ``runs`` and sets ``last_run``
and ``last_time`` (one Lance ``merge_insert`` per write, so a write is one commit). ``run_id``
and ``time`` stay those of the first run that met it; ``reason_code`` and ``reason`` are the
latest. ``seq`` numbers the writes of the ledger, so the last event of an item (accepted after a
deletion, or deleted after its acceptance) is known without comparing clocks.

Ledgers written before these columns (one row per input per run) are read as they are (each
row its own run) and rewritten in this form, as a new Lance version, by the first write.
Every row carries ``_checksum`` (:mod:`caselens.indexes.checksums`), checked by ``verify``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import timedelta
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caselens.indexes.lance_lib import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from caselens.faults import fault_point
from caselens.indexes.checksums import CHECKSUM_COLUMN, with_checksums
from caselens.indexes.damage import LanceGuard, manifest_versions
from caselens.indexes.lock import WriteLock

log = logging.getLogger(__name__)

LEDGER_SCHEMA = pa.schema([
    pa.field("run_id", pa.string()),  # the first run that met this input with this outcome
    pa.field("time", pa.string()),  # when (UTC, ISO 8601)
    pa.field("input", pa.string()),
    pa.field("item_id", pa.string()),
    pa.field("status", pa.string()),  # accepted | duplicate | rejected | deleted
    pa.field("reason_code", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("runs", pa.int64()),  # how many runs met it
    pa.field("last_run", pa.string()),  # the last of them
    pa.field("last_time", pa.string()),
    pa.field("seq", pa.int64()),  # the ledger write that last touched it (grows by one per write)
    pa.field("key", pa.int64()),  # hash of (input, item_id, status): the row's identity
    pa.field(CHECKSUM_COLUMN, pa.int64()),
])
OLD_COLUMNS = ("run_id", "time", "input", "item_id", "status", "reason_code", "reason")
HIDDEN = ("key", CHECKSUM_COLUMN)  # not part of what :meth:`Ledger.rows` returns
_IN_CHUNK = 1000  # values per SQL IN list


@dataclass(frozen=True)
class LedgerEntry:
    """The fate of one input in one ingest run."""

    input: str  # what was read: a path (relative to the source root) or a corpus row reference
    status: str  # "accepted", "duplicate" (already stored, nothing added), "rejected" or "deleted"
    item_id: str = ""  # id of the stored item, when there is one
    reason_code: str = ""  # short machine-readable reason for rejections ("corrupt_image", ...)
    reason: str = ""  # human-readable reason with the hint to fix


def entry_key(input_: str, item_id: str, status: str) -> int:
    """The identity of a ledger row (a signed 64-bit hash of input, item id and status)."""
    h = xxhash.xxh3_64()
    for part in (input_ or "", item_id or "", status or ""):
        data = part.encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return int(np.array([h.intdigest()], np.uint64).view(np.int64)[0])


def _sql_list(values: Sequence[Any]) -> str:
    return ",".join(str(int(v)) if isinstance(v, (int, np.integer)) else "'" + str(v).replace("'", "''") + "'"
                    for v in values)


def normalise(table: pa.Table, first_position: int = 0) -> pa.Table:
    """Ledger rows in the current form: rows of an old ledger (one per input per run) get
    ``runs`` 1, their own run as the last, and their position as ``seq``."""
    if "key" in table.schema.names:
        return table
    n = table.num_rows
    cols = {c: table.column(c) if c in table.schema.names else pa.nulls(n, pa.string()) for c in OLD_COLUMNS}
    keys = [entry_key(i, t, s) for i, t, s in zip(cols["input"].to_pylist(), cols["item_id"].to_pylist(),
                                                  cols["status"].to_pylist())]
    return pa.table({**cols, "runs": pa.array(np.ones(n, np.int64)), "last_run": cols["run_id"],
                     "last_time": cols["time"], "seq": pa.array(np.arange(first_position, first_position + n)),
                     "key": pa.array(keys, pa.int64()), CHECKSUM_COLUMN: pa.nulls(n, pa.int64())}, schema=LEDGER_SCHEMA)


def merge_old_rows(table: pa.Table) -> pa.Table:
    """One row per (input, item id, status) from rows of the old form in the order they were
    written: the first run and time kept, the last run, time and reason, the number of rows as
    ``runs``, the position of the last as ``seq``; checksummed."""
    rows = normalise(table).to_pylist()
    merged: dict[int, dict[str, Any]] = {}
    for row in rows:
        mine = merged.get(row["key"])
        if mine is None:
            merged[row["key"]] = dict(row)
        else:
            mine.update(runs=mine["runs"] + 1, last_run=row["run_id"], last_time=row["time"], seq=row["seq"],
                        reason_code=row["reason_code"], reason=row["reason"])
    out = pa.Table.from_pylist(list(merged.values()), schema=LEDGER_SCHEMA)
    return with_checksums(out.drop_columns([CHECKSUM_COLUMN]))


def expected_ids(ledger: pa.Table) -> set[str]:
    """Ids whose last event in ``ledger`` (rows in the current form) is ``accepted``: accepted,
    and not deleted since (a later acceptance brings a deleted item back)."""
    if ledger.num_rows == 0:
        return set()

    def last(status: str) -> dict[str, int]:
        part = ledger.filter(pc.and_(pc.equal(ledger.column("status"), status),
                                     pc.not_equal(pc.fill_null(ledger.column("item_id"), ""), "")))
        if part.num_rows == 0:
            return {}
        grouped = part.group_by("item_id").aggregate([("seq", "max")])
        return dict(zip(grouped.column("item_id").to_pylist(), grouped.column("seq_max").to_pylist()))

    accepted, deleted = last("accepted"), last("deleted")
    return {i for i, seq in accepted.items() if seq > deleted.get(i, -1)}


class Ledger:
    """The ledger table of one collection (``lance/ledger.lance``)."""

    def __init__(self, table_dir: Path, lock: WriteLock, guard: LanceGuard):
        self.table_dir = Path(table_dir)
        self.uri = str(table_dir)
        self.lock = lock
        self.guard = guard

    def exists(self) -> bool:
        """Whether the ledger has a committed version (a writer killed while creating it leaves a
        folder without one: nothing was ever recorded there)."""
        return bool(manifest_versions(self.table_dir))

    def create(self) -> None:
        """An empty ledger, when it has no committed version yet."""
        if not self.exists():
            with self.guard():
                lance.write_dataset(LEDGER_SCHEMA.empty_table(), self.uri, schema=LEDGER_SCHEMA, mode="create")

    def dataset(self, version: int | None = None) -> lance.LanceDataset:
        with self.guard():
            return lance.dataset(self.uri, version=version)

    # ------------------------------------------------------------------ reads
    def table(self, run_id: str | None = None, item_ids: Sequence[str] | None = None) -> pa.Table:
        """Rows (current form, ordered by ``seq``), optionally of one run (the rows it was the
        first or the last to meet) or of some items."""
        if not self.exists():
            return LEDGER_SCHEMA.empty_table()
        dataset = self.dataset()
        new = "key" in dataset.schema.names
        clauses = []
        if run_id:
            quoted = _sql_list([run_id])
            clauses.append(f"(run_id = {quoted} OR last_run = {quoted})" if new else f"run_id = {quoted}")
        parts = []
        if item_ids is not None:
            ids = list(dict.fromkeys(item_ids))
            if not ids:
                return LEDGER_SCHEMA.empty_table()
            chunks = [f"item_id IN ({_sql_list(ids[i:i + _IN_CHUNK])})" for i in range(0, len(ids), _IN_CHUNK)]
        else:
            chunks = [None]
        with self.guard():
            if not new and item_ids is not None:  # positions (seq) of an old ledger need the whole scan
                whole = normalise(dataset.to_table())
                parts.append(whole.filter(pc.is_in(whole.column("item_id"), value_set=pa.array(ids, pa.string()))))
                if run_id:
                    parts[-1] = parts[-1].filter(pc.equal(parts[-1].column("run_id"), run_id))
            else:
                for chunk in chunks:
                    where = " AND ".join(c for c in (*clauses, chunk) if c) or None
                    parts.append(normalise(dataset.to_table(filter=where)))
        table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        if table.num_rows > 1:
            table = table.take(pc.sort_indices(table, [("seq", "ascending")]))
        return table

    def rows(self, run_id: str | None = None, item_ids: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """:meth:`table` as dicts, without the internal ``key`` and ``_checksum``."""
        table = self.table(run_id, item_ids)
        return table.drop_columns([c for c in HIDDEN if c in table.schema.names]).to_pylist()

    def count(self) -> int:
        if not self.exists():
            return 0
        dataset = self.dataset()
        with self.guard():
            return int(dataset.count_rows())

    # ----------------------------------------------------------------- writes
    def record(self, run_id: str, entries: Sequence[LedgerEntry]) -> None:
        """Note the outcomes of ``entries`` for run ``run_id``: new (input, item, status) rows are
        added; rows met again count one more run. One commit.

        An item met as ``duplicate`` (stored already) that the ledger does not hold as accepted was
        stored by a run that stopped between its table write and its ledger write: it is recorded
        as accepted (``reason_code`` ``recovered``), so ledger and table agree again."""
        if not entries:
            return
        with self.lock.hold():
            self.create()
            self.migrate()
            entries = self._recovered(entries)
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            grouped: dict[int, list] = {}
            for e in entries:
                key = entry_key(e.input, e.item_id, e.status)
                if key in grouped:
                    grouped[key][1] += 1
                    grouped[key][0] = e  # the latest reason
                else:
                    grouped[key] = [e, 1]
            old = self._rows_by_key(list(grouped))
            seq = self._next_seq()
            rows = []
            for key, (e, count) in grouped.items():
                prev = old.get(key)
                rows.append({"run_id": prev["run_id"] if prev else run_id, "time": prev["time"] if prev else now,
                             "input": e.input, "item_id": e.item_id, "status": e.status,
                             "reason_code": e.reason_code, "reason": e.reason,
                             "runs": (prev["runs"] or 1) + count if prev else count, "last_run": run_id,
                             "last_time": now, "seq": seq, "key": key})
            schema = pa.schema([f for f in LEDGER_SCHEMA if f.name != CHECKSUM_COLUMN])
            table = with_checksums(pa.Table.from_pylist(rows, schema=schema))
            with self.guard():
                fault_point("ledger.write.before")
                if old:
                    self.dataset().merge_insert("key").when_matched_update_all().when_not_matched_insert_all() \
                        .execute(table)
                else:
                    lance.write_dataset(table, self.uri, mode="append")
                fault_point("ledger.write.after")
            facts = self.lock.facts()
            if facts is not None:
                facts["ledger_seq"] = seq + 1

    def _recovered(self, entries: Sequence[LedgerEntry]) -> list[LedgerEntry]:
        """``entries`` with each duplicate of an item the ledger does not hold as accepted turned
        into its acceptance (the first entry of each such item)."""
        met = {e.item_id for e in entries if e.status == "duplicate" and e.item_id}
        met -= {e.item_id for e in entries if e.status == "accepted"}
        if met:  # the usual case first, by key: the same input accepted it before (an int64 lookup)
            by_key = {entry_key(e.input, e.item_id, "accepted"): e.item_id for e in entries
                      if e.status == "duplicate" and e.item_id in met}
            met -= {by_key[k] for k in self._rows_by_key(list(by_key))}
        if not met:
            return list(entries)
        ids = sorted(met)
        dataset = self.dataset()
        parts = []
        for i in range(0, len(ids), _IN_CHUNK):
            with self.guard():
                parts.append(dataset.to_table(columns=["item_id", "status", "seq"],
                                              filter=f"item_id IN ({_sql_list(ids[i:i + _IN_CHUNK])}) AND "
                                                     "status IN ('accepted', 'deleted')"))
        unaccounted = met - expected_ids(pa.concat_tables(parts))
        out, done = [], set()
        for e in entries:
            if e.status == "duplicate" and e.item_id in unaccounted and e.item_id not in done:
                done.add(e.item_id)
                e = LedgerEntry(e.input, "accepted", e.item_id, "recovered",
                                "stored by an earlier run that stopped before writing its ledger rows; recorded now")
            out.append(e)
        return out

    def _rows_by_key(self, keys: list[int]) -> dict[int, dict[str, Any]]:
        dataset = self.dataset()
        found: dict[int, dict[str, Any]] = {}
        for i in range(0, len(keys), _IN_CHUNK):
            with self.guard():
                part = dataset.to_table(columns=["key", "run_id", "time", "runs"],
                                        filter=f"key IN ({_sql_list(keys[i:i + _IN_CHUNK])})")
            for row in part.to_pylist():
                found[row["key"]] = row
        return found

    def _next_seq(self) -> int:
        facts = self.lock.facts()
        if facts is not None and "ledger_seq" in facts:
            return facts["ledger_seq"]
        dataset = self.dataset()
        with self.guard():
            top = pc.max(dataset.to_table(columns=["seq"]).column("seq")).as_py() if dataset.count_rows() else None
        return 0 if top is None else int(top) + 1

    def migrate(self) -> bool:
        """Rewrite a ledger of the old form (a row per input per run) as one row per input and
        outcome with run counts: a new Lance version (the old ones keep the old rows). Returns
        whether it did. Call holding the write lock."""
        dataset = self.dataset()
        if "key" in dataset.schema.names:
            return False
        with self.guard():
            old = dataset.to_table()
            merged = merge_old_rows(old)
            lance.write_dataset(merged, self.uri, schema=LEDGER_SCHEMA, mode="overwrite")
        log.info("ledger of %s: %d rows of the old form merged into %d (one per input and outcome)",
                 self.guard.collection, old.num_rows, merged.num_rows)
        facts = self.lock.facts()
        if facts is not None:
            facts["ledger_seq"] = int(pc.max(merged.column("seq")).as_py()) + 1 if merged.num_rows else 0
        return True

    def compact(self) -> None:
        """Merge the small files that re-runs' updates leave; versions older than a week are cleaned
        up, as the items table's are (until then ``verify --repair`` finds older copies there)."""
        with self.lock.hold(), self.guard():
            if self.table_dir.exists() and len(self.dataset().get_fragments()) > 1:
                self.dataset().optimize.compact_files()
                self.dataset().cleanup_old_versions(older_than=timedelta(days=7))

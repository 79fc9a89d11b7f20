"""Checking a collection's Lance tables row by row, and repairing them from good copies.

:func:`check_table` reads the newest table version whose manifest decodes, fragment by
fragment: a data file missing or not the size its manifest records, a fragment Lance cannot
decode, and each row whose ``_checksum`` (:mod:`caselens.indexes.checksums`) does not match
what it holds are found and named (relative to the collection folder). Manifests newer than
that version which do not decode are named too.

:func:`repair_table` makes a new table version in which every damaged fragment is replaced by
the good copies of its rows: rows of the fragment that still read and check, else the same
rows in files of older table versions (Lance keeps them: a compaction, an update or an append
wrote them elsewhere before), else (items) a vector from the FAISS index's exact copy when the
row's checksum then matches. Rows with no good copy are lost and counted (their ids are what
the ledger expects and the table no longer holds: ``verify`` lists them and how to ingest them
again). Nothing is deleted: the damaged files stay where they are (older versions still name
them), manifests that do not decode are moved to ``damaged/`` in the collection folder, and the
repair is one Lance commit (a rewrite of the damaged fragments) on top of the newest version
that decodes.

Rows are recognised across versions by ``_row`` (items: never reused) or ``key`` (ledger: one
row per input and outcome). Rows without a checksum (collections made before row checksums)
count as good when they read; ``verify`` says how many there are.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from caselens.indexes.lance_lib import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lance.fragment import write_fragments

from caselens.indexes.checksums import checksum_mismatches
from caselens.indexes.damage import LanceGuard, is_lance_failure, lance_message, manifest_versions, newest_readable
from caselens.indexes.lock import WriteLock

log = logging.getLogger(__name__)

BATCH_ROWS = 8192  # rows read at a time while checking
SALVAGE_CHUNK = 256  # rows read at a time from a fragment that does not decode as a whole
SALVAGE_SINGLES = 4096  # single-row reads tried, at most, inside chunks that fail
IDENTITY = {"items": "_row", "ledger": "key"}  # what recognises a row across table versions


@dataclass
class FragmentCheck:
    """One fragment (a group of rows in one or more data files) of the version checked."""

    fragment_id: int
    files: list[str]  # its data files, relative to the collection folder
    rows: int  # rows the manifest gives it at this version (deletions applied)
    error: str = ""  # why it cannot be read, "" when it reads
    bad_rows: int = 0  # rows whose checksum does not match
    unchecked_rows: int = 0  # rows without a checksum

    @property
    def damaged(self) -> bool:
        return bool(self.error or self.bad_rows)


@dataclass
class TableCheck:
    """What :func:`check_table` found in one table."""

    table: str  # "items" or "ledger"
    version: int | None  # the newest version whose manifest decodes (None: none does)
    bad_manifests: list[str] = field(default_factory=list)  # newer manifests that do not decode
    fragments: list[FragmentCheck] = field(default_factory=list)
    rows: int = 0  # rows that read
    bad_rows: int = 0  # rows whose checksum does not match
    unchecked_rows: int = 0  # rows without a checksum
    bad_examples: list[str] = field(default_factory=list)  # ids (items) or inputs (ledger) of bad rows, first 20
    seconds: float = 0.0
    absent: bool = False  # no version was ever committed (a writer killed while creating it): empty, not damaged
    data: pa.Table | None = field(default=None, repr=False)  # the kept columns of the good rows that read

    @property
    def damaged(self) -> bool:
        return (self.version is None and not self.absent) or bool(self.bad_manifests) or \
            any(f.damaged for f in self.fragments)

    @property
    def damaged_files(self) -> list[str]:
        files = list(self.bad_manifests)
        for f in self.fragments:
            if f.damaged:
                files.extend(x for x in f.files if x not in files)
        return files

    def problems(self) -> list[str]:
        """One line per problem, naming the file."""
        out = [f"{path}: manifest does not decode (a newer version than {self.version})" for path in self.bad_manifests]
        if self.version is None and not self.absent:
            out.append("no table version can be read")
        for f in self.fragments:
            if f.error:
                out.append(f"{', '.join(f.files)}: {f.rows} rows cannot be read ({f.error})")
            elif f.bad_rows:
                out.append(f"{', '.join(f.files)}: {f.bad_rows} of {f.rows} rows do not match their checksum")
        return out

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("data")
        out["damaged"] = self.damaged
        out["damaged_files"] = self.damaged_files
        return out


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _data_paths(table_dir: Path, fragment: Any) -> list[tuple[Path, int]]:
    return [(Path(table_dir) / "data" / f.path, int(getattr(f, "file_size_bytes", 0) or 0))
            for f in fragment.metadata.files]


def _structure_error(paths: list[tuple[Path, int]]) -> str:
    for path, want in paths:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{path.name} is missing"
        if want and size != want:
            return f"{path.name} has {size} of the {want} bytes its manifest records"
    return ""


def _examples(batch: pa.Table | pa.RecordBatch, table: str, mask: np.ndarray) -> list[str]:
    column = "id" if table == "items" else "input"
    if column not in batch.schema.names or not mask.any():
        return []
    return [str(v) for v in batch.column(column).filter(pa.array(mask)).to_pylist()[:20]]


def check_table(guard: LanceGuard, keep: Sequence[str] = (), batch_rows: int = BATCH_ROWS) -> TableCheck:
    """Read every row of the newest decodable version of ``guard``'s table and check it (see the
    module docstring). ``keep``: the columns to return (``data``) for the rows that read and
    check (unchecked rows included), with ``_ok``."""
    start = time.perf_counter()
    table_dir, root = guard.table_dir, guard.root
    dataset, bad = newest_readable(table_dir)
    report = TableCheck(guard.table, None if dataset is None else int(dataset.version),
                        [_relative(p, root) for p in bad])
    if dataset is None:
        report.absent = not bad
        report.seconds = round(time.perf_counter() - start, 3)
        return report
    kept: list[pa.Table] = []
    for fragment in dataset.get_fragments():
        paths = _data_paths(table_dir, fragment)
        check = FragmentCheck(int(fragment.fragment_id), [_relative(p, root) for p, _ in paths], 0)
        report.fragments.append(check)
        try:
            check.rows = int(fragment.count_rows())
        except BaseException as exc:  # noqa: BLE001 - a deletion file that does not read
            if not is_lance_failure(exc):
                raise
            check.error = lance_message(exc)
            continue
        check.error = _structure_error(paths)
        if check.error:
            continue
        parts: list[pa.Table] = []
        try:
            for batch in fragment.to_batches(batch_size=batch_rows):
                bad_rows, unchecked = checksum_mismatches(batch)
                check.bad_rows += int(bad_rows.sum())
                check.unchecked_rows += int(unchecked.sum())
                if bad_rows.any() and len(report.bad_examples) < 20:
                    report.bad_examples.extend(_examples(batch, guard.table, bad_rows)[:20 - len(report.bad_examples)])
                if keep:
                    part = pa.Table.from_batches([batch]).select([c for c in keep if c in batch.schema.names])
                    parts.append(part.append_column("_ok", pa.array(~bad_rows)))
        except BaseException as exc:  # noqa: BLE001 - Lance cannot decode the fragment
            if not is_lance_failure(exc):
                raise
            check.error = lance_message(exc)
            check.bad_rows = 0
            continue
        kept.extend(parts)
        report.rows += check.rows
        report.bad_rows += check.bad_rows
        report.unchecked_rows += check.unchecked_rows
    if keep:
        report.data = pa.concat_tables(kept) if kept else None
    report.seconds = round(time.perf_counter() - start, 3)
    return report


# ------------------------------------------------------------------ repair
@dataclass
class RepairResult:
    """What :func:`repair_table` did to one table."""

    table: str
    version_before: int | None  # the newest version whose manifest decoded
    version_after: int | None  # the version the repair committed (None: nothing to commit)
    set_aside: list[str] = field(default_factory=list)  # manifests moved to damaged/ (kept)
    replaced: list[str] = field(default_factory=list)  # damaged data files no longer used (kept on disk)
    kept: int = 0  # rows of damaged fragments kept from their own files (they read and check)
    recovered: int = 0  # rows taken from files of older versions
    from_index: int = 0  # rows whose vector was taken from the FAISS index's exact copy
    lost: int = 0  # rows with no good copy anywhere (their number, when it is known)
    lost_rows: list[int] = field(default_factory=list)  # their identities (_row / key), when known
    max_row: int = -1  # the largest _row seen anywhere (items): no row number below it is reused
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["lost_rows"] = self.lost_rows[:100]
        return out

    def summary(self) -> list[str]:
        out = [f"{self.table}: set aside the manifest(s) that do not decode: {', '.join(self.set_aside)} (moved to "
               "damaged/, not deleted)"] if self.set_aside else []
        if self.replaced:
            out.append(f"{self.table}: version {self.version_after} replaces the damaged file(s) {', '.join(self.replaced)} "
                       f"(left on disk): {self.kept} rows kept from them, {self.recovered} recovered from older "
                       f"versions, {self.from_index} vectors from the FAISS index, {self.lost} lost")
        return out + self.notes


def _read_fragment_rows(fragment: Any, structure_ok: bool) -> tuple[list[pa.Table], int]:
    """What can be read of a fragment: whole, else in chunks, else row by row (bounded). Returns
    (tables read, rows that could not be read)."""
    if not structure_ok:
        return [], int(fragment.metadata.num_rows or fragment.metadata.physical_rows or 0)
    try:
        return [fragment.to_table()], 0
    except BaseException as exc:  # noqa: BLE001
        if not is_lance_failure(exc):
            raise
    try:
        total = int(fragment.count_rows())
    except BaseException as exc:  # noqa: BLE001
        if not is_lance_failure(exc):
            raise
        return [], int(fragment.metadata.physical_rows or 0)
    out, unread, singles = [], 0, SALVAGE_SINGLES
    for offset in range(0, total, SALVAGE_CHUNK):
        limit = min(SALVAGE_CHUNK, total - offset)
        try:
            out.append(fragment.to_table(offset=offset, limit=limit))
            continue
        except BaseException as exc:  # noqa: BLE001
            if not is_lance_failure(exc):
                raise
        for i in range(offset, offset + limit):
            if singles <= 0:
                unread += offset + limit - i
                break
            singles -= 1
            try:
                out.append(fragment.to_table(offset=i, limit=1))
            except BaseException as exc:  # noqa: BLE001
                if not is_lance_failure(exc):
                    raise
                unread += 1
    return out, unread


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns in its order (columns it lacks: null)."""
    columns = [table.column(f.name).cast(f.type) if f.name in table.schema.names else pa.nulls(table.num_rows, f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def _good(table: pa.Table) -> np.ndarray:
    bad, _ = checksum_mismatches(table)
    return ~bad


def _older_copies(table_dir: Path, current: int, wanted: set, ident: str, by_id: set[str], seen_files: set[str],
                  schema: pa.Schema) -> list[pa.Table]:
    """Good copies of the ``wanted`` rows (by ``ident``), or of the items whose id is in ``by_id``,
    from fragments of older versions whose files were not read yet, newest version first."""
    found: list[pa.Table] = []
    for version, _ in manifest_versions(table_dir):
        if version >= current or (not wanted and not by_id):
            continue
        try:
            dataset = lance.dataset(str(table_dir), version=version)
            fragments = dataset.get_fragments()
        except BaseException as exc:  # noqa: BLE001 - an older manifest that does not decode
            if not is_lance_failure(exc):
                raise
            continue
        for fragment in fragments:
            names = frozenset(f.path for f in fragment.metadata.files)
            key = "|".join(sorted(names)) + f"#{fragment.fragment_id}"
            if key in seen_files:
                continue
            seen_files.add(key)
            try:
                probe_cols = [ident] + (["id"] if by_id and ident != "id" else [])
                if ident not in fragment.schema.names:
                    continue
                probe = fragment.to_table(columns=probe_cols)
                hit = pc.is_in(probe.column(ident), value_set=pa.array(list(wanted), probe.schema.field(ident).type)) \
                    if wanted else pa.array(np.zeros(probe.num_rows, bool))
                if by_id:
                    hit = pc.or_(hit, pc.is_in(probe.column("id"), value_set=pa.array(sorted(by_id), pa.string())))
                positions = np.flatnonzero(np.asarray(hit.to_numpy(zero_copy_only=False), bool))
                if not len(positions):
                    continue
                rows = fragment.take(positions.tolist())
            except BaseException as exc:  # noqa: BLE001 - an older file that is damaged too
                if not is_lance_failure(exc):
                    raise
                continue
            rows = rows.filter(pa.array(_good(rows)))
            if rows.num_rows:
                rows = _conform(rows, schema)
                found.append(rows)
                wanted.difference_update(rows.column(ident).to_pylist())
                if by_id:
                    by_id.difference_update(rows.column("id").to_pylist())
    return found


def _set_aside(paths: list[Path], damaged_dir: Path, table: str) -> list[Path]:
    """Move ``paths`` to ``damaged_dir/<table>/<time>/`` (kept, never deleted)."""
    target = damaged_dir / table / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target.mkdir(parents=True, exist_ok=True)
    moved = []
    for path in paths:
        dest = target / path.name
        shutil.move(str(path), dest)
        moved.append(dest)
    hint = paths[0].parent / "latest_version_hint.json" if paths else None
    if hint is not None and hint.exists():  # names a version that is no longer there
        shutil.move(str(hint), target / hint.name)
    return moved


def _fragment_rows(fragment: Any) -> int:
    try:
        return int(fragment.count_rows())
    except BaseException as exc:  # noqa: BLE001 - its deletion file does not read
        if not is_lance_failure(exc):
            raise
        meta = fragment.metadata
        return int((meta.physical_rows or 0) - (meta.num_deletions or 0))


def _column_values(fragments: list[Any], column: str) -> set:
    """The values of ``column`` in ``fragments`` (those that cannot be read left out)."""
    out: set = set()
    for fragment in fragments:
        if column not in fragment.schema.names:
            continue
        try:
            out.update(fragment.to_table(columns=[column]).column(column).to_pylist())
        except BaseException as exc:  # noqa: BLE001
            if not is_lance_failure(exc):
                raise
    return out


def repair_table(guard: LanceGuard, lock: WriteLock, damaged_dir: Path, check: TableCheck, *,
                 expected_ids: set[str] | None = None,
                 vectors_from_index: Callable[[np.ndarray], dict[int, np.ndarray]] | None = None) -> RepairResult:
    """Repair the table ``check`` found damaged (see the module docstring); takes the collection's
    write lock ``lock``. ``expected_ids`` (items): the ids the ledger expects, so that the rows of
    a fragment whose ``_row`` column cannot be read are found again in older versions by id.
    ``vectors_from_index(rows)``: the exact vectors the FAISS index holds for those rows."""
    table_dir, root = guard.table_dir, guard.root
    result = RepairResult(guard.table, check.version, None)
    with lock.hold():
        dataset, bad = newest_readable(table_dir)
        if bad:  # the newest manifests do not decode: the newest that does becomes the latest
            result.set_aside = [_relative(p, root) for p in bad]
            _set_aside(bad, damaged_dir, guard.table)
            log.info("collection %s: %s table manifests %s moved to %s", guard.collection, guard.table,
                        result.set_aside, damaged_dir)
        if dataset is None:
            result.notes.append(f"{guard.table}: no version of the table can be read; nothing to rebuild it from")
            return result
        result.version_after = int(dataset.version) if bad else None
        damaged = [f for f in (check.fragments if check.version == dataset.version else check_table(guard).fragments)
                   if f.damaged]
        if not damaged:
            return result
        schema = dataset.schema
        ident = IDENTITY[guard.table] if IDENTITY[guard.table] in schema.names else None  # None: an old-form ledger
        fragments = {f.fragment_id: f for f in dataset.get_fragments()}
        damaged_ids = {f.fragment_id for f in damaged}
        healthy = [f for i, f in fragments.items() if i not in damaged_ids]
        salvaged: list[pa.Table] = []  # good rows
        partial: list[pa.Table] = []  # rows that read but do not check
        wanted: set = set()  # identities of rows still without a good copy
        total = unknown = 0  # rows of the damaged fragments; those whose identity cannot be read
        seen_files: set[str] = set()
        for frag_check in damaged:
            fragment = fragments[frag_check.fragment_id]
            seen_files.add("|".join(sorted(f.path for f in fragment.metadata.files)) + f"#{fragment.fragment_id}")
            result.replaced.extend(frag_check.files)
            total += _fragment_rows(fragment)
            structure_ok = not _structure_error(_data_paths(table_dir, fragment))
            tables, unread = _read_fragment_rows(fragment, structure_ok)
            for t in tables:
                ok = _good(t)
                salvaged.append(t.filter(pa.array(ok)))
                result.kept += int(ok.sum())
                if (~ok).any() and ident is not None:
                    rest = t.filter(pa.array(~ok))
                    partial.append(rest)
                    wanted.update(rest.column(ident).to_pylist())
            if unread and ident is not None:
                idents = _column_values([fragment], ident) if structure_ok else set()
                have = {v for t in tables for v in t.column(ident).to_pylist()}
                if idents:
                    wanted.update(idents - have)
                else:
                    unknown += unread
        by_id: set[str] = set()
        if unknown and ident == "_row" and expected_ids is not None:
            # the ids the ledger expects that no good row holds: found again in older versions by id
            present = _column_values(healthy, "id") | {v for t in salvaged for v in t.column("id").to_pylist()}
            by_id = set(expected_ids) - present
        elif unknown and ident == "key":
            # keys are never removed from the ledger: a key of an older version that no readable row
            # holds was in the damaged fragments
            present = _column_values(healthy, "key") | {v for t in salvaged for v in t.column("key").to_pylist()}
            older: set = set()
            for version, _ in manifest_versions(table_dir):
                if version < dataset.version:
                    try:
                        older |= _column_values(lance.dataset(str(table_dir), version=version).get_fragments(), "key")
                    except BaseException as exc:  # noqa: BLE001 - an older manifest that does not decode
                        if not is_lance_failure(exc):
                            raise
            wanted.update(older - present)
        salvaged = [_conform(t, schema) for t in salvaged if t.num_rows]
        if ident is not None:
            found = _older_copies(table_dir, int(dataset.version), wanted, ident, by_id, seen_files, schema)
            result.recovered = sum(t.num_rows for t in found)
            salvaged.extend(found)
        if wanted and partial and vectors_from_index is not None and ident == "_row":
            rest = pa.concat_tables(partial)
            rest = rest.filter(pc.is_in(rest.column("_row"), value_set=pa.array(sorted(wanted), pa.int64())))
            exact = vectors_from_index(rest.column("_row").to_numpy()) if rest.num_rows else {}
            size = schema.field("vector").type.list_size
            for i, row in enumerate(rest.column("_row").to_pylist()):
                if row not in exact:
                    continue
                one = rest.slice(i, 1)
                vector = pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(exact[row], np.float32)), size)
                one = one.set_column(one.schema.get_field_index("vector"), schema.field("vector"), vector)
                if _good(one).all():
                    salvaged.append(_conform(one, schema))
                    wanted.discard(row)
                    result.from_index += 1
        result.lost = max(0, total - result.kept - result.recovered - result.from_index)
        result.lost_rows = sorted(int(v) for v in wanted)
        if ident == "_row":
            result.max_row = max([int(pc.max(t.column("_row")).as_py()) for t in salvaged if t.num_rows]
                                 + [max(result.lost_rows, default=-1)])
        new_table = pa.concat_tables(salvaged) if salvaged else schema.empty_table()
        if new_table.num_rows > 1 and ident is not None:
            new_table = new_table.take(pc.sort_indices(new_table, [(ident, "ascending")]))
        with guard():
            new_fragments = write_fragments(new_table, str(table_dir), schema=schema) if new_table.num_rows else []
            operation = lance.LanceOperation.Rewrite(
                groups=[lance.LanceOperation.RewriteGroup(old_fragments=[fragments[i].metadata for i in sorted(damaged_ids)],
                                                          new_fragments=new_fragments)],
                rewritten_indices=[])
            committed = lance.LanceDataset.commit(str(table_dir), operation, read_version=dataset.version)
        result.version_after = int(committed.version)
        log.info("collection %s: %s table repaired as version %d: %d rows kept, %d recovered, %d from the index, "
                    "%d lost", guard.collection, guard.table, result.version_after, result.kept, result.recovered,
                    result.from_index, result.lost)
    return result


def versions_since(table_dir: Path, fragment_ids: set[int]) -> float | None:
    """The time (epoch seconds) of the first table version holding any of ``fragment_ids``, or
    None: rows written since then may be what a damaged fragment held."""
    for version, _ in sorted(manifest_versions(table_dir)):
        try:
            dataset = lance.dataset(str(table_dir), version=version)
            if fragment_ids & {f.fragment_id for f in dataset.get_fragments()}:
                stamp = next((v["timestamp"] for v in dataset.versions() if v["version"] == version), None)
                return stamp.timestamp() if stamp is not None else None
        except BaseException as exc:  # noqa: BLE001
            if not is_lance_failure(exc):
                raise
    return None



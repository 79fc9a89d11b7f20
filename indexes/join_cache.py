"""The non-vector columns of one table version in memory: for joining search hits to their rows
and for evaluating filters.

Owned by :class:`caselens.indexes.snapshot.Snapshot`: one per snapshot, never changed after it is
built. The rows are held in :class:`Segment` s (immutable, shared by the snapshots that hold
them): a new table version that only added rows gets the previous version's segments plus one
small segment of the rows added (and a row map in which the rows deleted since are gone), so
the first search after a write reads and prepares only what the write added. Small segments are
merged now and then (each merge at least halves the number of segments a row was merged into,
so a row is copied O(log n) times), and a cache whose deleted rows reach a quarter of what it
holds is rebuilt without them.
"""

from __future__ import annotations

import threading
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from caselens.indexes.filters import FilterColumn, Node, Unsupported, evaluate

_TAKE = pc.get_function("take")  # called directly: pc.take's Python wrapper costs more than the take
MASK_CACHE_BYTES = 32 << 20  # filter masks kept per segment (one byte a row each), least recently used dropped
DEAD_SHARE = 0.25  # rebuild the cache without deleted rows once they are this share of the rows held


class Segment:
    """Some rows of a table's non-vector columns, in memory, in ``_row`` order; never changed.

    A search joins ~10 rows right after FAISS has streamed its lists through the CPU caches, and
    then every library call is slow: an Arrow take and conversion of 10 rows costs 100-200 us
    there (20-40 us in a tight loop). So few rows are read straight from the Arrow buffers in
    plain Python (string offsets and bytes, int64/float64 values, validity bits; ~3-5 us a row
    there), many rows (batch joins) and tables with columns of other types go through one Arrow
    take. Strings with few distinct values are dictionary-encoded (one index to read, nothing
    to decode; a filter on them compares the dictionary, not every row), ``_row`` is not stored
    (it is what was asked) and columns without any value are not read.
    """

    def __init__(self, table: pa.Table, names: tuple[str, ...], types: dict[str, pa.DataType]):
        """``table``: the columns ``names`` (``_row`` first) of some rows; ``types``: every column's type."""
        rows = table.column("_row").to_numpy().astype(np.int64)
        if len(rows) > 1 and not (rows[1:] > rows[:-1]).all():
            order = np.argsort(rows, kind="stable")
            table, rows = table.take(pa.array(order)), rows[order]
        self.rows = rows
        self.rows.flags.writeable = False
        self.num_rows = len(rows)
        self.names = names
        self.types = types
        empty = {c for c in names[1:] if table.num_rows and table.column(c).null_count == table.num_rows}
        keep = [c for c in names[1:] if c not in empty]
        table = table.select(keep).combine_chunks()
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
        self.data: pa.RecordBatch | pa.Table = batches[0] if len(batches) == 1 else table
        at = {c: i for i, c in enumerate(table.column_names)}
        self.slots: list[int | None] = [at.get(c) for c in names[1:]]  # data column of each name, None: no value
        readers = [buffer_reader(c) for c in self.data.columns] if len(batches) == 1 else [None]
        # (position in a row's values, reader) of the columns with values; None: read through Arrow
        self.readers = None if None in readers else \
            [(i, readers[s]) for i, s in enumerate(self.slots, start=1) if s is not None]
        self.lines = row_lines(self.data, self.slots) if self.readers is not None else None
        self._lock = threading.Lock()
        self._columns: dict[str, FilterColumn] = {}
        self._masks: OrderedDict[Node, np.ndarray] = OrderedDict()

    @classmethod
    def merged(cls, parts: Sequence[tuple["Segment", np.ndarray | None]]) -> "Segment":
        """One segment of the rows of ``parts`` (each a segment and the mask of its rows to keep, None: all)."""
        first = parts[0][0]
        tables = []
        for segment, keep in parts:
            table = segment.table()
            tables.append(table if keep is None else table.filter(pa.array(keep)))
        return cls(pa.concat_tables(tables), first.names, first.types)

    def column(self, name: str) -> pa.Array:
        """Column ``name`` of this segment's rows, decoded (all-null columns as nulls of their type)."""
        if name == "_row":
            return pa.array(self.rows)
        slot = self.slots[self.names.index(name) - 1]
        if slot is None:
            return pa.nulls(self.num_rows, self.types[name])
        column = self.data.column(slot)
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        return column.cast(column.type.value_type) if pa.types.is_dictionary(column.type) else column

    def table(self) -> pa.Table:
        """This segment's rows as a table of the columns :attr:`names`, decoded."""
        return pa.table({n: self.column(n) for n in self.names})

    # ------------------------------------------------------------- filters
    def filter_column(self, name: str) -> FilterColumn | None:
        """Column ``name`` prepared for filters (made once), None when there is no such column."""
        column = self._columns.get(name)
        if column is None:
            if name not in self.types:
                return None
            if name == "_row":
                array: pa.Array = pa.array(self.rows)
            else:
                slot = self.slots[self.names.index(name) - 1]
                array = pa.nulls(self.num_rows, self.types[name]) if slot is None else self.data.column(slot)
                if isinstance(array, pa.ChunkedArray):
                    array = array.combine_chunks()
            column = FilterColumn(array)
            with self._lock:
                self._columns[name] = column
        return column

    def mask(self, term: Node) -> np.ndarray:
        """The rows of this segment for which ``term`` is true (kept for the next filter with the
        same term; :class:`~caselens.indexes.filters.Unsupported` when it cannot be evaluated here)."""
        with self._lock:
            mask = self._masks.get(term)
            if mask is not None:
                self._masks.move_to_end(term)
                return mask
        mask, _ = evaluate(term, self)
        mask.flags.writeable = False
        with self._lock:
            self._masks[term] = mask
            while len(self._masks) > max(1, MASK_CACHE_BYTES // max(1, self.num_rows)):
                self._masks.popitem(last=False)
        return mask


class JoinCache:
    """The non-vector columns of one table version in memory: segments of rows and where each
    ``_row`` number is among them (``where``: a position over the segments in order, -1: none)."""

    PYTHON_BELOW = 32  # rows read from the buffers in plain Python below this many, Arrow above

    def __init__(self, segments: list[Segment], where: np.ndarray, alive: list[np.ndarray | None]):
        self.segments = segments
        self.alive = alive  # per segment, the rows this version holds (None: all of them)
        self.starts = [0]  # position of each segment's first row
        for s in segments[:-1]:
            self.starts.append(self.starts[-1] + s.num_rows)
        self.where = where  # position of each _row number, -1: not in this version
        self._where = memoryview(where)  # indexing it gives Python ints, no numpy scalars
        self.names = segments[0].names
        self.held = sum(s.num_rows for s in segments)
        self.live = sum(s.num_rows if a is None else int(a.sum()) for s, a in zip(segments, alive))

    @classmethod
    def build(cls, table: pa.Table, names: tuple[str, ...] | None = None) -> "JoinCache":
        """The cache of ``table`` (its non-vector columns, ``_row`` among them) in one segment."""
        names = names or ("_row", *[c for c in table.column_names if c != "_row"])
        types = {f.name: f.type for f in table.schema}
        segment = Segment(table.select(list(names)), names, types)
        return cls([segment], _where([segment]), [None])

    def extend(self, added: pa.Table, rows_now: np.ndarray) -> "JoinCache":
        """The cache of the next table version: this one's rows that are in ``rows_now`` (the
        next version's ``_row`` numbers) and the ``added`` rows (numbered past every row here)."""
        top = len(self.where)
        present = np.zeros(top, bool)
        old = rows_now[rows_now < top]
        present[old] = True
        alive: list[np.ndarray | None] = []
        for segment, was in zip(self.segments, self.alive):
            now = present[segment.rows]
            if was is not None:
                now &= was
            alive.append(None if now.all() else now)
        segments = list(self.segments)
        if added.num_rows:
            segments.append(Segment(added.select(list(self.names)), self.names, self.segments[0].types))
            alive.append(None)
        dead = sum(s.num_rows - int(a.sum()) for s, a in zip(segments, alive) if a is not None)
        if dead > DEAD_SHARE * sum(s.num_rows for s in segments):  # mostly deleted rows: start afresh
            merged = Segment.merged(list(zip(segments, alive)))
            return JoinCache([merged], _where([merged]), [None])
        while len(segments) > 1 and _live(segments[-2], alive[-2]) <= 2 * _live(segments[-1], alive[-1]):
            merged = Segment.merged([(segments[-2], alive[-2]), (segments[-1], alive[-1])])
            segments[-2:], alive[-2:] = [merged], [None]
        return JoinCache(segments, _where(segments, alive), alive)

    # -------------------------------------------------------------- values
    def values(self, row_ids: Sequence[int]) -> list[list | None]:
        """For each of ``row_ids``, its values in :attr:`names` order, or None for a row number
        not held here."""
        want = row_ids if isinstance(row_ids, list) else np.asarray(row_ids, np.int64).tolist()
        where, n = self._where, len(self._where)
        out: list[list | None] = []
        segments, starts = self.segments, self.starts
        single = len(segments) == 1
        if len(want) < self.PYTHON_BELOW and all(s.lines is not None for s in segments):
            blank = [None] * len(self.names)  # columns without a value in a segment stay None
            for r in want:  # one line a row: one place in memory to read, not one per column
                if not 0 <= r < n or (p := where[r]) < 0:
                    out.append(None)
                    continue
                if single:
                    offsets, text, off, fields, _ = segments[0].lines
                else:
                    s = bisect_right(starts, p) - 1
                    (offsets, text, off, fields, _), p = segments[s].lines, p - starts[s]
                values = blank.copy()
                values[0] = r
                p += off
                for (i, kind), part in zip(fields, str(text[offsets[p]:offsets[p + 1]], "utf-8").split(LINE_SEP)):
                    if part != LINE_NULL:
                        values[i] = part if kind is str else kind(part)
                out.append(values)
            return out
        if len(want) < self.PYTHON_BELOW and all(s.readers is not None for s in segments):
            blank = [None] * len(self.names)  # columns without a value in a segment stay None
            for r in want:
                if not 0 <= r < n or (p := where[r]) < 0:
                    out.append(None)
                    continue
                if single:
                    readers = segments[0].readers
                else:
                    s = bisect_right(starts, p) - 1
                    readers, p = segments[s].readers, p - starts[s]
                values = blank.copy()
                values[0] = r
                for i, (valid, a, data, off) in readers:
                    q = p + off
                    if valid is not None and not valid[q >> 3] >> (q & 7) & 1:
                        continue
                    if data is None:  # a number
                        values[i] = a[q]
                    elif type(data) is list:  # a dictionary-encoded string: index a, strings data
                        values[i] = data[a[q]]
                    else:  # a string: offsets a, bytes data
                        values[i] = str(data[a[q]:a[q + 1]], "utf-8")
                out.append(values)
            return out
        if not want:
            return out
        asked = np.asarray(want, np.int64)
        pos = np.full(len(asked), -1, self.where.dtype)
        known = (asked >= 0) & (asked < n)
        pos[known] = self.where[asked[known]]
        found = pos >= 0
        rows: list[list | None] = [None] * len(want)
        seg_of = np.searchsorted(np.asarray(starts), pos, side="right") - 1
        for s, segment in enumerate(segments):
            mine = np.flatnonzero(found & (seg_of == s))
            if not len(mine):
                continue
            taken = _TAKE.call([segment.data, pa.array(pos[mine] - starts[s])]).columns
            columns = [(c.cast(c.type.value_type) if pa.types.is_dictionary(c.type) else c).to_pylist()
                       for c in taken]  # (a dictionary column converts value by value: decoded first)
            nones = [None] * len(mine)
            ordered = [columns[slot] if slot is not None else nones for slot in segment.slots]
            for i, row in zip(mine.tolist(), zip(asked[mine].tolist(), *ordered)):
                rows[i] = list(row)
        return rows

    # ------------------------------------------------------------- filters
    def select(self, terms: Sequence[Node]) -> np.ndarray:
        """Sorted ``_row`` numbers of this version for which every one of ``terms`` is true
        (:class:`~caselens.indexes.filters.Unsupported` when one cannot be evaluated here)."""
        parts = []
        for segment, alive in zip(self.segments, self.alive):
            mask = segment.mask(terms[0])
            for term in terms[1:]:
                mask = mask & segment.mask(term)
            if alive is not None:
                mask = mask & alive
            parts.append(segment.rows[np.flatnonzero(mask)])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def removed(self, base: np.ndarray | None, others: Sequence[Node], below: int) -> np.ndarray | None:
        """Sorted rows among ``base`` (rows of this version; None: every row) for which not all of
        ``others`` are true, when fewer than ``below``; else None. With ``base``, the terms are
        evaluated at its rows only (a per-query exclusion within a kept filter reads a tenth of
        the table for a filter of a tenth) and not kept."""
        if base is None:
            parts, counted = [], 0
            for segment, alive in zip(self.segments, self.alive):
                keep = segment.mask(others[0])
                for term in others[1:]:
                    keep = keep & segment.mask(term)
                gone = ~keep if alive is None else ~keep & alive
                counted += int(np.count_nonzero(gone))
                if counted >= below:
                    return None
                parts.append(segment.rows[np.flatnonzero(gone)])
            return parts[0] if len(parts) == 1 else np.concatenate(parts)
        positions = self.where[base]
        of = np.searchsorted(np.asarray(self.starts), positions, side="right") - 1 if len(self.segments) > 1 else None
        gone_at: list[np.ndarray] = []
        for s, segment in enumerate(self.segments):
            mine = np.flatnonzero(of == s) if of is not None else np.arange(len(base))
            if not len(mine):
                continue
            block = _Rows(segment, positions[mine] - self.starts[s])
            keep = evaluate(others[0], block)[0]
            for term in others[1:]:
                keep = keep & evaluate(term, block)[0]
            gone_at.append(mine[~keep])
            if sum(len(g) for g in gone_at) >= below:
                return None
        gone = np.concatenate(gone_at) if gone_at else np.zeros(0, np.int64)
        return np.sort(base[gone])

    def column(self, name: str) -> tuple[np.ndarray, pa.ChunkedArray]:
        """(``_row`` numbers, values of column ``name``) of the rows this version holds, in row order."""
        rows, arrays = [], []
        for segment, alive in zip(self.segments, self.alive):
            values = segment.column(name)
            if alive is None:
                rows.append(segment.rows)
                arrays.append(values)
            else:
                rows.append(segment.rows[alive])
                arrays.append(values.filter(pa.array(alive)))
        return np.concatenate(rows), pa.chunked_array(arrays, arrays[0].type)

    def table(self) -> pa.Table:
        """Every row this version holds, as one table of the columns :attr:`names`."""
        tables = []
        for segment, alive in zip(self.segments, self.alive):
            table = segment.table()
            tables.append(table if alive is None else table.filter(pa.array(alive)))
        return pa.concat_tables(tables)


class _Rows:
    """Some rows of a segment, as a block filters evaluate over."""

    def __init__(self, segment: Segment, positions: np.ndarray):
        self.segment = segment
        self.positions = positions
        self.num_rows = len(positions)
        self._columns: dict[str, FilterColumn | None] = {}

    def filter_column(self, name: str) -> FilterColumn | None:
        if name not in self._columns:
            column = self.segment.filter_column(name)
            self._columns[name] = None if column is None else column.subset(self.positions)
        return self._columns[name]


def _live(segment: Segment, alive: np.ndarray | None) -> int:
    return segment.num_rows if alive is None else int(alive.sum())


def _where(segments: list[Segment], alive: list[np.ndarray | None] | None = None) -> np.ndarray:
    """Position of each ``_row`` number over ``segments`` in order (-1: none, or not alive)."""
    top = max((int(s.rows[-1]) + 1 for s in segments if s.num_rows), default=0)
    total = sum(s.num_rows for s in segments)
    dtype = np.int32 if total < 2**31 else np.int64
    where = np.full(top, -1, dtype)
    start = 0
    for i, segment in enumerate(segments):
        positions = np.arange(start, start + segment.num_rows, dtype=dtype)
        keep = alive[i] if alive is not None else None
        if keep is None:
            where[segment.rows] = positions
        else:
            where[segment.rows[keep]] = positions[keep]
        start += segment.num_rows
    return where


LINE_SEP, LINE_NULL = "\x1f", "\x00"  # between a line's values; a null


def row_lines(batch: pa.RecordBatch | pa.Table, slots: Sequence[int | None]) -> tuple | None:
    """Each row's values (the columns at ``slots``) as one line of text, made by Arrow at once:
    values joined by :data:`LINE_SEP`, nulls as :data:`LINE_NULL`, numbers in their shortest exact
    form. A search reads a few rows right after FAISS has evicted the CPU caches; a line is one
    place in memory to read where the columns are one to three each (~3x faster for 10 rows of 8
    columns). Returns (offsets, text, array offset, [(position in a row's values, str / float /
    int)], the Arrow array), or None when a column is of another type or a string holds the
    separator or is the null mark (the columns are read one by one then)."""
    if not isinstance(batch, pa.RecordBatch):
        return None
    columns, fields = [], []
    for i, slot in enumerate(slots, start=1):
        if slot is None:
            continue
        column = batch.column(slot)
        kind = column.type
        if pa.types.is_dictionary(kind) and pa.types.is_string(kind.value_type):
            strings = column.dictionary
            column, parse = column.cast(kind.value_type), str
        elif pa.types.is_string(kind):
            strings, parse = column, str
        elif pa.types.is_int64(kind) or pa.types.is_float64(kind):
            strings, parse = None, int if pa.types.is_int64(kind) else float
            column = pc.cast(column, pa.string())  # (Arrow writes the shortest text that reads back exactly)
        else:
            return None
        if strings is not None and len(strings) and (pc.any(pc.match_substring(strings, LINE_SEP)).as_py()
                                                     or pc.any(pc.equal(strings, LINE_NULL)).as_py()):
            return None
        columns.append(pc.fill_null(column, LINE_NULL))
        fields.append((i, parse))
    if not columns:
        return None
    try:
        lines = pc.binary_join_element_wise(*columns, LINE_SEP)
    except (pa.ArrowInvalid, pa.ArrowCapacityError):  # more than 2 GiB of text
        return None
    if not pa.types.is_string(lines.type) or lines.null_count:
        return None
    buffers = lines.buffers()
    text = memoryview(buffers[2]).cast("B") if buffers[2] is not None else memoryview(b"")
    return memoryview(buffers[1]).cast("B").cast("i"), text, lines.offset, fields, lines


def buffer_reader(column: pa.Array) -> tuple | None:
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


__all__ = ["JoinCache", "Segment", "Unsupported", "buffer_reader"]

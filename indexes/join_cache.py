"""The non-vector columns of one table version in memory, for joining search hits to their rows.

Owned by :class:`caselens.indexes.snapshot.Snapshot`: one per snapshot, never changed after it is
built (a new table version gets a new snapshot and, from it, a new cache).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_TAKE = pc.get_function("take")  # called directly: pc.take's Python wrapper costs more than the take


class JoinCache:
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

    def __init__(self, rows: np.ndarray, table: pa.Table):
        """``table``: the non-vector columns, ``rows``: its ``_row`` column as numbers."""
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
        readers = [buffer_reader(c) for c in self.data.columns] if len(batches) == 1 else [None]
        self.readers = None if None in readers else readers  # None: every read goes through Arrow

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



"""Rows of an items table, built the same way by every writer: the in-process ``Collection.add``
and the workers of a distributed ingest (:mod:`caselens.indexes.fragments`).

Pure functions of a record, its vector and the table's column types: no LanceDB handle, so a
worker that only knows the table's schema builds exactly the rows ``Collection.add`` would.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from caselens.indexes.checksums import CHECKSUM_COLUMN, row_checksums

# Columns every items table has; metadata keys become further columns beside them.
CORE_COLUMNS = ("id", "_row", "kind", "vector", "source", "text", "provenance", CHECKSUM_COLUMN)


class MetadataTypeError(ValueError):
    """A metadata value that does not fit the type of its existing column."""


def column_name(key: str) -> str:
    """The column a metadata key is stored in: lower-case letters, digits and underscores."""
    name = re.sub(r"[^0-9a-zA-Z_]+", "_", key.strip()).strip("_").lower() or "field"
    if name[0].isdigit():
        name = f"m_{name}"
    if name in CORE_COLUMNS or name.startswith("_"):
        name = f"meta_{name.lstrip('_')}"
    return name


def coerce_metadata(metadata: Mapping[str, Any], types: Mapping[str, pa.DataType]) -> dict[str, Any]:
    """Metadata keyed by column name with values converted to the types of the existing columns
    (``types``: column name -> Arrow type); keys without a column keep numbers as numbers and
    anything else as text. Empty values become None.

    Raises :class:`MetadataTypeError` for a value that cannot be converted.
    """
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


def missing_columns(rows: Sequence[Mapping[str, Any]], types: Mapping[str, pa.DataType]) -> dict[str, str]:
    """Columns that the (coerced) ``rows`` need and the table lacks, as LanceDB ``add_columns``
    expressions typed by the first value met (numbers: DOUBLE, else STRING)."""
    missing: dict[str, str] = {}
    for row in rows:
        for key, value in row.items():
            if key in types or key in missing or value is None:
                continue
            is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
            missing[key] = "CAST(NULL AS DOUBLE)" if is_num else "CAST(NULL AS STRING)"
    return missing


def table_row(record: Mapping[str, Any], row: int, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The column values of one record (id, kind, source, text, provenance dict) numbered ``row``,
    with its already coerced ``metadata``."""
    out = {"id": record["id"], "_row": row, "kind": record["kind"], "source": record.get("source"),
           "text": record.get("text"), "provenance": json.dumps(record.get("provenance", {}), sort_keys=True)}
    out.update(metadata)
    return out


def arrow_rows(rows: Sequence[Mapping[str, Any]], vectors: np.ndarray, schema: pa.Schema) -> pa.Table:
    """``rows`` (from :func:`table_row`) and their ``vectors`` as a table of ``schema`` (columns
    the rows lack are null), each row with its ``_checksum`` when the schema has that column
    (:func:`caselens.indexes.checksums.row_checksums`, over the values as they are stored)."""
    dim = schema.field("vector").type.list_size
    columns = {f.name: [r.get(f.name) for r in rows] for f in schema if f.name != "vector"}
    flat = pa.array(np.ascontiguousarray(vectors, np.float32).reshape(-1))
    columns["vector"] = pa.FixedSizeListArray.from_arrays(flat, dim)
    table = pa.table({f.name: columns[f.name] for f in schema}, schema=schema)
    if CHECKSUM_COLUMN in schema.names:
        index = schema.get_field_index(CHECKSUM_COLUMN)
        table = table.set_column(index, schema.field(index), pa.array(row_checksums(table), pa.int64()))
    return table

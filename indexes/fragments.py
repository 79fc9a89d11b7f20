"""Lance's distributed write for an items table: workers write fragments, one writer commits them.

A distributed ingest writes rows in two steps (Lance's own protocol, see
https://lancedb.github.io/lance/distributed_write.html):

1. any process that can reach the table's folder writes a *fragment* (data files under
   ``<table>/data/``) with :func:`write_fragment`; nothing is visible yet, and a fragment that is
   never committed is only an unreferenced file (Lance's cleanup removes it);
2. the single writer holding the collection's write lock commits many fragments at once with
   :func:`commit_fragments`: one ``Append`` operation, one new table version. A commit is
   atomic: a crash before it leaves the table as it was, after it every row of the batch is in.

Fragments are passed around as JSON text (Lance's own ``FragmentMetadata.to_json``), so they
travel between processes and machines without pickling. Rows are built by
:mod:`caselens.indexes.rows`, as ``Collection.add`` builds them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from caselens.faults import fault_point
from caselens.indexes.lance_lib import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lance.file import LanceFileReader
from lance.fragment import FragmentMetadata, write_fragments


def open_table(uri: str | Path) -> lance.LanceDataset:
    """The Lance dataset at ``uri``, at its latest version."""
    return lance.dataset(str(uri))


def column_types(table: lance.LanceDataset) -> dict[str, pa.DataType]:
    """Column name -> Arrow type of ``table``'s schema."""
    return {f.name: f.type for f in table.schema}


def write_fragment(uri: str | Path, data: pa.Table, table: lance.LanceDataset | None = None) -> list[str]:
    """Write ``data`` (in the table's schema, see :func:`caselens.indexes.rows.arrow_rows`) as new
    fragments of the dataset at ``uri``, in the dataset's file format version, without committing
    them; returns their metadata as JSON texts for :func:`commit_fragments`."""
    table = table if table is not None else open_table(uri)
    if data.num_rows == 0:
        return []
    frags = write_fragments(data, str(uri), schema=data.schema, data_storage_version=table.data_storage_version,
                            max_rows_per_file=max(1, data.num_rows))
    return [json.dumps(f.to_json(), sort_keys=True) for f in frags]


def fragment_rows(fragment: str) -> int:
    """Rows held by a fragment given as JSON text."""
    return int(json.loads(fragment)["physical_rows"])


def read_fragment(uri: str | Path, fragment: str) -> pa.Table:
    """The rows of a written but not yet committed fragment (JSON text), read from its data file."""
    meta = json.loads(fragment)
    files = meta["files"]
    if len(files) != 1:
        raise ValueError(f"expected a fragment with one data file, this one has {len(files)}")
    return LanceFileReader(f"{uri}/data/{files[0]['path']}").read_all().to_table()


def without_rows(uri: str | Path, fragment: str, drop: Iterable[int],
                 table: lance.LanceDataset | None = None) -> list[str]:
    """A fragment (JSON text) written again without the rows at positions ``drop``: returns the
    new fragments' JSON (none when no row is left). The old one is never committed."""
    data = read_fragment(uri, fragment)
    keep = sorted(set(range(data.num_rows)) - set(drop))
    if not keep:
        return []
    return write_fragment(uri, data.take(pa.array(keep, pa.int64())), table)


def commit_fragments(uri: str | Path, fragments: Sequence[str], read_version: int) -> int:
    """Append the ``fragments`` (JSON texts) to the dataset in one commit made on top of
    ``read_version``; returns the new version. The caller holds the collection's write lock, so
    no other writer commits meanwhile (Lance would retry or refuse a conflicting commit)."""
    if not fragments:
        return read_version
    op = lance.LanceOperation.Append([FragmentMetadata.from_json(f) for f in fragments])
    fault_point("table.commit.before")
    version = int(lance.LanceDataset.commit(str(uri), op, read_version=read_version).version)
    fault_point("table.commit.after")
    return version


def stored_ids(table: lance.LanceDataset, ids: Sequence[str]) -> set[str]:
    """Which of ``ids`` the table holds (a filtered scan of the id column; a reader, no lock)."""
    found: set[str] = set()
    for start in range(0, len(ids), 1000):
        part = pa.array(list(ids[start:start + 1000]), pa.string())
        got = table.to_table(columns=["id"], filter=pc.field("id").isin(part))
        found.update(got.column("id").to_pylist())
    return found


def fragment_rows_at(uri: str | Path, version: int) -> list[tuple[int, int]]:
    """(fragment id, live rows) of the dataset at ``uri`` as of ``version``."""
    return [(f.fragment_id, f.count_rows()) for f in lance.dataset(str(uri), version=version).get_fragments()]


def read_vectors(uri: str | Path, version: int,
                 pieces: Sequence[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(row numbers, vectors) of the ``pieces`` (fragment id, first live row, rows) of the dataset
    at ``version``, deleted rows left out: one shard of a distributed index build."""
    table = lance.dataset(str(uri), version=version)
    dim = table.schema.field("vector").type.list_size
    rows, vectors = [np.zeros(0, np.int64)], [np.zeros((0, dim), np.float32)]
    for fid, offset, limit in pieces:
        got = table.get_fragment(fid).to_table(columns=["_row", "vector"], offset=offset, limit=limit)
        rows.append(got.column("_row").to_numpy().astype(np.int64))
        flat = got.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        vectors.append(np.asarray(flat, np.float32).reshape(got.num_rows, dim))
    return np.concatenate(rows), np.concatenate(vectors)

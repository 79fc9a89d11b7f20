"""Adapters for caselens collections: read the labelled vectors, fit, store beside the table.

Collections are read only through :class:`~caselens.indexes.collection.Collection`'s public
reads (``rows(...)``, ``encoder``, ``version``, ``name``, ``root``).
The adapter is stored in ``<collection>/adapter/`` (:mod:`caselens.indexes.adapter`); where it
is applied (derived index of adapted vectors, every query) is decided by the index and search
layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from caselens.errors import QueryError
from caselens.indexes.adapter import Adapter, load_adapter, remove_adapter, save_adapter
from caselens.indexes.collection import Collection
from caselens.retrieval.adaptation.fit import AUTO, AdapterFit, AdapterReport, select_adapter

PATIENT_COLUMN = "patient_id"


@dataclass
class LabelledVectors:
    """A collection's vectors with their labels and patients, in table order."""

    ids: list[str]
    rows: np.ndarray  # _row numbers
    vectors: np.ndarray  # (n, dim) float32
    labels: list[str | None]  # None: unlabelled
    groups: list[str | None] | None  # patient pseudonyms (None where absent); None: no patient column
    metadata: dict[str, list[Any]]  # further columns asked for, by name
    table_version: int
    encoder_fingerprint: str


def read_labelled(collection: Collection, label_column: str = "label", group_column: str | None = PATIENT_COLUMN,
                  extra_columns: tuple[str, ...] = ()) -> LabelledVectors:
    """Vectors, labels and patients of ``collection`` (image items and others alike).

    ``group_column`` is used when the collection has it (None: never); a missing
    ``label_column`` raises :class:`~caselens.errors.QueryError` naming the columns there are."""
    columns = collection.rows(limit=1).column_names
    if label_column not in columns:
        meta = [c for c in columns if c not in ("id", "_row", "kind", "vector", "source", "text", "provenance")]
        raise QueryError(f"collection {collection.name!r} has no column {label_column!r}; "
                         f"metadata columns: {', '.join(meta) or 'none'}")
    group = group_column if group_column and group_column in columns else None
    extra = [c for c in extra_columns if c in columns and c not in (label_column, group)]
    version = collection.version
    wanted = ["id", "_row", "vector", label_column] + ([group] if group else []) + extra
    table = collection.rows(columns=wanted)
    dim = int(collection.encoder["dim"])
    flat = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vectors = np.asarray(flat, np.float32).reshape(-1, dim)
    labels = [None if v is None or str(v).strip() == "" else str(v) for v in table.column(label_column).to_pylist()]
    groups = None
    if group:
        groups = [None if v is None or str(v) == "" else str(v) for v in table.column(group).to_pylist()]
        if all(g is None for g in groups):
            groups = None
    return LabelledVectors(ids=table.column("id").to_pylist(), rows=table.column("_row").to_numpy().astype(np.int64),
                           vectors=vectors, labels=labels, groups=groups,
                           metadata={c: table.column(c).to_pylist() for c in extra}, table_version=int(version),
                           encoder_fingerprint=str(collection.encoder["fingerprint"]))


def fit_collection_adapter(collection: Collection, label_column: str = "label", method: str = AUTO, folds: int = 5,
                           *, group_column: str | None = PATIENT_COLUMN, seed: int = 0, k: int = 10,
                           save: bool = False, progress: Callable[[str], None] | None = None,
                           ) -> tuple[Adapter, AdapterReport]:
    """Fit an adapter on ``collection``'s items labelled in ``label_column`` (folds grouped by
    ``group_column`` where the collection has it); see :func:`caselens.retrieval.adaptation.fit.fit_adapter`.

    The adapter's provenance names the collection, table version, label column, group column,
    labelled items and classes, every candidate's cross-validated P@k and the encoder
    fingerprint. With ``save``, it is written to ``<collection>/adapter/`` (replacing any)."""
    fit = fit_collection(collection, label_column, method, folds, group_column=group_column, seed=seed, k=k,
                         progress=progress)
    if save:
        save_adapter(fit.adapter, collection.layout.adapter_dir)
    return fit.adapter, fit.report


def fit_collection(collection: Collection, label_column: str = "label", method: str = AUTO, folds: int = 5, *,
                   group_column: str | None = PATIENT_COLUMN, seed: int = 0, k: int = 10,
                   progress: Callable[[str], None] | None = None, keep_neighbours: int = 0) -> AdapterFit:
    """:func:`fit_collection_adapter` returning the whole :class:`~.fit.AdapterFit` (for diagnosis)."""
    data = read_labelled(collection, label_column, group_column)
    provenance = {"collection": collection.name, "table_version": data.table_version, "label_column": label_column,
                  "group_column": group_column if data.groups is not None else None,
                  "encoder_spec": collection.encoder.get("spec"), "encoder_fingerprint": data.encoder_fingerprint}
    return select_adapter(data.vectors, data.labels, data.groups, encoder_fingerprint=data.encoder_fingerprint,
                          method=method, folds=folds, seed=seed, k=k, provenance=provenance, progress=progress,
                          keep_neighbours=keep_neighbours)


def collection_adapter(collection: Collection) -> Adapter | None:
    """The adapter stored with ``collection`` (None when there is none), checked against the
    collection's encoder (:class:`~caselens.errors.AdapterMismatchError` when fitted for another)."""
    return load_adapter(collection.layout.adapter_dir, str(collection.encoder["fingerprint"]))


def is_stale(adapter: Adapter, collection: Collection) -> bool:
    """True when the collection's table has moved on since the adapter was fitted (new, changed
    or deleted items: refit to use them; the adapter still applies to every vector)."""
    return adapter.provenance.get("table_version") != collection.version


def remove_collection_adapter(collection: Collection) -> bool:
    """Remove ``collection``'s adapter; True when there was one."""
    return remove_adapter(collection.layout.adapter_dir)

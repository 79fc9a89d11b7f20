"""The vector space a collection is searched in: its encoder's vectors, through its adapter.

A collection with an adapter (``caselens adapt``, :mod:`caselens.indexes.adapter`) is searched in
the adapter's space: its derived FAISS index holds adapted vectors, the rows committed since the
index are adapted before they are ranked, and every query (an image, a text, a stored item's
vector) passes through the same adapter. :func:`space_of` is the one place that decides which
space that is; the index stamp records :attr:`VectorSpace.fingerprint`, so an index built before
the adapter was fitted, refitted or removed is never read as if it were in the new space (the
writer rebuilds it, readers rank exactly meanwhile).

An identity adapter (``--method auto`` keeping the raw vectors) is the encoder's own space.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from caselens.indexes.adapter import RECORD_FILE, Adapter, load_adapter
from caselens.indexes.collection import Collection

ADAPTER_MARK = "+adapter:"  # fingerprint of an adapted space: <encoder fingerprint>+adapter:<adapter fingerprint>


@dataclass(frozen=True, eq=False)
class VectorSpace:
    """Where a collection's vectors are compared: the encoder's, or its adapter's."""

    encoder_fingerprint: str
    in_dim: int
    adapter: Adapter | None = None  # None: the encoder's own space

    @property
    def fingerprint(self) -> str:
        """The encoder's fingerprint, with the adapter's appended when there is one: what a
        derived index of this space is stamped with."""
        if self.adapter is None:
            return self.encoder_fingerprint
        return f"{self.encoder_fingerprint}{ADAPTER_MARK}{self.adapter.fingerprint}"

    @property
    def dim(self) -> int:
        """Dimension of the vectors in this space."""
        return self.in_dim if self.adapter is None else self.adapter.out_dim

    @property
    def adapted(self) -> bool:
        return self.adapter is not None

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """``vectors`` of the encoder (one per row, or one vector) as float32 rows of this space."""
        x = np.asarray(vectors, np.float32)
        if self.adapter is None:
            return x if x.ndim == 2 else x.reshape(1, -1)
        if not len(x):
            return np.zeros((0, self.dim), np.float32)
        return self.adapter.apply(x)

    def describe(self) -> dict[str, Any]:
        """What ``info`` shows about the space."""
        if self.adapter is None:
            return {"adapted": False, "dim": self.dim}
        prov = self.adapter.provenance
        return {"adapted": True, "method": self.adapter.method, "fingerprint": self.adapter.fingerprint,
                "dim": self.dim, "label_column": prov.get("label_column"), "table_version": prov.get("table_version"),
                "p_at_k_raw": prov.get("raw_p_at_k"), "p_at_k_adapted": prov.get("chosen_p_at_k"),
                "decision": prov.get("decision")}


def encoder_of(fingerprint: str) -> str:
    """The encoder fingerprint of a space fingerprint (an index stamp's)."""
    return fingerprint.split(ADAPTER_MARK, 1)[0]


_CACHE: dict[str, tuple[tuple, Adapter | None]] = {}
_CACHE_LOCK = threading.Lock()


def record_key(collection: Collection) -> tuple | None:
    """(inode, mtime, size) of the collection's adapter record, None when it has no adapter. The
    record is written last and atomically, so a new key means a new adapter (or none)."""
    try:
        st = os.stat(collection.layout.adapter_dir / RECORD_FILE)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def space_of(collection: Collection) -> VectorSpace:
    """The space ``collection`` is searched in now (its adapter loaded and checked against its
    encoder: :class:`~caselens.errors.AdapterMismatchError` / ``AdapterIntegrityError`` when it
    cannot be used). Loaded adapters are kept per record file and read again when it changes."""
    encoder = str(collection.encoder["fingerprint"])
    dim = int(collection.dim)
    key = record_key(collection)
    if key is None:
        return VectorSpace(encoder, dim)
    folder = str(collection.layout.adapter_dir)
    with _CACHE_LOCK:
        hit = _CACHE.get(folder)
    if hit is not None and hit[0] == key:
        adapter = hit[1]
    else:
        adapter = load_adapter(collection.layout.adapter_dir, encoder)
        with _CACHE_LOCK:
            if len(_CACHE) > 64:
                _CACHE.clear()
            _CACHE[folder] = (key, adapter)
    if adapter is None or adapter.is_identity:
        return VectorSpace(encoder, dim)
    adapter.check_encoder(encoder)
    return VectorSpace(encoder, dim, adapter)

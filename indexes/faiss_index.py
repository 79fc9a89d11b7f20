"""FAISS indexes derived from a collection's table: build, stamp, write atomically, load, verify.

An index is a cache. It is stamped with the table version and encoder fingerprint it was built
from and a checksum of its bytes; a stale stamp means "rebuild", a different encoder means
"refuse", a bad checksum means "the file is damaged: rebuild".
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from caselens.errors import EncoderMismatchError, IndexIntegrityError

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
STAMP_FILE = "index.json"
HNSW_THRESHOLD = 50_000  # above this many vectors a flat index becomes an HNSW graph


@dataclass(frozen=True)
class IndexStamp:
    """What an index was built from; written as JSON beside the index file."""

    table_version: int  # LanceDB table version the vectors were read from
    encoder_fingerprint: str  # fingerprint of the encoder that produced the vectors
    dim: int  # vector dimension
    ntotal: int  # number of vectors in the index
    factory: str  # FAISS factory description of the index ("Flat", "HNSW32")
    checksum: str  # sha256 of the index file's bytes

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def choose_factory(n: int) -> str:
    """Index type for ``n`` vectors: exact below :data:`HNSW_THRESHOLD`, HNSW above."""
    return "Flat" if n <= HNSW_THRESHOLD else "HNSW32"


def build_index(vectors: np.ndarray, ids: np.ndarray, factory: str | None = None) -> tuple[faiss.Index, str]:
    """Build an inner-product index over L2-normalised ``vectors`` keyed by int64 ``ids``."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise ValueError(f"vectors {vectors.shape} and ids {ids.shape} do not line up")
    factory = factory or choose_factory(len(vectors))
    dim = vectors.shape[1]
    if factory == "Flat":
        inner: faiss.Index = faiss.IndexFlatIP(dim)
    elif factory.startswith("HNSW"):
        inner = faiss.IndexHNSWFlat(dim, int(factory[4:] or 32), faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = 80
        inner.hnsw.efSearch = 128
    else:
        raise ValueError(f"unknown index factory {factory!r}; use 'Flat' or 'HNSW<M>'")
    index = faiss.IndexIDMap2(inner)
    if len(vectors):
        index.add_with_ids(vectors, ids)
    return index, factory


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_index(index: faiss.Index, folder: Path, *, table_version: int, encoder_fingerprint: str,
                factory: str) -> IndexStamp:
    """Write ``index`` and its stamp into ``folder`` atomically (temp file, fsync, rename).

    The stamp is written after the index; a reader that sees a new index with an old stamp
    finds a checksum mismatch and rebuilds, so a crash between the two never serves a wrong index.
    """
    folder.mkdir(parents=True, exist_ok=True)
    data = faiss.serialize_index(index).tobytes()
    _atomic_write_bytes(folder / INDEX_FILE, data)
    stamp = IndexStamp(
        table_version=int(table_version),
        encoder_fingerprint=encoder_fingerprint,
        dim=int(index.d),
        ntotal=int(index.ntotal),
        factory=factory,
        checksum=hashlib.sha256(data).hexdigest(),
    )
    _atomic_write_bytes(folder / STAMP_FILE, stamp.to_json().encode())
    log.info("wrote FAISS index (%s, %d vectors) to %s", factory, stamp.ntotal, folder / INDEX_FILE)
    return stamp


def read_stamp(folder: Path) -> IndexStamp | None:
    """The stamp in ``folder``, or None when there is none or it cannot be parsed."""
    try:
        return IndexStamp(**json.loads((folder / STAMP_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def load_index(folder: Path, encoder_fingerprint: str) -> tuple[faiss.Index, IndexStamp]:
    """Load the index in ``folder`` after checking its stamp and checksum.

    Raises :class:`EncoderMismatchError` when the index was built by another encoder and
    :class:`IndexIntegrityError` when the file is missing, damaged or does not match its stamp.
    """
    stamp = read_stamp(folder)
    path = folder / INDEX_FILE
    if stamp is None or not path.exists():
        raise IndexIntegrityError(f"no readable FAISS index and stamp in {folder}")
    if stamp.encoder_fingerprint != encoder_fingerprint:
        raise EncoderMismatchError(
            f"FAISS index in {folder} was built with encoder {stamp.encoder_fingerprint}, but the "
            f"collection's encoder is {encoder_fingerprint}; refusing to search vectors from a "
            "different encoder. Rebuild it with `caselens index COLLECTION --rebuild`."
        )
    if _sha256(path) != stamp.checksum:
        raise IndexIntegrityError(f"FAISS index {path} does not match the checksum in its stamp")
    index = faiss.read_index(str(path))
    if index.ntotal != stamp.ntotal or index.d != stamp.dim:
        raise IndexIntegrityError(f"FAISS index {path} holds {index.ntotal}x{index.d}, stamp says "
                                  f"{stamp.ntotal}x{stamp.dim}")
    return index, stamp


def search_index(index: faiss.Index, queries: np.ndarray, k: int,
                 allowed_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, ids) for each query; ``allowed_ids`` restricts the search before ranking."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = max(1, min(k, index.ntotal)) if index.ntotal else 1
    if allowed_ids is None:
        return index.search(queries, k)
    selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64))
    inner = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    if isinstance(inner, faiss.IndexHNSW):
        params: faiss.SearchParameters = faiss.SearchParametersHNSW(sel=selector, efSearch=max(128, 2 * k))
    else:
        params = faiss.SearchParameters(sel=selector)
    return index.search(queries, k, params=params)

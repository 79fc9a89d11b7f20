"""FAISS indexes derived from a collection's table: build, stamp, write atomically, load, verify.

An index is a cache. It is stamped with the table version and encoder fingerprint it was built
from and a checksum of its bytes; a stale stamp means "bring it up to date" (add the new rows,
remove the deleted ones), a different encoder means "refuse", a bad checksum means "the file is
damaged: rebuild".

Index types are FAISS factory strings over inner product of unit vectors: ``Flat`` (exact),
``HNSW<M>``, ``IVF<n>,Flat``, ``IVF<n>,SQ8`` (scalar quantisation), ``IVF<n>,PQ<m>`` and
``OPQ<m>_<d>,IVF<n>,PQ<m>``. Ids are the table's ``_row`` numbers. Flat and HNSW indexes are
wrapped in ``IndexIDMap2``; IVF indexes keep ids in their inverted lists. Deletions are removed
from the index where FAISS can (Flat, IVF) and kept as tombstones (excluded by an ID selector
at search time) where it cannot (HNSW) until the next rebuild.

With a CUDA build of FAISS and a visible GPU, training and adding run on the GPU
(:func:`gpu_count`); the index written to disk is always a CPU index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from caselens.errors import ConfigError, DiskFullError, EncoderMismatchError, IndexIntegrityError
from caselens.faults import fault_point
from caselens.files import atomic_write_bytes, sha256_file

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
STAMP_FILE = "index.json"
HNSW_THRESHOLD = 50_000  # above this many vectors a flat index becomes an HNSW graph (low-level default)
ADD_BATCH = 65_536  # vectors added to an index per call (bounded temporary memory, progress)
TRAIN_POINTS_PER_LIST = 50  # training sample size per IVF list (FAISS wants at least 39)
MAX_TRAIN = 262_144  # never train on more vectors than this
OPQ_ITERATIONS = 16  # OPQ rotation refinements (FAISS default 50)


@dataclass(frozen=True)
class IndexStamp:
    """What an index was built from; written as JSON beside the index file."""

    table_version: int  # LanceDB table version the vectors were read from
    encoder_fingerprint: str  # fingerprint of the encoder that produced the vectors
    dim: int  # vector dimension
    ntotal: int  # number of vectors in the index (tombstoned ones included)
    factory: str  # FAISS factory description of the index ("Flat", "HNSW32", "IVF1024,SQ8")
    checksum: str  # sha256 of the index file's bytes
    params: dict[str, int] = field(default_factory=dict)  # search parameters: nprobe / efSearch
    choice: dict[str, Any] = field(default_factory=dict)  # how the index was chosen (recall, memory, ...)
    deleted: list[int] = field(default_factory=list)  # tombstoned ids (index types that cannot remove)
    trained_on: int = 0  # vectors in the collection when the index was trained (drift check)
    added_since_build: int = 0  # vectors added incrementally since the last full build
    removed_since_build: int = 0  # vectors removed incrementally since the last full build

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def summary(self) -> dict[str, Any]:
        """The stamp for display: tombstones counted, not listed."""
        out = asdict(self)
        out["deleted"] = len(self.deleted)
        out["live"] = self.live
        return out

    @property
    def live(self) -> int:
        """Vectors the index serves (ntotal minus tombstones)."""
        return self.ntotal - len(self.deleted)


def choose_factory(n: int) -> str:
    """Index type for ``n`` vectors without measuring: exact below :data:`HNSW_THRESHOLD`, HNSW
    above. :mod:`caselens.indexes.index_choice` chooses by measured recall instead."""
    return "Flat" if n <= HNSW_THRESHOLD else "HNSW32"


# --------------------------------------------------------------------- GPU
def gpu_count() -> int:
    """Number of GPUs FAISS can use (0 with faiss-cpu or without a CUDA device)."""
    try:
        return int(faiss.get_num_gpus())
    except AttributeError:
        return 0


def to_device(index: faiss.Index) -> tuple[faiss.Index, bool]:
    """``(index on all GPUs, True)`` when a GPU is usable and FAISS can place this index type
    there, else ``(index, False)``. HNSW graphs stay on the CPU."""
    if gpu_count() <= 0 or not hasattr(faiss, "index_cpu_to_all_gpus"):
        return index, False
    try:
        return faiss.index_cpu_to_all_gpus(index), True
    except (RuntimeError, AttributeError) as exc:  # type not supported on GPU
        log.info("FAISS index %s stays on the CPU: %s", type(index).__name__, exc)
        return index, False


def to_host(index: faiss.Index, on_gpu: bool) -> faiss.Index:
    """The CPU copy of an index returned by :func:`to_device`."""
    return faiss.index_gpu_to_cpu(index) if on_gpu else index


# ------------------------------------------------------------------- build
def factory_lists(factory: str) -> int:
    """Number of IVF lists in ``factory`` (0 when it is not an IVF index)."""
    for part in factory.split(","):
        if part.startswith("IVF"):
            digits = "".join(ch for ch in part[3:] if ch.isdigit())
            return int(digits) if digits else 0
    return 0


def empty_index(factory: str, dim: int) -> faiss.Index:
    """An empty (untrained) index of type ``factory`` for ``dim``-dimensional unit vectors."""
    if factory == "Flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if factory.startswith("HNSW") and "," not in factory:
        try:
            m = int(factory[4:] or 32)
        except ValueError:
            raise ConfigError(f"unknown index factory {factory!r}; HNSW takes a number: 'HNSW32'") from None
        inner = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = 80
        inner.hnsw.efSearch = 128
        return faiss.IndexIDMap2(inner)
    if factory_lists(factory) <= 0:
        raise ConfigError(f"unknown index factory {factory!r}; use 'Flat', 'HNSW<M>' or an IVF factory such "
                         "as 'IVF1024,Flat', 'IVF1024,SQ8', 'IVF1024,PQ64' or 'OPQ64_256,IVF1024,PQ64'")
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise ConfigError(f"FAISS cannot build {factory!r} for dimension {dim}: {str(exc).splitlines()[0]}") from None
    outer = faiss.downcast_index(index)
    if isinstance(outer, faiss.IndexPreTransform):  # OPQ: 16 rotations refine as well as 50, 3x sooner
        for i in range(outer.chain.size()):
            opq = faiss.downcast_VectorTransform(outer.chain.at(i))
            if isinstance(opq, faiss.OPQMatrix):
                opq.niter = OPQ_ITERATIONS
    return index


def train_sample(n: int, factory: str, seed: int = 0, exclude: np.ndarray | None = None) -> np.ndarray:
    """Positions of the vectors an index of type ``factory`` over ``n`` vectors is trained on."""
    lists = factory_lists(factory)
    want = min(n, MAX_TRAIN, max(TRAIN_POINTS_PER_LIST * lists, 256 * 40 if "PQ" in factory else 0, 10_000))
    pool = np.arange(n) if exclude is None else np.setdiff1d(np.arange(n), exclude)
    if len(pool) <= want:
        return pool
    return np.sort(np.random.default_rng(seed).choice(pool, want, replace=False))


def build_index(vectors: np.ndarray, ids: np.ndarray, factory: str | None = None, *, seed: int = 0,
                exclude_from_training: np.ndarray | None = None,
                progress: Callable[[int], None] | None = None) -> tuple[faiss.Index, str]:
    """Build an inner-product index over L2-normalised ``vectors`` keyed by int64 ``ids``.

    IVF indexes are trained on a sample (:func:`train_sample`), then vectors are added in
    batches of :data:`ADD_BATCH`; both run on the GPU when one is usable. ``progress`` is called
    with the number of vectors added after each batch.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise ValueError(f"vectors {vectors.shape} and ids {ids.shape} do not line up")
    factory = factory or choose_factory(len(vectors))
    index = empty_index(factory, vectors.shape[1])
    device, on_gpu = to_device(index)
    if not index.is_trained:
        sample = train_sample(len(vectors), factory, seed, exclude_from_training)
        lists = factory_lists(factory)
        if len(sample) < lists:
            raise ConfigError(f"{factory} needs at least {lists} vectors to train, the collection has {len(vectors)}")
        device.train(np.ascontiguousarray(vectors[sample]))
    add_vectors(device, vectors, ids, progress)
    return to_host(device, on_gpu), factory


def add_vectors(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray,
                progress: Callable[[int], None] | None = None) -> None:
    """Add ``vectors`` with ``ids`` to a trained index in batches."""
    for start in range(0, len(vectors), ADD_BATCH):
        part = np.ascontiguousarray(vectors[start:start + ADD_BATCH], dtype=np.float32)
        index.add_with_ids(part, np.ascontiguousarray(ids[start:start + ADD_BATCH], dtype=np.int64))
        if progress is not None:
            progress(len(part))


def ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    """The IVF part of an index (inside a pre-transform such as OPQ), or None."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index if isinstance(index, faiss.IndexIVF) else None


def hnsw_of(index: faiss.Index) -> faiss.IndexHNSW | None:
    """The HNSW graph inside an ``IndexIDMap2``, or None."""
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap2, faiss.IndexIDMap)):
        index = faiss.downcast_index(index.index)
    return index if isinstance(index, faiss.IndexHNSW) else None


def stored_vectors(index: faiss.Index, ids: np.ndarray) -> np.ndarray | None:
    """The vectors of ``ids`` (held by ``index``) exactly as they were added, when the index keeps
    them so and can find them by id (a flat or HNSW-flat index keyed by ids); None otherwise."""
    outer = faiss.downcast_index(index)
    if not isinstance(outer, faiss.IndexIDMap2):
        return None
    inner = faiss.downcast_index(outer.index)
    if isinstance(inner, faiss.IndexHNSW):
        inner = faiss.downcast_index(inner.storage)
    if type(inner) not in (faiss.IndexFlatIP, faiss.IndexFlat, faiss.IndexFlatL2):
        return None
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if not len(ids):
        return np.zeros((0, index.d), np.float32)
    return outer.reconstruct_batch(ids)


def index_ids(index: faiss.Index) -> np.ndarray:
    """Every id stored in ``index`` (tombstoned ones included), unsorted."""
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexIDMap2, faiss.IndexIDMap)):
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf = ivf_of(index)
    if ivf is None:
        raise TypeError(f"cannot list the ids of a {type(index).__name__}")
    invlists = ivf.invlists
    parts = []
    for lst in range(ivf.nlist):
        size = invlists.list_size(lst)
        if size:
            ptr = invlists.get_ids(lst)
            parts.append(faiss.rev_swig_ptr(ptr, size).copy())
            invlists.release_ids(lst, ptr)
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def remove_ids(index: faiss.Index, ids: np.ndarray) -> np.ndarray:
    """Remove ``ids`` from ``index``; returns the ids it could not remove (to tombstone)."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if not len(ids):
        return ids
    if hnsw_of(index) is not None:  # HNSW graphs cannot drop nodes
        return ids
    index.remove_ids(faiss.IDSelectorBatch(ids))
    return np.zeros(0, np.int64)


# ------------------------------------------------------------------- write
def remove_stale_temporaries(folder: Path) -> int:
    """Delete temporary files left in ``folder`` by a writer that was killed; call it only while
    holding the collection's write lock. Returns how many were removed."""
    removed = 0
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def _write_named(path: Path, data: Any) -> None:
    """:func:`atomic_write_bytes` into ``<collection>/faiss``, a full disk reported with the collection's name."""
    try:
        atomic_write_bytes(path, data)
    except DiskFullError as exc:
        name = path.parent.parent.name
        raise DiskFullError(f"collection {name!r}: {exc}; the table is untouched: free space and run "
                            f"`caselens index {name}`") from None


def write_index(index: faiss.Index, folder: Path, *, table_version: int, encoder_fingerprint: str,
                factory: str, params: dict[str, int] | None = None, choice: dict[str, Any] | None = None,
                deleted: list[int] | None = None, trained_on: int = 0, added_since_build: int = 0,
                removed_since_build: int = 0) -> IndexStamp:
    """Write ``index`` and its stamp into ``folder`` atomically (temp file, fsync, rename).

    The stamp is written after the index; a reader that sees a new index with an old stamp
    finds a checksum mismatch and rebuilds, so a crash between the two never serves a wrong index.
    """
    folder.mkdir(parents=True, exist_ok=True)
    data = faiss.serialize_index(index)
    _write_named(folder / INDEX_FILE, data)
    fault_point("index.write.between")
    stamp = IndexStamp(
        table_version=int(table_version),
        encoder_fingerprint=encoder_fingerprint,
        dim=int(index.d),
        ntotal=int(index.ntotal),
        factory=factory,
        checksum=hashlib.sha256(memoryview(data)).hexdigest(),
        params=dict(params or {}),
        choice=dict(choice or {}),
        deleted=sorted(int(i) for i in (deleted or [])),
        trained_on=int(trained_on or index.ntotal),
        added_since_build=int(added_since_build),
        removed_since_build=int(removed_since_build),
    )
    _write_named(folder / STAMP_FILE, stamp.to_json().encode())
    _CACHE.put(folder, stamp, index)
    log.info("wrote FAISS index (%s, %d vectors) to %s", factory, stamp.ntotal, folder / INDEX_FILE)
    return stamp


def restamp(folder: Path, stamp: IndexStamp, table_version: int) -> IndexStamp:
    """Move an unchanged index to a new table version (the table's rows are the same, e.g. after
    a compaction): only the stamp is rewritten, atomically."""
    new = IndexStamp(**{**asdict(stamp), "table_version": int(table_version)})
    atomic_write_bytes(folder / STAMP_FILE, new.to_json().encode())
    return new


def read_stamp(folder: Path) -> IndexStamp | None:
    """The stamp in ``folder``, or None when there is none or it cannot be parsed."""
    try:
        return IndexStamp(**json.loads((folder / STAMP_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def file_key(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime in ns, size) of ``path``, or None when it is missing: a file replaced by a
    writer (a new file renamed into place) gets a new key."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


# -------------------------------------------------------------------- load
class _LoadedCache:
    """Indexes already loaded and verified in this process, keyed by folder and checksum, so a
    search does not re-read and re-hash the file each time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, tuple[str, int, faiss.Index]] = {}

    def get(self, folder: Path, stamp: IndexStamp) -> faiss.Index | None:
        path = folder / INDEX_FILE
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            return None
        with self._lock:
            hit = self._items.get(str(folder))
        if hit and hit[0] == stamp.checksum and hit[1] == mtime:
            return hit[2]
        return None

    def put(self, folder: Path, stamp: IndexStamp, index: faiss.Index) -> None:
        try:
            mtime = (folder / INDEX_FILE).stat().st_mtime_ns
        except OSError:
            return
        with self._lock:
            self._items[str(folder)] = (stamp.checksum, mtime, index)

    def drop(self, folder: Path) -> None:
        with self._lock:
            self._items.pop(str(folder), None)


_CACHE = _LoadedCache()


def load_index(folder: Path, encoder_fingerprint: str, *, mmap: bool = False, cached: bool = True,
               stamp: IndexStamp | None = None) -> tuple[faiss.Index, IndexStamp]:
    """Load the index in ``folder`` after checking its stamp and checksum.

    ``mmap`` maps the index file instead of reading it (IVF lists and flat codes stay on disk
    and are paged in by the OS; such an index is read-only). With ``cached`` an index this
    process already loaded and verified is returned as is when file and stamp are unchanged;
    callers that modify the index must pass ``cached=False``.

    ``stamp`` is the stamp the caller just read (saves reading it again).

    Raises :class:`EncoderMismatchError` when the index was built by another encoder and
    :class:`IndexIntegrityError` when the file is missing, damaged or does not match its stamp.
    """
    stamp = stamp or read_stamp(folder)
    path = folder / INDEX_FILE
    if stamp is None or not path.exists():
        raise IndexIntegrityError(f"no readable FAISS index and stamp in {folder}; rebuild it with "
                                  "`caselens index COLLECTION --rebuild`")
    if stamp.encoder_fingerprint != encoder_fingerprint:
        raise EncoderMismatchError(
            f"FAISS index in {folder} was built with encoder {stamp.encoder_fingerprint}, but the "
            f"collection's encoder is {encoder_fingerprint}; refusing to search vectors from a "
            "different encoder. Rebuild it with `caselens index COLLECTION --rebuild`."
        )
    if cached:
        hit = _CACHE.get(folder, stamp)
        if hit is not None:
            return hit, stamp
    before = file_key(path)  # a writer may rename a new file into place while this one is read
    if sha256_file(path) != stamp.checksum:
        raise IndexIntegrityError(f"FAISS index {path} does not match the checksum in its stamp; "
                                  "it is damaged and will be rebuilt from the table")
    try:
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        index = faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        raise IndexIntegrityError(f"FAISS cannot read {path}: {str(exc).splitlines()[0]}") from None
    if file_key(path) != before:
        raise IndexIntegrityError(f"FAISS index {path} was replaced while it was read")
    if index.ntotal != stamp.ntotal or index.d != stamp.dim:
        raise IndexIntegrityError(f"FAISS index {path} holds {index.ntotal}x{index.d}, stamp says "
                                  f"{stamp.ntotal}x{stamp.dim}")
    if cached:
        _CACHE.put(folder, stamp, index)
    return index, stamp


# ------------------------------------------------------------------ search
def bitmap_selector(ids: np.ndarray) -> tuple[faiss.IDSelector, np.ndarray]:
    """A bitmap ID selector for non-negative ``ids`` (and the bitmap, which must stay alive as long
    as the selector is used)."""
    top = int(ids.max()) + 1 if len(ids) else 1
    mask = np.zeros(top, dtype=bool)
    mask[ids] = True
    bits = np.packbits(mask, bitorder="little")
    return faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits)), bits  # size in bytes


def search_params(index: faiss.Index, params: dict[str, int] | None, selector: faiss.IDSelector | None,
                  selectivity: float = 1.0) -> faiss.SearchParameters | None:
    """FAISS search parameters for ``index``: the stamp's ``nprobe``/``efSearch``, widened for a
    selective filter (fewer allowed vectors per probed list need more lists), and the selector."""
    params = params or {}
    ivf = ivf_of(index)
    widen = 1.0 / max(selectivity, 1e-6)
    if ivf is not None:
        nprobe = int(params.get("nprobe", ivf.nprobe))
        if selectivity < 1.0:
            nprobe = int(math.ceil(nprobe * widen))
        p: faiss.SearchParameters = faiss.SearchParametersIVF(nprobe=min(ivf.nlist, max(1, nprobe)))
        if selector is not None:
            p.sel = selector
        if isinstance(faiss.downcast_index(index), faiss.IndexPreTransform):  # OPQ: parameters go inside
            outer = faiss.SearchParametersPreTransform()
            outer.index_params = p
            outer.sel = selector  # ignored by the transform, kept alive with it
            outer._inner = p  # keep the Python object alive as long as the outer one
            return outer
        return p
    hnsw = hnsw_of(index)
    if hnsw is not None:
        ef = int(params.get("efSearch", hnsw.hnsw.efSearch))
        if selectivity < 1.0:
            ef = int(math.ceil(ef * widen))
        p = faiss.SearchParametersHNSW(efSearch=min(max(ef, 16), 4096))
        if selector is not None:
            p.sel = selector
        return p
    if selector is not None:
        return faiss.SearchParameters(sel=selector)
    return None


# id(index) -> (weak reference to the index, copy of params, copy of the tombstones, SearchParameters,
# objects the parameters point to)
_PARAMS: dict[int, tuple] = {}
_PARAMS_DROP = _PARAMS.pop  # bound now: weak reference callbacks may run late at interpreter exit


def _unfiltered_params(index: faiss.Index, params: dict[str, int] | None,
                       deleted: list[int] | np.ndarray | None) -> faiss.SearchParameters | None:
    """Search parameters for a search without a filter: the stamp's ``params`` and, with
    tombstones, a selector that excludes ``deleted``.

    Kept per index object for the same ``params`` and tombstones (a list equal to the one they
    were made for: a stamp's), so a single query does not pay for downcasts, SWIG objects and a
    hash set of every tombstone. FAISS only reads search parameters and selectors, so one set
    serves concurrent searches. Not kept when ``params`` name neither ``nprobe`` nor
    ``efSearch`` for an index that has one (the index's own, changeable value applies then) or
    tombstones come as another type than a list.
    """
    dead = deleted if deleted is not None and len(deleted) else None
    if dead is None or isinstance(dead, list):
        cached = _PARAMS.get(id(index))
        if cached is not None and cached[0]() is index and cached[1] == (params or {}) and cached[2] == dead:
            return cached[3]  # (dict ==, list ==: C speed)
    keep: list[Any] = []
    selector = None
    if dead is not None:
        batch = faiss.IDSelectorBatch(np.ascontiguousarray(dead, dtype=np.int64))
        selector = faiss.IDSelectorNot(batch)
        keep += [batch, selector]
    p = search_params(index, params, selector)
    if p is not None:
        p._caselens_keep = keep  # the selectors live as long as the parameters
    tuned = bool(params) and ("nprobe" in params or "efSearch" in params)
    if (dead is None or isinstance(dead, list)) and (tuned or (ivf_of(index) is None and hnsw_of(index) is None)):
        key = id(index)
        try:
            ref = weakref.ref(index, lambda _: _PARAMS_DROP(key, None))  # forgotten with the index
        except TypeError:  # not weakly referenceable
            return p
        _PARAMS[key] = (ref, dict(params or {}), list(dead) if dead is not None else None, p, keep)
    return p


# id(index) -> (weak reference to the index, whether it is flat): downcasts cost ~40 us a query
_FLAT: dict[int, tuple[Any, bool]] = {}
_FLAT_DROP = _FLAT.pop


def is_flat(index: faiss.Index) -> bool:
    """True for an exact (flat) index, bare or inside an ``IndexIDMap``/``IndexIDMap2``."""
    hit = _FLAT.get(id(index))
    if hit is not None and hit[0]() is index:
        return hit[1]
    inner = faiss.downcast_index(index)
    if isinstance(inner, (faiss.IndexIDMap2, faiss.IndexIDMap)):
        inner = faiss.downcast_index(inner.index)
    flat = isinstance(inner, faiss.IndexFlat)
    key = id(index)
    try:
        _FLAT[key] = (weakref.ref(index, lambda _: _FLAT_DROP(key, None)), flat)
    except TypeError:  # not weakly referenceable: not kept
        pass
    return flat


def search_threads(index: faiss.Index, n_queries: int) -> int | None:
    """OpenMP threads for a search of ``n_queries`` on ``index``; None: FAISS's default (all).

    FAISS splits a search across queries; one query on a flat index is a single scan of memory,
    and a second thread only waits at barriers and competes for the bandwidth: one thread is
    ~3x faster on a 2-core machine at 100k-1M vectors (``benchmarks/flat_scan.py``). Batches
    (and every other index type, whose single queries take ~1 ms) keep all threads.
    """
    return 1 if n_queries == 1 and is_flat(index) else None


@contextmanager
def omp_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` OpenMP threads (None: unchanged), then restore the count.

    The count is OpenMP's per-thread setting (libgomp keeps it per calling thread), so concurrent
    searches in other threads keep their own."""
    before = faiss.omp_get_max_threads() if n is not None else None
    if n is None or n == before:
        yield
        return
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def search_index(index: faiss.Index, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None,
                 params: dict[str, int] | None = None, deleted: list[int] | np.ndarray | None = None,
                 selectivity: float | None = None,
                 selector: tuple[faiss.IDSelector | None, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, ids) for each query.

    ``allowed_ids`` restricts the search before ranking (an ID selector); ``params`` are the
    stamp's tuned ``nprobe``/``efSearch``; ``deleted`` are tombstoned ids that never come back;
    ``selectivity`` (allowed / total, computed when not given) widens the search for filters.
    ``selector`` is a prebuilt (ID selector or None, number of ids it selects) to use instead
    of ``allowed_ids`` (made by :func:`bitmap_selector`, tombstones left out, kept for repeated
    searches with one filter; None: every id of ``index``, which holds only the allowed ones).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim == 1:
        queries = queries[None]
    with omp_threads(search_threads(index, len(queries))):
        return _search(index, queries, k, allowed_ids, params, deleted, selectivity, selector)


def _search(index: faiss.Index, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None,
            params: dict[str, int] | None, deleted: list[int] | np.ndarray | None,
            selectivity: float | None,
            selector: tuple[faiss.IDSelector | None, int] | None) -> tuple[np.ndarray, np.ndarray]:
    ntotal = index.ntotal
    k = max(1, min(k, ntotal)) if ntotal else 1
    if selector is not None:
        sel, count = selector
        if not count:
            return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        p = search_params(index, params, sel, selectivity if selectivity is not None else count / max(1, ntotal))
        return index.search(queries, k, params=p)
    if allowed_ids is not None:
        allowed = np.asarray(allowed_ids, dtype=np.int64)
        if deleted is not None and len(deleted):
            allowed = np.setdiff1d(allowed, np.asarray(deleted, np.int64))
        if not len(allowed):
            return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        made, bits = bitmap_selector(allowed)  # bits must stay alive until the search is done
        if selectivity is None:
            selectivity = len(allowed) / max(1, ntotal)
        p = search_params(index, params, made, selectivity)
        if p is None:
            return index.search(queries, k)
        scores, ids = index.search(queries, k, params=p)
        del bits
        return scores, ids
    p = _unfiltered_params(index, params, deleted)
    if p is None:
        return index.search(queries, k)
    return index.search(queries, k, params=p)


def index_bytes(index: faiss.Index) -> int:
    """Size of ``index`` serialised (what it takes on disk and, loaded, in memory)."""
    return int(faiss.serialize_index(index).nbytes)


# ------------------------------------------------------------- large builds
def build_sharded_ivf(trained: faiss.Index, shards: list[tuple[np.ndarray, np.ndarray]], folder: Path,
                      name: str = INDEX_FILE) -> faiss.Index:
    """Build an IVF index larger than RAM: each shard ``(vectors, ids)`` is added to a copy of the
    ``trained`` (empty) index and written on its own, then the shards' inverted lists are merged
    into one on-disk file (``<name>.ivfdata``) that the index maps instead of holding in memory.

    Shards can be built by separate processes or machines from the same trained index
    (:func:`write_ivf_shard`, as :mod:`caselens.indexes.ray_index` does); only their files are
    needed for the merge (:func:`merge_ivf_shards`). Returns the merged index (lists on disk).
    """
    check_trained_ivf(trained)
    folder.mkdir(parents=True, exist_ok=True)
    shard_files = [write_ivf_shard(trained, vectors, ids, folder / f"shard_{i:04d}.faiss")
                   for i, (vectors, ids) in enumerate(shards)]
    merged = merge_ivf_shards(trained, shard_files, folder / f"{name}.ivfdata")
    faiss.write_index(merged, str(folder / name))
    for path in shard_files:
        path.unlink()
    return merged


def check_trained_ivf(trained: faiss.Index) -> None:
    """Refuse anything but a trained, empty IVF index as the start of a sharded build."""
    if ivf_of(trained) is None or not trained.is_trained or trained.ntotal:
        raise ValueError("a sharded IVF build needs a trained, empty IVF index")


def write_ivf_shard(trained: faiss.Index, vectors: np.ndarray, ids: np.ndarray, path: Path) -> Path:
    """``vectors`` with ``ids`` added to a copy of the ``trained`` (empty) IVF index, written to
    ``path``: one shard of a sharded build, made by any process that holds the trained index."""
    check_trained_ivf(trained)
    part = faiss.clone_index(trained)
    add_vectors(part, vectors, ids)
    faiss.write_index(part, str(path))
    return path


def merge_ivf_shards(trained: faiss.Index, shard_files: list[Path], ivfdata: Path) -> faiss.Index:
    """The inverted lists of the shard files merged into one on-disk file ``ivfdata``; returns a copy
    of ``trained`` whose lists are mapped from it (the file's absolute path is recorded in the
    index: keep it where it was written)."""
    from faiss.contrib.ondisk import merge_ondisk

    check_trained_ivf(trained)
    merged = faiss.clone_index(trained)
    merge_ondisk(merged, [str(p) for p in shard_files], str(ivfdata))
    return merged


def verify_lists(folder: Path, stamp: IndexStamp) -> bool:
    """Whether the on-disk lists file of a sharded build named by ``stamp.choice`` (``ivfdata``,
    written by :mod:`caselens.indexes.ray_index`) is the one the build wrote (size and sha256);
    True for indexes that keep their lists inside the index file (the stamp's checksum covers
    those)."""
    name = (stamp.choice or {}).get("ivfdata")
    if not name:
        return True
    path = folder / name
    return (path.exists() and path.stat().st_size == stamp.choice.get("ivfdata_bytes")
            and sha256_file(path) == stamp.choice.get("ivfdata_sha256"))

"""IVF indexes of some rows of another IVF index, for filters that come back.

Searching an IVF index through a filter's ID selector visits every list the widened ``nprobe``
reaches and checks each id in them against the filter: at 1M rows and a 1 % filter, a million
id checks for ten thousand scores. A filter used again is better served by an index of its own
rows: :func:`subset_index` copies their codes, as the big index stores them (no re-encoding:
the scores are the same), into an IVF index of the same kind over the same coarse quantizer,
which visits only the filter's codes.

How many lists to probe for a filter (:func:`search_covering`): the lists nearest the query, at
least as many as unfiltered, until they hold enough of the filter's rows. A filter independent
of the vectors then costs what an unfiltered search costs; one whose rows lie away from the
query (another modality, another label) probes on until they are reached.

Supported: ``IndexIVFFlat`` and ``IndexIVFScalarQuantizer`` (not wrapped in a transform), with
inverted lists in memory or memory-mapped; :func:`supports` says so for an index. The codes'
places (:class:`ListCodes`) are listed once per loaded index.
"""

from __future__ import annotations

import threading
import weakref

import faiss
import numpy as np

_LISTED: "weakref.WeakKeyDictionary[faiss.Index, ListCodes]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    ivf = faiss.downcast_index(index)
    if type(ivf) not in (faiss.IndexIVFFlat, faiss.IndexIVFScalarQuantizer):
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    if type(lists) not in (faiss.ArrayInvertedLists, faiss.OnDiskInvertedLists):
        return None
    return ivf


def supports(index: faiss.Index) -> bool:
    """Whether :func:`subset_index` can make indexes of ``index``'s rows."""
    return _ivf(index) is not None


class ListCodes:
    """Where the code of each id is in an IVF index's inverted lists (which list, which place)."""

    def __init__(self, index: faiss.Index):
        ivf = _ivf(index)
        if ivf is None:
            raise TypeError(f"{type(faiss.downcast_index(index)).__name__} is not an IVF index of a supported kind")
        self.index = index
        self.ivf = ivf
        lists = ivf.invlists
        size = ivf.code_size
        ids_of, self.codes = [], []
        top = 0
        for lst in range(ivf.nlist):
            n = lists.list_size(lst)
            ids = faiss.rev_swig_ptr(lists.get_ids(lst), n).copy() if n else np.zeros(0, np.int64)
            codes = faiss.rev_swig_ptr(lists.get_codes(lst), n * size).reshape(n, size) if n else \
                np.zeros((0, size), np.uint8)  # (a view: the index keeps the bytes; it is never changed)
            ids_of.append(ids)
            self.codes.append(codes)
            top = max(top, int(ids.max()) + 1 if n else 0)
        self.list_of = np.full(top, -1, np.int32)
        self.place_of = np.zeros(top, np.int32)
        for lst, ids in enumerate(ids_of):
            self.list_of[ids] = lst
            self.place_of[ids] = np.arange(len(ids), dtype=np.int32)

    def sa_codes(self, ids: np.ndarray) -> np.ndarray:
        """The standalone codes (list number, then the list's code) of ``ids``, all held by the index."""
        ids = np.asarray(ids, np.int64)
        lists, places = self.list_of[ids], self.place_of[ids]
        if (lists < 0).any():
            raise KeyError("some ids are not in the index")
        head = self.ivf.coarse_code_size()
        out = np.empty((len(ids), head + self.ivf.code_size), np.uint8)
        for b in range(head):
            out[:, b] = (lists >> (8 * b)) & 0xFF
        order = np.argsort(lists, kind="stable")
        sorted_lists = lists[order]
        cuts = np.flatnonzero(np.diff(sorted_lists)) + 1
        for group in np.split(order, cuts) if len(order) else []:
            out[group, head:] = self.codes[int(lists[group[0]])][places[group]]
        return out


def list_codes(index: faiss.Index) -> ListCodes:
    """The :class:`ListCodes` of ``index`` (listed on first use, kept as long as the index lives)."""
    with _LOCK:
        listed = _LISTED.get(index)
    if listed is None:
        listed = ListCodes(index)
        with _LOCK:
            _LISTED[index] = listed
    return listed


def subset_index(index: faiss.Index, ids: np.ndarray) -> faiss.Index:
    """An IVF index of ``ids`` (held by ``index``), sharing its coarse quantizer and holding the same
    codes, so it scores them as ``index`` does."""
    listed = list_codes(index)
    ivf = listed.ivf
    if isinstance(ivf, faiss.IndexIVFScalarQuantizer):
        sub = faiss.IndexIVFScalarQuantizer(ivf.quantizer, ivf.d, ivf.nlist, ivf.sq.qtype, ivf.metric_type,
                                            ivf.by_residual)
        sub.sq = ivf.sq
    else:
        sub = faiss.IndexIVFFlat(ivf.quantizer, ivf.d, ivf.nlist, ivf.metric_type)
    sub.is_trained = True
    # the quantizer belongs to ``index``: keep it alive as long as this index (FAISS's own way)
    sub.referenced_objects = [*getattr(sub, "referenced_objects", []), index]
    ids = np.ascontiguousarray(ids, np.int64)
    if len(ids):
        sub.add_sa_codes(listed.sa_codes(ids), ids)
    return sub


def list_counts(index: faiss.Index, ids: np.ndarray) -> np.ndarray:
    """How many of ``ids`` (held by ``index``) each inverted list of it holds."""
    listed = list_codes(index)
    return np.bincount(listed.list_of[np.asarray(ids, np.int64)], minlength=listed.ivf.nlist)


def search_covering(index: faiss.Index, query: np.ndarray, k: int, selector: faiss.IDSelector | None,
                    counts: np.ndarray, wanted: int, params: dict[str, int] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of one ``query`` in an IVF ``index`` among the ids ``selector`` lets through (all:
    None), ``counts`` of them in each list: the lists nearest the query are probed -- at least the
    ``nprobe`` of ``params`` -- until they hold ``wanted`` of those ids (or every list is)."""
    ivf = faiss.downcast_index(index)
    base = int((params or {}).get("nprobe", ivf.nprobe))
    query = np.ascontiguousarray(query, np.float32).reshape(1, -1)
    per_list = max(float(counts.sum()) / ivf.nlist, 1e-9)  # twice the lists an even spread needs; all if short
    near = min(ivf.nlist, max(base, int(2 * wanted / per_list) + 1))
    while True:
        distances, lists = ivf.quantizer.search(query, near)  # (FAISS: numpy's threaded BLAS stalls under load)
        covered = np.cumsum(counts[np.maximum(lists[0], 0)])
        if covered[-1] >= wanted or near == ivf.nlist:
            break
        near = ivf.nlist
    nprobe = min(near, max(base, int(np.searchsorted(covered, wanted)) + 1))
    lists = np.ascontiguousarray(lists[:, :nprobe])
    distances = np.ascontiguousarray(distances[:, :nprobe])
    p = faiss.SearchParametersIVF(nprobe=nprobe)
    if selector is not None:
        p.sel = selector
    scores = np.empty((1, k), np.float32)
    ids = np.empty((1, k), np.int64)
    ivf.search_preassigned_c(1, faiss.swig_ptr(query), k, faiss.swig_ptr(lists), faiss.swig_ptr(distances),
                             faiss.swig_ptr(scores), faiss.swig_ptr(ids), False, p)
    return scores, ids


def list_sizes(index: faiss.Index) -> np.ndarray:
    """How many ids each inverted list of an IVF ``index`` holds."""
    ivf = faiss.downcast_index(index)
    return np.asarray([ivf.invlists.list_size(i) for i in range(ivf.nlist)], np.int64)


def subset_bytes(index: faiss.Index, n: int) -> int:
    """Memory an index of ``n`` of ``index``'s rows takes (codes and ids)."""
    ivf = faiss.downcast_index(index)
    return n * (int(getattr(ivf, "code_size", 0)) + 8)

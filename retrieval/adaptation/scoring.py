"""Exact cosine ranking of queries against an archive, with same-patient exclusion, and P@k.

The one ranking used by adapter selection, retrieval evaluation and diagnosis evaluation, so a
method is chosen by the very number it is reported by. Vectors must be unit rows.
"""

from __future__ import annotations

import numpy as np

BLOCK = 1024  # queries ranked per matrix product


def top_k(queries: np.ndarray, archive: np.ndarray, k: int, query_groups: np.ndarray | None = None,
          archive_groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(indices, similarities), each (n_queries, k), best first, of the ``k`` archive rows most
    similar (inner product) to each query; archive rows of the query's own group (patient) are
    never returned. Slots without a candidate hold index -1 and similarity -inf."""
    q = np.asarray(queries, np.float32)
    a = np.asarray(archive, np.float32)
    nq, na = len(q), len(a)
    k_eff = min(k, na)
    idx = np.full((nq, k), -1, np.int64)
    sims = np.full((nq, k), -np.inf, np.float32)
    if nq == 0 or na == 0 or k_eff == 0:
        return idx, sims
    qg = ag = None
    if query_groups is not None and archive_groups is not None:
        _, codes = np.unique(np.concatenate([np.asarray(query_groups, dtype=object).astype(str),
                                             np.asarray(archive_groups, dtype=object).astype(str)]), return_inverse=True)
        qg, ag = codes[:nq], codes[nq:]
        if not np.isin(qg, ag).any():  # no query shares a patient with the archive: nothing to exclude
            qg = ag = None
    for start in range(0, nq, BLOCK):
        s = q[start:start + BLOCK] @ a.T
        if qg is not None:
            s[qg[start:start + BLOCK][:, None] == ag[None, :]] = -np.inf
        part = np.argpartition(-s, k_eff - 1, axis=1)[:, :k_eff] if k_eff < na else np.tile(np.arange(na), (len(s), 1))
        vals = np.take_along_axis(s, part, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")
        part = np.take_along_axis(part, order, axis=1)
        vals = np.take_along_axis(vals, order, axis=1)
        part[~np.isfinite(vals)] = -1
        idx[start:start + BLOCK, :k_eff] = part
        sims[start:start + BLOCK, :k_eff] = vals
    return idx, sims


def precision_at_k(query_labels: np.ndarray, archive_labels: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Per query: the share of its ``k`` neighbour slots holding an archive item of its label
    (empty slots count as misses, so a query that can find nothing scores 0)."""
    k = neighbours.shape[1]
    found = neighbours >= 0
    same = np.zeros(neighbours.shape, bool)
    same[found] = np.asarray(archive_labels, dtype=object)[neighbours[found]] == np.repeat(
        np.asarray(query_labels, dtype=object), k).reshape(neighbours.shape)[found]
    return same.sum(1) / float(k)

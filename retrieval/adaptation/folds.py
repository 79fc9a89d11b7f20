"""Cross-validation folds that keep each patient in one fold and classes spread evenly.

Every evaluation and every choice made by cross-validation in caselens (adapter method and its
settings, diagnosis k and temperature, calibration) uses these folds, so no patient is ever
both in the fitted archive and among the queries scored against it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from caselens.errors import AdaptationError


def group_keys(groups: Sequence[object] | np.ndarray | None, n: int) -> np.ndarray:
    """One key per item: its group (patient) where given, else a key of its own (items without a
    patient are their own group)."""
    if groups is None:
        return np.array([f"\x00{i}" for i in range(n)], dtype=object)
    out = np.empty(n, dtype=object)
    for i, g in enumerate(groups):
        missing = g is None or (isinstance(g, float) and np.isnan(g)) or (isinstance(g, str) and g in ("", "None"))
        out[i] = f"\x00{i}" if missing else str(g)
    return out


def group_folds(labels: Sequence[object] | np.ndarray, groups: Sequence[object] | np.ndarray | None,
                n_folds: int = 5, seed: int = 0) -> np.ndarray:
    """Fold number (0..n_folds-1) of each item: all items of a group in one fold, each class's
    items spread over the folds as evenly as the groups allow (greedy stratified group k-fold:
    groups in random order, larger first, each to the fold where it evens out class counts most).

    Raises :class:`AdaptationError` when there are fewer groups than folds."""
    labels = np.asarray([str(v) for v in labels], dtype=object)
    n = len(labels)
    if n_folds < 2:
        raise AdaptationError(f"cross-validation needs at least 2 folds, got {n_folds}")
    keys = group_keys(groups, n)
    uniq, gidx = np.unique(keys, return_inverse=True)
    if len(uniq) < n_folds:
        raise AdaptationError(f"{len(uniq)} patient(s) cannot be split into {n_folds} patient-disjoint folds; "
                              "use fewer folds or more labelled items")
    classes, yidx = np.unique(labels, return_inverse=True)
    counts = np.zeros((len(uniq), len(classes)))
    np.add.at(counts, (gidx, yidx), 1)
    totals = counts.sum(0)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    order = order[np.argsort(-counts[order].sum(1), kind="stable")]  # large groups first, random ties
    fold_counts = np.zeros((n_folds, len(classes)))
    fold_of_group = np.empty(len(uniq), np.int64)
    share = 1.0 / np.maximum(totals, 1)
    for g in order:
        trial = fold_counts + counts[g]  # (folds, classes): each fold's counts if g went there
        # spread of every class's share over folds if g went to fold f (others unchanged)
        cost = np.empty(n_folds)
        for f in range(n_folds):
            rows = fold_counts.copy()
            rows[f] = trial[f]
            cost[f] = float(((rows * share).std(axis=0)).mean())
        size = fold_counts.sum(1)
        best = np.flatnonzero(np.isclose(cost, cost.min()))
        f = int(best[np.argmin(size[best])])
        fold_counts[f] += counts[g]
        fold_of_group[g] = f
    return fold_of_group[gidx]

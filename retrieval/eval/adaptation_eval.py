"""Retrieval with and without an adapter, evaluated without leakage.

Protocol: the labelled items are split into folds (patient-disjoint by default:
:func:`~caselens.retrieval.adaptation.folds.group_folds`; or folds given by the caller). For each
fold, its items are the queries and the archive is every other labelled item *except those of
the queries' patients and exact copies of a query's vector* (the same image filed under another
patient id), so they are out of both the fit and the ranking, even with folds that are not
patient-disjoint. The adapter is chosen and fitted on the archive only
(``method="auto"``: nested cross-validation inside the archive), then each query ranks the
archive by exact cosine, raw and adapted; P@k counts archive items of the query's label among
its top k (a query with nothing findable scores 0). Nothing of a query's fold is ever seen by the
fit. Leave-one-out with an adapter fitted on everything is not this, and not a number to report.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from caselens.indexes.collection import Collection
from caselens.retrieval.adaptation.collection import PATIENT_COLUMN, read_labelled
from caselens.retrieval.adaptation.fit import AUTO, AdapterFit, fit_projections, labelled_mask, select_adapter
from caselens.retrieval.adaptation.folds import group_folds, group_keys
from caselens.retrieval.adaptation.scoring import precision_at_k, top_k


@dataclass
class OuterFold:
    """One evaluation fold: its queries, its archive, the adapter fitted on the archive, and each
    query's nearest archive items raw and adapted (indices into the labelled items, -1: none)."""

    fold: int
    queries: np.ndarray
    archive: np.ndarray
    fit: AdapterFit
    raw: tuple[np.ndarray, np.ndarray]  # (neighbours, similarities)
    adapted: tuple[np.ndarray, np.ndarray]
    seconds: float  # adapter selection and fit on the archive


def outer_folds(vectors: np.ndarray, labels: Sequence[str], groups: Sequence[object] | None, *, folds: int = 5,
                seed: int = 0, fold_ids: np.ndarray | None = None, method: str = AUTO, inner_folds: int = 5,
                k: int = 10, depth: int = 50, keep_neighbours: int = 0, encoder_fingerprint: str = "arrays",
                progress: Callable[[str], None] | None = None) -> Iterator[OuterFold]:
    """The evaluation folds of labelled ``vectors`` (module docstring), one at a time."""
    x = np.asarray(vectors, np.float32)
    y = np.asarray([str(v) for v in labels], dtype=object)
    keys = group_keys(groups, len(y))
    ids = group_folds(y, keys, folds, seed) if fold_ids is None else np.asarray(fold_ids)
    rows = [row.tobytes() for row in x]
    for f in sorted(set(ids.tolist())):
        queries = np.flatnonzero(ids == f)
        copies = {rows[i] for i in queries}
        archive = np.flatnonzero((ids != f) & ~np.isin(keys, keys[queries])
                                 & np.array([r not in copies for r in rows], bool))
        if progress:
            progress(f"evaluation fold {f + 1}: {len(queries)} queries, archive of {len(archive)}")
        start = time.perf_counter()
        fit = select_adapter(x[archive], y[archive], keys[archive], encoder_fingerprint=encoder_fingerprint,
                             method=method, folds=inner_folds, seed=seed, k=k, keep_neighbours=keep_neighbours)
        seconds = time.perf_counter() - start
        raw_q = x[queries] / np.maximum(np.linalg.norm(x[queries], axis=1, keepdims=True), 1e-12)
        raw_a = x[archive] / np.maximum(np.linalg.norm(x[archive], axis=1, keepdims=True), 1e-12)
        raw = top_k(raw_q, raw_a, depth, keys[queries], keys[archive])
        adapted = top_k(fit.adapter.apply(x[queries]), fit.adapter.apply(x[archive]), depth, keys[queries], keys[archive])
        to_global = lambda nb: np.where(nb >= 0, archive[np.maximum(nb, 0)], -1)  # noqa: E731
        yield OuterFold(fold=int(f), queries=queries, archive=archive, fit=fit, raw=(to_global(raw[0]), raw[1]),
                        adapted=(to_global(adapted[0]), adapted[1]), seconds=seconds)


def labelled_rows(vectors: np.ndarray, labels: Sequence[object], groups: Sequence[object] | None,
                  fold_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                                               np.ndarray | None, np.ndarray]:
    """(vectors, labels as str, groups, fold ids, mask) of the labelled rows: what the evaluations use."""
    mask = labelled_mask(labels)
    x = np.asarray(vectors, np.float32)[mask]
    y = np.asarray([str(v) for v in np.asarray(labels, dtype=object)[mask]], dtype=object)
    g = None if groups is None else np.asarray(groups, dtype=object)[mask]
    given = None if fold_ids is None else np.asarray(fold_ids)[mask]
    return x, y, g, given, mask


@dataclass
class AdaptedRetrievalEval:
    """P@k raw vs adapted, per fold and overall, and what each fold's archive chose."""

    k: int
    folds: int
    fold_protocol: str  # "patient-disjoint" or "given"
    method: str
    n_queries: int
    n_classes: int
    chance_p_at_k: float  # sum of squared class shares
    overall: dict[str, float]  # "raw", "adapted", and each method's own best ("lda", "whiten", ...)
    fold_se: dict[str, float]  # standard error over folds of the same
    per_fold: list[dict[str, Any]]
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> {"raw", "adapted", "n"}
    collection: str | None = None
    encoder: str | None = None
    label_column: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def evaluate_adaptation_arrays(vectors: np.ndarray, labels: Sequence[object], groups: Sequence[object] | None = None,
                               *, folds: int = 5, seed: int = 0, fold_ids: np.ndarray | None = None,
                               method: str = AUTO, inner_folds: int = 5, k: int = 10,
                               report_methods: Sequence[str] = ("whiten", "lda"),
                               progress: Callable[[str], None] | None = None) -> AdaptedRetrievalEval:
    """Cross-validated P@k raw vs adapted on the labelled rows of ``vectors`` (module docstring).

    ``fold_ids``: a fold number per row (labelled rows only are used) instead of patient-disjoint
    folds; ``report_methods``: also report each of these methods with the settings its own
    inner cross-validation chose (what ``--method lda`` would give)."""
    x, y, g, given, _ = labelled_rows(vectors, labels, groups, fold_ids)
    scores: dict[str, np.ndarray] = {name: np.full(len(y), np.nan) for name in ("raw", "adapted", *report_methods)}
    per_fold = []
    for of in outer_folds(x, y, g, folds=folds, seed=seed, fold_ids=given, method=method, inner_folds=inner_folds,
                          k=k, depth=k, progress=progress):
        q, a = of.queries, of.archive
        row: dict[str, Any] = {"fold": of.fold, "queries": len(q), "archive": len(a), "chosen": of.fit.report.chosen,
                               "fit_seconds": round(of.seconds, 2), "inner_cv_gain": of.fit.report.gain,
                               "inner_selection_gain": of.fit.report.selection_gain}
        for name, (nb, _) in (("raw", of.raw), ("adapted", of.adapted)):
            scores[name][q] = precision_at_k(y[q], y, nb)
            row[name] = round(float(scores[name][q].mean()), 4)
        wanted = [(m, of.fit.cv.candidates[of.fit.cv.best(m)][1]) for m in report_methods if m in
                  {mm for mm, _ in of.fit.cv.candidates.values()}]
        keys = group_keys(g, len(y))
        for proj in fit_projections(x[a], y[a], wanted):
            nb, _ = top_k(proj.apply(x[q]), proj.apply(x[a]), k, keys[q], keys[a])
            scores[proj.method][q] = precision_at_k(y[q], y[a], nb)
            row[proj.method] = round(float(scores[proj.method][q].mean()), 4)
            row[f"{proj.method}_settings"] = proj.name
        per_fold.append(row)
    overall = {n: round(float(np.nanmean(v)), 4) for n, v in scores.items() if np.isfinite(v).any()}
    fold_se = {}
    for n in overall:
        vals = [r[n] for r in per_fold if n in r]
        fold_se[n] = round(float(np.std(vals, ddof=1) / np.sqrt(len(vals))), 4) if len(vals) > 1 else 0.0
    classes, counts = np.unique(y, return_counts=True)
    per_class = {str(c): {"n": int(n), "raw": round(float(np.nanmean(scores["raw"][y == c])), 4),
                          "adapted": round(float(np.nanmean(scores["adapted"][y == c])), 4)}
                 for c, n in zip(classes, counts)}
    share = counts / counts.sum()
    return AdaptedRetrievalEval(k=k, folds=len(per_fold), fold_protocol="given" if fold_ids is not None else "patient-disjoint",
                                method=method, n_queries=len(y), n_classes=len(classes),
                                chance_p_at_k=round(float((share ** 2).sum()), 4), overall=overall, fold_se=fold_se,
                                per_fold=per_fold, per_class=per_class)


def evaluate_adapted_retrieval(collection: Collection, label_column: str = "label", folds: int = 5, *,
                               method: str = AUTO, group_column: str | None = PATIENT_COLUMN, seed: int = 0,
                               k: int = 10, inner_folds: int = 5, report_methods: Sequence[str] = ("whiten", "lda"),
                               progress: Callable[[str], None] | None = None) -> AdaptedRetrievalEval:
    """:func:`evaluate_adaptation_arrays` on ``collection``'s items labelled in ``label_column``,
    folds grouped by ``group_column`` where the collection has it (what
    ``caselens eval retrieval COLLECTION --folds 5`` reports)."""
    data = read_labelled(collection, label_column, group_column)
    result = evaluate_adaptation_arrays(data.vectors, data.labels, data.groups, folds=folds, seed=seed, method=method,
                                        inner_folds=inner_folds, k=k, report_methods=report_methods, progress=progress)
    result.collection = collection.name
    result.encoder = str(collection.encoder.get("spec"))
    result.label_column = label_column
    return result

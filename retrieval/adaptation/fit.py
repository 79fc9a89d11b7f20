"""Fitting an adapter on a labelled archive, the method and its settings chosen by cross-validation.

``fit_adapter(vectors, labels, groups, method="auto")``:

1. the labelled items are split into patient-disjoint folds (:func:`~.folds.group_folds`);
2. for each fold, every candidate (each method with each of its settings, see :data:`GRIDS`) is
   fitted on the other folds and scores the fold's items as queries against them: P@k by exact
   cosine, items of the query's own patient never ranked;
3. the candidate with the best mean P@k is fitted on all labelled items; with ``method="auto"``,
   the raw vectors are kept unless choosing pays: the candidate that the other folds choose,
   scored on each fold (:meth:`CrossValidation.selection_gains`, free of the optimism of a
   maximum over many candidates), must beat raw by at least ``max(min_gain, SELECTION_SE standard errors)``
   (so labels that carry nothing, or an archive too small to tell, leave the vectors alone).

Unlabelled items take no part in the fit; the adapter projects them like any other vector.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from caselens.errors import AdaptationError
from caselens.indexes.adapter import Adapter
from caselens.retrieval.adaptation.folds import group_folds, group_keys
from caselens.retrieval.adaptation.linear import Basis, Projection, candidate_name, decompose, lda_grid, whiten_grid
from caselens.retrieval.adaptation.metric import metric_grid
from caselens.retrieval.adaptation.scoring import precision_at_k, top_k

# The settings each method is tried with. LDA's shrinkage, PCA pre-reduction and offset, and the
# whitening's dimensions, are all chosen by cross-validation, never fixed to a data set.
GRIDS: dict[str, list[dict[str, Any]]] = {
    "raw": [{}],
    "whiten": [{"dims": d, "eps": 0.01} for d in (32, 64, 128, 256)],
    "lda": [{"shrinkage": a, "dims": p, "offset": o, "power_weight": g}
            for a in (0.003, 0.01, 0.03, 0.1, 0.2, 0.35, 0.5, 0.7) for p in ("all", 256) for o in (0.0, 1.0)
            for g in (0.0, 0.5, 1.0)],
    "metric": [{"weight_decay": wd} for wd in (0.3, 3.0)],
}
METHODS = tuple(GRIDS)
AUTO = "auto"
SELECTION_SE = 1.0  # auto adapts only when choosing gains this many standard errors (and min_gain) over raw
AUTO_METHODS = ("raw", "whiten", "lda")  # what auto tries: "metric" costs ~100x an LDA fit and has not
# beaten LDA on the shared sets (docs/adaptation.md); ask for it by name


def _check_method(method: str) -> list[str]:
    if method == AUTO:
        return list(AUTO_METHODS)
    if method not in GRIDS:
        raise AdaptationError(f"unknown adapter method {method!r}; choose auto or one of {', '.join(METHODS)}")
    return ["raw", method] if method != "raw" else ["raw"]


def fit_projections(vectors: np.ndarray, labels: np.ndarray, candidates: Sequence[tuple[str, dict[str, Any]]],
                    basis: Basis | None = None) -> list[Projection]:
    """Fit each (method, params) of ``candidates`` on the labelled ``vectors`` (one shared PCA,
    computed here unless ``basis`` is given)."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for method, params in candidates:
        by_method.setdefault(method, []).append(params)
    x = np.asarray(vectors, np.float32)
    if basis is None and set(by_method) - {"raw"}:
        basis = decompose(x)
    out: list[Projection] = []
    for method, grid in by_method.items():
        if method == "raw":
            out.append(Projection("raw", {}))
        elif method == "whiten":
            out.extend(whiten_grid(basis, grid))
        elif method == "lda":
            out.extend(lda_grid(basis, labels, grid))
        elif method == "metric":
            out.extend(metric_grid(basis, labels, grid))
        else:
            raise AdaptationError(f"unknown adapter method {method!r}")
    return out


@dataclass
class CrossValidation:
    """P@k of every candidate in every fold (queries: that fold; archive: the other folds)."""

    k: int
    folds: int
    candidates: dict[str, tuple[str, dict[str, Any]]]  # name -> (method, params)
    fold_scores: dict[str, list[float]]  # name -> mean P@k per fold
    query_scores: dict[str, np.ndarray] = field(repr=False, default_factory=dict)  # name -> P@k per item (fold order)

    def mean(self, name: str) -> float:
        """Mean P@k over all queries (each item scored once)."""
        return float(np.mean(self.query_scores[name]))

    def best(self, method: str | None = None) -> str:
        """Name of the candidate with the highest mean P@k (of one method, when given)."""
        names = [n for n, (m, _) in self.candidates.items() if method is None or m == method]
        return max(names, key=lambda n: (self.mean(n), -len(n)))

    def gain(self, name: str, over: str = "raw") -> tuple[float, float]:
        """(mean gain of ``name`` over ``over`` in P@k, standard error of the per-fold gains)."""
        g = np.asarray(self.fold_scores[name]) - np.asarray(self.fold_scores[over])
        se = float(g.std(ddof=1) / np.sqrt(len(g))) if len(g) > 1 else float("inf")
        return self.mean(name) - self.mean(over), se

    def choices_without_each_fold(self, names: Sequence[str]) -> list[str]:
        """For each fold (in order), the candidate of ``names`` with the best mean P@k over the
        *other* folds: what choosing by cross-validation would pick without that fold's items."""
        scores = np.array([self.fold_scores[n] for n in names])
        return [names[int(np.argmax(np.delete(scores, f, axis=1).mean(1)))] for f in range(scores.shape[1])]

    def selection_gains(self, method: str | None = None, over: str = "raw") -> np.ndarray:
        """Per fold: the P@k gain over ``over`` of the candidate (of ``method``, when given) that the
        *other* folds' scores choose, on this fold. The maximum over many candidates is biased
        upwards (with labels that carry nothing, some candidate still beats raw by chance); this
        estimate of the whole choose-then-fit procedure is not, and costs no further fit."""
        names = [n for n, (m, _) in self.candidates.items() if method is None or m == method]
        base = np.asarray(self.fold_scores[over])
        return np.array([self.fold_scores[name][f] - base[f] for f, name in enumerate(self.choices_without_each_fold(names))])

    def table(self) -> dict[str, float]:
        """Mean P@k per candidate, rounded (for reports and the stored provenance)."""
        return {n: round(self.mean(n), 4) for n in sorted(self.candidates, key=lambda n: -self.mean(n))}


def cross_validate(vectors: np.ndarray, labels: np.ndarray, groups: np.ndarray | None, folds: np.ndarray,
                   methods: Sequence[str] = AUTO_METHODS, grids: dict[str, list[dict[str, Any]]] | None = None,
                   k: int = 10, progress: Callable[[str], None] | None = None) -> CrossValidation:
    """Score every candidate of ``methods`` (settings from ``grids``, default :data:`GRIDS`) by
    P@k with the given fold numbers (labelled items only)."""
    grids = {**GRIDS, **(grids or {})}
    x = np.asarray(vectors, np.float32)
    labels = np.asarray(labels, dtype=object)
    keys = group_keys(groups, len(labels))
    wanted = [(m, p) for m in methods for p in grids[m]]
    names = {candidate_name(m, p): (m, p) for m, p in wanted}
    fold_ids = sorted(set(np.asarray(folds).tolist()))
    fold_scores: dict[str, list[float]] = {n: [] for n in names}
    per_query: dict[str, np.ndarray] = {n: np.zeros(len(labels)) for n in names}
    for f in fold_ids:
        test = np.asarray(folds) == f
        train = ~test
        if progress:
            progress(f"fold {f + 1}/{len(fold_ids)}: fitting {len(names)} candidates on {int(train.sum())} items")
        basis = decompose(x[train]) if any(m != "raw" for m, _ in wanted) else None
        coords_q = None if basis is None else (x[test] - basis.mean) @ basis.directions
        for proj in fit_projections(x[train], labels[train], wanted, basis):
            if proj.in_basis is not None:
                zq, za = proj.apply_coords(coords_q), proj.apply_coords(basis.coords)
            else:
                zq, za = proj.apply(x[test]), proj.apply(x[train])
            nb, _ = top_k(zq, za, k, keys[test], keys[train])
            p = precision_at_k(labels[test], labels[train], nb)
            fold_scores[proj.name].append(float(p.mean()))
            per_query[proj.name][test] = p
    return CrossValidation(k=k, folds=len(fold_ids), candidates=names, fold_scores=fold_scores, query_scores=per_query)


def out_of_fold_neighbours(vectors: np.ndarray, labels: np.ndarray, groups: np.ndarray, folds: np.ndarray,
                           cv: CrossValidation, names: Sequence[str], depth: int
                           ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Each item's ``depth`` nearest items of the other folds (indices, -1: none; similarities),
    in the space of the candidate that the other folds' scores choose among ``names``: the honest
    out-of-fold picture of choosing then fitting (what a query meets), for fitting diagnosis."""
    x = np.asarray(vectors, np.float32)
    keys = group_keys(groups, len(labels))
    fold_ids = sorted(set(np.asarray(folds).tolist()))
    choices = cv.choices_without_each_fold(list(names)) if len(names) > 1 else [names[0]] * len(fold_ids)
    nb_all = np.full((len(x), depth), -1, np.int64)
    sims_all = np.full((len(x), depth), -np.inf, np.float32)
    for f, name in zip(fold_ids, choices):
        test = np.asarray(folds) == f
        train = ~test
        proj = fit_projections(x[train], labels[train], [cv.candidates[name]])[0]
        nb, sims = top_k(proj.apply(x[test]), proj.apply(x[train]), depth, keys[test], keys[train])
        train_index = np.flatnonzero(train)
        nb_all[test] = np.where(nb >= 0, train_index[np.maximum(nb, 0)], -1)
        sims_all[test] = sims
    return nb_all, sims_all, choices


@dataclass
class AdapterReport:
    """How an adapter was chosen: every candidate's cross-validated P@k and the decision."""

    method: str  # the method asked for ("auto", "lda", ...)
    chosen: str  # the candidate fitted ("raw", "lda(dims=all,offset=1.0,shrinkage=0.2)", ...)
    chosen_method: str
    chosen_params: dict[str, Any]
    cv_p_at_k: dict[str, float]  # candidate -> mean P@k over the folds, best first
    raw_p_at_k: float
    chosen_p_at_k: float
    gain: float  # chosen minus raw (cross-validated; the best of many, so optimistic)
    gain_se: float  # standard error of the per-fold gain
    selection_gain: float  # gain of choosing by cross-validation, scored on folds the choice did not see
    selection_gain_se: float
    decision: str  # one sentence: why this candidate
    k: int
    folds: int
    seed: int
    n_items: int  # vectors given (labelled or not)
    n_labelled: int
    n_classes: int
    n_groups: int  # patients among the labelled items (items without a patient count alone)
    fit_seconds: float  # cross-validation + final fit

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def labelled_mask(labels: Sequence[object]) -> np.ndarray:
    """True where an item has a label (not None, NaN or empty)."""
    return np.array([not (v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == "")
                     for v in labels], bool)


@dataclass
class AdapterFit:
    """Everything a fit produced: the adapter, its report, and the cross-validation behind it
    (with the labelled items it ran on), which diagnosis fitting reuses."""

    adapter: Adapter
    report: AdapterReport
    cv: CrossValidation
    labelled: np.ndarray  # mask over the vectors given: the items the fit used
    labels: np.ndarray  # labels of those items (str)
    groups: np.ndarray  # patient keys of those items
    folds: np.ndarray  # fold number of those items
    # with keep_neighbours: out_of_fold_neighbours() of the labelled items for the chosen method
    neighbours: tuple[np.ndarray, np.ndarray] | None = None
    neighbour_choices: list[str] = field(default_factory=list)


def select_adapter(vectors: np.ndarray, labels: Sequence[object], groups: Sequence[object] | None = None, *,
                   encoder_fingerprint: str, method: str = AUTO, folds: int = 5, seed: int = 0, k: int = 10,
                   min_gain: float = 0.02, grids: dict[str, list[dict[str, Any]]] | None = None,
                   provenance: dict[str, Any] | None = None, keep_neighbours: int = 0,
                   progress: Callable[[str], None] | None = None) -> AdapterFit:
    """:func:`fit_adapter`, returning the cross-validation too (see :class:`AdapterFit`)."""
    start = time.perf_counter()
    methods = _check_method(method)
    x = np.asarray(vectors, np.float32)
    if x.ndim != 2 or len(x) != len(labels):
        raise AdaptationError(f"need one label per vector: {len(labels)} labels for vectors of shape {x.shape}")
    if not np.isfinite(x).all():
        raise AdaptationError("vectors hold NaN or infinite values; an adapter cannot be fitted on them")
    mask = labelled_mask(labels)
    y = np.array([str(v) for v in np.asarray(labels, dtype=object)[mask]], dtype=object)
    g = group_keys(None if groups is None else np.asarray(groups, dtype=object)[mask], int(mask.sum()))
    classes = np.unique(y) if len(y) else np.array([])
    if len(classes) < 2:
        raise AdaptationError(f"an adapter needs labelled items of at least two classes; found {len(y)} labelled "
                              f"item(s) of {len(classes)} class(es): label more items or check the label column")
    fold_ids = group_folds(y, g, folds, seed)
    cv = cross_validate(x[mask], y, g, fold_ids, methods, grids, k, progress)
    raw_score = cv.mean("raw")
    best = cv.best(None if method == AUTO else method) if method != "raw" else "raw"
    gain, se = cv.gain(best)
    chosen = best
    honest = cv.selection_gains()
    honest_gain = float(honest.mean())
    honest_se = float(honest.std(ddof=1) / np.sqrt(len(honest))) if len(honest) > 1 else float("inf")
    if method == AUTO and best != "raw":
        needed = max(min_gain, SELECTION_SE * honest_se)
        if honest_gain < needed:
            chosen = "raw"
            decision = (f"kept the raw vectors: choosing by cross-validation gained {honest_gain:+.4f} P@{k} over "
                        f"raw (best candidate {best}: {gain:+.4f}), less than the {needed:.4f} required "
                        f"(max of {min_gain} and {SELECTION_SE:g} standard errors)")
        else:
            decision = (f"{best}: best of {len(cv.candidates)} candidates, {gain:+.4f} P@{k} over raw; choosing "
                        f"by cross-validation gained {honest_gain:+.4f} (standard error {honest_se:.4f})")
    elif best == "raw":
        decision = "raw vectors asked for" if method == "raw" else "raw vectors scored best"
    else:
        decision = f"best settings of {method} by cross-validation ({gain:+.4f} P@{k} over raw)"
    m, params = cv.candidates[chosen]
    if progress:
        progress(f"fitting {chosen} on {len(y)} labelled items")
    proj = fit_projections(x[mask], y, [(m, params)])[0]
    report = AdapterReport(
        method=method, chosen=chosen, chosen_method=m, chosen_params=params, cv_p_at_k=cv.table(),
        raw_p_at_k=round(raw_score, 4), chosen_p_at_k=round(cv.mean(chosen), 4),
        gain=round(cv.mean(chosen) - raw_score, 4), gain_se=round(cv.gain(chosen)[1], 4) if chosen != "raw" else 0.0,
        selection_gain=round(honest_gain, 4), selection_gain_se=round(honest_se, 4),
        decision=decision, k=k, folds=folds, seed=seed, n_items=len(x), n_labelled=int(mask.sum()),
        n_classes=len(classes), n_groups=len(np.unique(g)), fit_seconds=round(time.perf_counter() - start, 3))
    record = {**(provenance or {}), **report.to_dict(),
              "fitted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if m == "raw":
        adapter = Adapter.identity(encoder_fingerprint, x.shape[1], provenance=record)
    else:
        adapter = Adapter(method=m, encoder_fingerprint=encoder_fingerprint, in_dim=x.shape[1], mean=proj.mean,
                          matrix=proj.matrix, bias=proj.bias, power=proj.power, provenance=record)
    fit = AdapterFit(adapter=adapter, report=report, cv=cv, labelled=mask, labels=y, groups=g, folds=fold_ids)
    if keep_neighbours:
        if chosen == "raw":
            names = ["raw"]
        else:
            names = [n for n, (mm, _) in cv.candidates.items() if mm != "raw" and (method == AUTO or mm == method)]
        if progress:
            progress(f"out-of-fold neighbours of {len(y)} items for diagnosis")
        nb, sims, choices = out_of_fold_neighbours(x[mask], y, g, fold_ids, cv, names, keep_neighbours)
        fit.neighbours, fit.neighbour_choices = (nb, sims), choices
    return fit


def fit_adapter(vectors: np.ndarray, labels: Sequence[object], groups: Sequence[object] | None = None, *,
                encoder_fingerprint: str, method: str = AUTO, folds: int = 5, seed: int = 0, k: int = 10,
                min_gain: float = 0.02, grids: dict[str, list[dict[str, Any]]] | None = None,
                provenance: dict[str, Any] | None = None,
                progress: Callable[[str], None] | None = None) -> tuple[Adapter, AdapterReport]:
    """Fit an adapter on the labelled rows of ``vectors`` (see the module docstring).

    ``labels``: one per row, None/"" for unlabelled rows; ``groups``: patient per row (None: every
    item its own patient). ``method``: ``auto`` (tries :data:`AUTO_METHODS`) or one of
    :data:`METHODS` (its settings still chosen by cross-validation; ``raw`` keeps the vectors).
    ``k``: the P@k that chooses. Returns the adapter (its provenance holds the report and
    ``provenance``) and the report. Raises :class:`~caselens.errors.AdaptationError` when the
    labelled items cannot be split (fewer than two classes, fewer patients than folds)."""
    fit = select_adapter(vectors, labels, groups, encoder_fingerprint=encoder_fingerprint, method=method, folds=folds,
                         seed=seed, k=k, min_gain=min_gain, grids=grids, provenance=provenance, progress=progress)
    return fit.adapter, fit.report

"""Calibration of class probabilities and the numbers that judge it.

Calibrators map a probability matrix (items x classes) to another, fitted on out-of-fold
predictions of the archive:

``none``         probabilities as they are;
``temperature``  ``p ** (1 / t)`` renormalised (one parameter, keeps the ranking of classes);
``platt``        the top-label confidence ``c`` becomes ``sigmoid(a * logit(c) + b)``;
``isotonic``     the top-label confidence becomes a non-decreasing step function of ``c``
                 (pool-adjacent-violators), fitted to whether the top label was right.

The two top-label calibrators rescale the other classes to share the rest, never above the
top one, so the predicted label never changes. Metrics: expected calibration error (equal-width
bins of the top-label confidence), negative log-likelihood, macro one-vs-rest ROC AUC (rank
statistic), Brier score, coverage and accuracy at confidence thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from caselens.errors import AdaptationError

CALIBRATORS = ("none", "temperature", "platt", "isotonic")
ECE_BINS = 15
EPS = 1e-6


# ------------------------------------------------------------------------------------------ metrics
def expected_calibration_error(probs: np.ndarray, truth: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of the top-label confidence: sum over equal-width bins of |accuracy - confidence|,
    weighted by the share of items in the bin."""
    probs = np.asarray(probs, np.float64)
    if len(probs) == 0:
        return float("nan")
    conf = probs.max(1)
    correct = probs.argmax(1) == np.asarray(truth)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


def reliability(probs: np.ndarray, truth: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per confidence bin: its range, item count, mean confidence and accuracy (for the diagram)."""
    conf = np.asarray(probs).max(1)
    correct = np.asarray(probs).argmax(1) == np.asarray(truth)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        sel = which == b
        out.append({"low": b / bins, "high": (b + 1) / bins, "n": int(sel.sum()),
                    "confidence": float(conf[sel].mean()) if sel.any() else None,
                    "accuracy": float(correct[sel].mean()) if sel.any() else None})
    return out


def log_loss(probs: np.ndarray, truth: np.ndarray) -> float:
    """Mean negative log-probability of the true class (probabilities floored at 1e-6)."""
    p = np.asarray(probs, np.float64)[np.arange(len(truth)), np.asarray(truth)]
    return float(-np.log(np.maximum(p, EPS)).mean())


def brier(probs: np.ndarray, truth: np.ndarray) -> float:
    """Mean squared distance between the probability vectors and the one-hot truth (a proper
    score: lowest for calibrated, sharp probabilities)."""
    p = np.asarray(probs, np.float64)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(p)), np.asarray(truth)] = 1.0
    return float(((p - onehot) ** 2).sum(1).mean())


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney statistic, ties counted half); None when one
    of the two groups is empty."""
    scores = np.asarray(scores, np.float64)
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks of ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) at every distinct score threshold."""
    scores = np.asarray(scores, np.float64)
    positive = np.asarray(positive, bool)
    order = np.argsort(-scores, kind="mergesort")
    s, p = scores[order], positive[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(p)[distinct]
    fps = np.cumsum(~p)[distinct]
    tpr = np.r_[0.0, tps / max(1, p.sum())]
    fpr = np.r_[0.0, fps / max(1, (~p).sum())]
    return fpr, tpr


def macro_auc(probs: np.ndarray, truth: np.ndarray) -> tuple[float | None, dict[int, float | None]]:
    """(mean over classes with both positives and negatives, per class) of one-vs-rest ROC AUC."""
    per = {c: roc_auc(np.asarray(probs)[:, c], np.asarray(truth) == c) for c in range(np.asarray(probs).shape[1])}
    vals = [v for v in per.values() if v is not None]
    return (float(np.mean(vals)) if vals else None), per


def coverage_curve(confidence: np.ndarray, correct: np.ndarray,
                   thresholds: Sequence[float] = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)) -> list[dict[str, Any]]:
    """For each threshold: the share of items answered (confidence >= threshold) and the
    accuracy on them (None when nothing is answered)."""
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, bool)
    out = []
    for t in thresholds:
        sel = confidence >= t
        out.append({"threshold": float(t), "coverage": float(sel.mean()) if len(sel) else 0.0,
                    "accuracy": float(correct[sel].mean()) if sel.any() else None, "answered": int(sel.sum())})
    return out


def threshold_for_precision(confidence: np.ndarray, correct: np.ndarray, precision: float,
                            min_answered: int = 5) -> tuple[float | None, float]:
    """(lowest confidence threshold whose answered items reach ``precision`` accuracy, the share
    answered there); (None, 0.0) when no threshold with at least ``min_answered`` answers does."""
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, bool)
    order = np.argsort(-confidence, kind="mergesort")
    c, ok = confidence[order], correct[order]
    ends = np.r_[np.flatnonzero(np.diff(c)), len(c) - 1]  # answer everything >= c[end]
    acc = np.cumsum(ok)[ends] / (ends + 1)
    good = np.flatnonzero((acc >= precision) & (ends + 1 >= min_answered))
    if len(good) == 0:
        return None, 0.0
    last = good[-1]
    return float(c[ends[last]]), float((ends[last] + 1) / len(c))


# ------------------------------------------------------------------------------------- calibrators
def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p / (1 - p))


def with_top(probs: np.ndarray, top: np.ndarray) -> np.ndarray:
    """``probs`` with each row's top-label probability replaced by ``top`` (at least 1/C) and the
    other classes rescaled to share the rest, none above the top one."""
    probs = np.asarray(probs, np.float64)
    n, c = probs.shape
    arg = probs.argmax(1)
    top = np.clip(np.asarray(top, np.float64), 1.0 / c, 1.0)
    out = np.empty_like(probs)
    for i in range(n):
        rest = probs[i].copy()
        rest[arg[i]] = 0.0
        mass = 1.0 - top[i]
        if rest.sum() <= 0:
            rest = np.ones(c)
            rest[arg[i]] = 0.0
        rest = rest / rest.sum() * mass
        for _ in range(c):  # water-filling: cap at the top value, give the excess to the others
            over = rest > top[i] + 1e-12
            if not over.any():
                break
            excess = float((rest[over] - top[i]).sum())
            rest[over] = top[i]
            free = (~over) & (np.arange(c) != arg[i]) & (rest < top[i])
            if not free.any():
                break
            rest[free] += excess * rest[free] / max(rest[free].sum(), 1e-12) if rest[free].sum() > 0 else excess / free.sum()
        rest[arg[i]] = 0.0
        rest *= (1.0 - 1e-9)  # capped classes a hair below the top one: the label never changes
        rest[arg[i]] = 1.0 - rest.sum()
        out[i] = rest
    return out


def _pav(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Isotonic (non-decreasing) fit of y on x by pool-adjacent-violators: (block upper x, value)."""
    order = np.argsort(x, kind="mergesort")
    xs, ys = x[order], y[order].astype(np.float64)
    vals: list[float] = []
    weights: list[float] = []
    highs: list[float] = []
    for xi, yi in zip(xs, ys):
        vals.append(yi)
        weights.append(1.0)
        highs.append(xi)
        while len(vals) > 1 and vals[-2] >= vals[-1]:
            w = weights[-2] + weights[-1]
            v = (vals[-2] * weights[-2] + vals[-1] * weights[-1]) / w
            vals[-2:] = [v]
            weights[-2:] = [w]
            highs[-2:] = [highs[-1]]
    return np.asarray(highs), np.asarray(vals)


@dataclass(frozen=True)
class Calibrator:
    """A fitted calibrator (see module docstring); JSON-able through :meth:`to_dict`."""

    kind: str = "none"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in CALIBRATORS:
            raise AdaptationError(f"unknown calibrator {self.kind!r}; choose one of {', '.join(CALIBRATORS)}")

    def apply(self, probs: np.ndarray) -> np.ndarray:
        probs = np.asarray(probs, np.float64)
        if self.kind == "none" or len(probs) == 0:
            return probs
        if self.kind == "temperature":
            logp = np.log(np.maximum(probs, EPS)) / float(self.params["t"])
            logp -= logp.max(1, keepdims=True)
            p = np.exp(logp)
            return p / p.sum(1, keepdims=True)
        conf = probs.max(1)
        if self.kind == "platt":
            top = 0.5 * (1.0 + np.tanh(0.5 * (self.params["a"] * _logit(conf) + self.params["b"])))
        else:  # isotonic: step function through the block values, by the blocks' upper edges
            highs, vals = np.asarray(self.params["x"]), np.asarray(self.params["y"])
            top = vals[np.minimum(np.searchsorted(highs, conf, side="left"), len(vals) - 1)]
        return with_top(probs, top)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "params": self.params}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibrator":
        return cls(kind=data.get("kind", "none"), params=dict(data.get("params") or {}))


def fit_calibrator(kind: str, probs: np.ndarray, truth: np.ndarray) -> Calibrator:
    """Fit a calibrator of ``kind`` to probabilities ``probs`` whose true classes are ``truth``."""
    probs = np.asarray(probs, np.float64)
    truth = np.asarray(truth)
    if kind == "none":
        return Calibrator()
    if kind == "temperature":
        grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 61))
        losses = [log_loss(Calibrator("temperature", {"t": float(t)}).apply(probs), truth) for t in grid]
        i = int(np.argmin(losses))
        lo, hi = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
        fine = np.exp(np.linspace(np.log(lo), np.log(hi), 21))
        losses = [log_loss(Calibrator("temperature", {"t": float(t)}).apply(probs), truth) for t in fine]
        return Calibrator("temperature", {"t": float(fine[int(np.argmin(losses))])})
    conf = probs.max(1)
    correct = (probs.argmax(1) == truth).astype(np.float64)
    if kind == "platt":
        x = _logit(conf)

        def loss(a: float, b: float) -> float:
            z = a * x + b
            return float(np.logaddexp(0.0, z).sum() - (correct * z).sum() + 0.5e-3 * ((a - 1) ** 2 + b ** 2))

        a, b = 1.0, 0.0
        current = loss(a, b)
        for _ in range(100):  # Newton steps on the logistic log-likelihood, halved until it improves
            p = 0.5 * (1.0 + np.tanh(0.5 * (a * x + b)))
            g = np.array([((p - correct) * x).sum() + 1e-3 * (a - 1), (p - correct).sum() + 1e-3 * b])
            w = p * (1 - p)
            h = np.array([[(w * x * x).sum() + 1e-3, (w * x).sum()], [(w * x).sum(), w.sum() + 1e-3]])
            step = np.linalg.solve(h, g)
            scale = 1.0
            while scale > 1e-6 and loss(a - scale * step[0], b - scale * step[1]) > current:
                scale /= 2
            if scale <= 1e-6:
                break
            a, b = a - scale * step[0], b - scale * step[1]
            new = loss(a, b)
            if current - new < 1e-10:
                break
            current = new
        return Calibrator("platt", {"a": float(a), "b": float(b)})
    if kind == "isotonic":
        highs, vals = _pav(conf, correct)
        return Calibrator("isotonic", {"x": highs.round(6).tolist(), "y": vals.round(6).tolist()})
    raise AdaptationError(f"unknown calibrator {kind!r}; choose one of {', '.join(CALIBRATORS)}")


def choose_calibrator(probs: np.ndarray, truth: np.ndarray, folds: np.ndarray, kinds: Sequence[str] = CALIBRATORS,
                      ) -> tuple[Calibrator, dict[str, dict[str, float]], dict[str, np.ndarray]]:
    """The calibrator of ``kinds`` with the lowest cross-validated Brier score on (``probs``,
    ``truth``): each fitted on the other folds and applied to each fold's items (ties within 0.001
    go to the simpler one, in ``kinds`` order), refitted on everything. The Brier score, a proper
    score, is chosen by rather than the 15-bin ECE, which is too noisy on a few hundred items to
    choose by (an isotonic map that fits the folds' noise wins on it); both are reported.

    Returns the calibrator, every kind's cross-validated Brier score, ECE and log-loss, and every
    kind's out-of-fold calibrated probabilities."""
    probs = np.asarray(probs, np.float64)
    truth = np.asarray(truth)
    folds = np.asarray(folds)
    scores: dict[str, dict[str, float]] = {}
    oof: dict[str, np.ndarray] = {}
    for kind in kinds:
        out = np.empty_like(probs)
        for f in np.unique(folds):
            test = folds == f
            out[test] = fit_calibrator(kind, probs[~test], truth[~test]).apply(probs[test])
        oof[kind] = out
        scores[kind] = {"brier": round(brier(out, truth), 5), "ece": round(expected_calibration_error(out, truth), 5),
                        "log_loss": round(log_loss(out, truth), 5)}
    lowest = min(scores[k]["brier"] for k in kinds)
    best = next(k for k in kinds if scores[k]["brier"] <= lowest + 0.001)
    return fit_calibrator(best, probs, truth), scores, oof

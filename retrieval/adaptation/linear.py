"""Closed-form projections fitted on labelled vectors: PCA whitening and shrinkage LDA.

All of them start from one eigendecomposition of the archive's total scatter (:func:`decompose`,
in the smaller of the sample and feature spaces), so a whole grid of settings costs about one fit:

``whiten``  PCA whitening: the top ``dims`` principal directions, each divided by its standard
            deviation plus ``eps`` times the largest one (unsupervised; labels are not used).
``lda``     regularised (shrinkage) linear discriminant analysis, optionally after PCA to ``dims``
            dimensions: the within-class scatter ``Sw`` is shrunk to
            ``(1 - shrinkage) Sw + shrinkage * mean-eigenvalue * I``, and the ``C - 1`` directions
            that separate the class means most, relative to it, are kept, each scaled to unit
            within-class variance. ``offset`` appends a constant coordinate (that many times the
            projected vectors' RMS norm) so that the cosine of the unit vectors ranks nearly like
            Euclidean distance in the discriminant space (with two classes, LDA keeps one
            dimension, where cosine alone only tells the side).

A :class:`Projection` is the (mean, matrix, bias) triple of :class:`~caselens.indexes.adapter.Adapter`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from caselens.indexes.adapter import project


@dataclass(frozen=True)
class Projection:
    """One fitted projection and the settings it was fitted with."""

    method: str
    params: dict[str, Any]
    mean: np.ndarray | None = None
    matrix: np.ndarray | None = None
    bias: np.ndarray | None = None
    power: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)  # facts for the report (e.g. kept dimensions)
    # the same map on the archive's principal coordinates (the first rows of it), when it is one:
    # cross-validation projects every candidate from coordinates computed once per fold
    in_basis: np.ndarray | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return candidate_name(self.method, self.params)

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        return project(vectors, self.mean, self.matrix, self.bias, self.power)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """:meth:`apply` for vectors given by their principal coordinates in the fitting basis."""
        if self.in_basis is None:
            raise ValueError(f"{self.name} has no principal-coordinate form")
        return project(coords[:, :self.in_basis.shape[0]], None, self.in_basis, self.bias)


def candidate_name(method: str, params: dict[str, Any]) -> str:
    """``method(k=v,...)``: how a method and its settings are named in reports."""
    if not params:
        return method
    return f"{method}(" + ",".join(f"{k}={v}" for k, v in sorted(params.items())) + ")"


@dataclass
class Basis:
    """PCA of an archive: mean, principal directions (d x r), variances (r), coordinates (n x r)."""

    mean: np.ndarray
    directions: np.ndarray
    variances: np.ndarray
    coords: np.ndarray


def decompose(vectors: np.ndarray, max_rank: int | None = None) -> Basis:
    """PCA of ``vectors`` through the eigendecomposition of the smaller of X Xᵀ and Xᵀ X (products
    in float32, the eigendecomposition in float64); components with less than 1e-6 of the largest
    variance are dropped (below float32 precision, and noise to any whitening)."""
    x = np.asarray(vectors, np.float32)
    mean = x.astype(np.float64).mean(0)
    xc = x - mean.astype(np.float32)
    n, d = xc.shape
    if d <= n:
        ev, vecs = np.linalg.eigh((xc.T @ xc).astype(np.float64))
        ev, vecs = ev[::-1], vecs[:, ::-1]
        keep = ev > max(ev[0], 1e-30) * 1e-6
        ev, directions = ev[keep], vecs[:, keep]
        coords = (xc @ directions.astype(np.float32)).astype(np.float64)
    else:
        ev, vecs = np.linalg.eigh((xc @ xc.T).astype(np.float64))
        ev, vecs = ev[::-1], vecs[:, ::-1]
        keep = ev > max(ev[0], 1e-30) * 1e-6
        ev, vecs = ev[keep], vecs[:, keep]
        s = np.sqrt(ev)
        directions = (xc.T @ (vecs / s).astype(np.float32)).astype(np.float64)
        coords = vecs * s
    if max_rank is not None and len(ev) > max_rank:
        directions, coords, ev = directions[:, :max_rank], coords[:, :max_rank], ev[:max_rank]
    return Basis(mean=mean, directions=directions, variances=ev / n, coords=coords)


def whiten_grid(basis: Basis, grid: list[dict[str, Any]]) -> list[Projection]:
    """PCA whitening for each {dims, eps} of ``grid``."""
    out = []
    std = np.sqrt(basis.variances)
    for params in grid:
        p = min(int(params["dims"]), len(std))
        scale = std[:p] + float(params.get("eps", 0.01)) * std[0]
        matrix = basis.directions[:, :p] / scale
        out.append(Projection("whiten", dict(params), basis.mean.astype(np.float32), matrix.astype(np.float32),
                              extra={"out_dim": p}, in_basis=np.diag(1.0 / scale).astype(np.float32)))
    return out


def lda_grid(basis: Basis, labels: np.ndarray, grid: list[dict[str, Any]]) -> list[Projection]:
    """Shrinkage LDA for each {shrinkage, dims ("all" or a number), offset, power_weight} of ``grid``.

    In principal coordinates the total scatter is diagonal (``D``) and the within-class scatter
    is ``D - B Bᵀ`` (``B``: class means scaled by the square root of the class shares), so the
    shrunk problem ``Sb v = λ ((1 - a) Sw + a t I) v`` has the eigenvectors of ``B Bᵀ v = μ D_a v``
    with ``D_a = (1 - a) D + a t I`` diagonal: one SVD of a dims x classes matrix per setting, no
    further eigendecomposition. Directions are scaled to unit within-class variance, then by
    their discriminant power ``λ ** power_weight`` (0: all equal)."""
    classes, y = np.unique(np.asarray(labels, dtype=object).astype(str), return_inverse=True)
    n_classes = len(classes)
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    n = len(y)
    out: list[Projection] = []
    for params in grid:
        p = len(basis.variances) if params.get("dims") in (None, "all") else min(int(params["dims"]), len(basis.variances))
        z = basis.coords[:, :p]  # centred: the mean of z is 0
        var = basis.variances[:p]
        means = np.zeros((n_classes, p))
        np.add.at(means, y, z)
        means /= counts[:, None]
        b = means.T * np.sqrt(counts / n)  # p x C: Sb = b bᵀ
        target = max(float(var.sum() - (b ** 2).sum()) / p, 1e-12 * float(var.max()))  # mean eigenvalue of Sw
        keep = max(1, min(n_classes - 1, p))
        a = float(params["shrinkage"])
        da = np.maximum((1.0 - a) * var + a * target, 1e-12 * target)
        u, sv, _ = np.linalg.svd(b / np.sqrt(da)[:, None], full_matrices=False)
        mu = sv[:keep] ** 2
        within = np.maximum(1.0 - (1.0 - a) * mu, 1e-9)
        power = mu / within  # between / within-class variance along each direction
        w_p = u[:, :keep] / np.sqrt(da)[:, None] / np.sqrt(within)
        gamma = float(params.get("power_weight", 0.0))
        if gamma:
            w_p = w_p * (power / power.max()) ** gamma
        bias = None
        offset = float(params.get("offset", 0.0))
        if offset > 0:
            rms = float(np.sqrt(((z @ w_p) ** 2).sum(1).mean()))
            w_p = np.hstack([w_p, np.zeros((p, 1))])
            bias = np.zeros(w_p.shape[1])
            bias[-1] = offset * rms
        matrix = basis.directions[:, :p] @ w_p
        out.append(Projection("lda", dict(params), basis.mean.astype(np.float32), matrix.astype(np.float32),
                              None if bias is None else bias.astype(np.float32),
                              extra={"out_dim": int(matrix.shape[1]), "discriminant_power": power.round(4).tolist()},
                              in_basis=w_p.astype(np.float32)))
    return out

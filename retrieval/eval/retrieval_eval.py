"""Leave-one-out image-to-image retrieval evaluation over a labelled collection.

Every labelled item queries the rest of the collection (itself excluded, and with
``exclude_same`` every item sharing its value in that column, e.g. its patient). Ranking is exact
(cosine over all stored vectors), so the numbers measure the encoder, not the ANN index.

Metrics, overall (mean over queries) and per class (mean over that class's queries):
  P@1, P@k      fraction of the top 1 / top k with the query's label
  mAP@k         AP@k = sum_i P@i * rel_i / min(k, R), R = relevant items the query could find
  kNN accuracy  majority label of the top k (ties: higher summed similarity) equals the query's
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np

from caselens.errors import QueryError
from caselens.indexes.collection import Collection


@dataclass
class RetrievalEval:
    """Results of one leave-one-out run."""

    collection: str
    encoder: str
    label_column: str
    exclude_same: str | None
    k: int
    n_queries: int  # labelled items that served as queries
    n_unlabelled: int  # items without a label (never queries; never relevant)
    overall: dict[str, float]  # metric -> value
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)  # label -> metric -> value (+ "n")
    chance_p_at_k: float = 0.0  # expected P@k of a random ranking (class prior), for reference

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def evaluate_retrieval(collection: Collection, label_column: str = "label", k: int = 10,
                       exclude_same: str | None = None, block: int = 1024) -> RetrievalEval:
    """Leave-one-out evaluation of ``collection`` (see module docstring)."""
    cols = collection.columns()
    for col in filter(None, (label_column, exclude_same)):
        if col not in cols:
            raise QueryError(f"collection {collection.name!r} has no column {col!r}; "
                             f"metadata columns: {', '.join(collection.metadata_columns())}")
    wanted = ["_row", "vector", label_column] + ([exclude_same] if exclude_same else [])
    table = collection.rows(None, wanted)
    labels = np.array([None if v is None else str(v) for v in table.column(label_column).to_pylist()], dtype=object)
    labelled = np.array([v is not None for v in labels])
    if labelled.sum() < 2:
        raise QueryError(f"collection {collection.name!r} has fewer than two items with a {label_column!r}")
    vectors = np.asarray(table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                         np.float32).reshape(-1, collection.dim)
    groups = (np.array([str(v) if v is not None else f"\x00{i}" for i, v in
                        enumerate(table.column(exclude_same).to_pylist())], dtype=object)
              if exclude_same else None)
    classes, label_ids = np.unique(np.where(labelled, labels, ""), return_inverse=True)
    label_ids = np.where(labelled, label_ids, -1)
    class_counts = np.bincount(label_ids[labelled], minlength=len(classes))

    q_idx = np.flatnonzero(labelled)
    k_eff = min(k, len(labels) - 1)
    rows: dict[str, list[float]] = defaultdict(list)
    per: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for start in range(0, len(q_idx), block):
        qs = q_idx[start:start + block]
        sims = vectors[qs] @ vectors.T
        sims[np.arange(len(qs)), qs] = -np.inf
        if groups is not None:
            sims[groups[qs][:, None] == groups[None, :]] = -np.inf
        top = np.argpartition(-sims, k_eff - 1, axis=1)[:, :k_eff]
        order = np.take_along_axis(sims, top, axis=1).argsort(axis=1)[:, ::-1]
        top = np.take_along_axis(top, order, axis=1)
        for qi, q in enumerate(qs):
            valid = top[qi][np.isfinite(sims[qi, top[qi]])]
            if len(valid) == 0:
                continue
            rel = (label_ids[valid] == label_ids[q]).astype(np.float64)
            reachable = int(class_counts[label_ids[q]] - 1)
            if groups is not None:
                same_group = (groups == groups[q]) & (label_ids == label_ids[q])
                reachable = int(class_counts[label_ids[q]] - same_group.sum())
            prec = np.cumsum(rel) / np.arange(1, len(rel) + 1)
            ap = float((prec * rel).sum() / max(1, min(k_eff, reachable))) if reachable > 0 else 0.0
            votes: dict[int, tuple[int, float]] = {}
            for j in valid:
                n, s = votes.get(label_ids[j], (0, 0.0))
                votes[label_ids[j]] = (n + 1, s + float(sims[qi, j]))
            knn = max(votes.items(), key=lambda kv: kv[1])[0]
            m = {"p@1": float(rel[0]), f"p@{k}": float(rel.mean()), f"map@{k}": ap,
                 f"knn@{k}": float(knn == label_ids[q])}
            for name, value in m.items():
                rows[name].append(value)
                per[classes[label_ids[q]]][name].append(value)
    overall = {name: float(np.mean(v)) for name, v in rows.items()}
    per_class = {c: {**{n: float(np.mean(v)) for n, v in m.items()}, "n": float(len(m["p@1"]))}
                 for c, m in sorted(per.items())}
    prior = class_counts / class_counts.sum()
    return RetrievalEval(collection=collection.name, encoder=collection.encoder["spec"], label_column=label_column,
                         exclude_same=exclude_same, k=k, n_queries=len(rows["p@1"]),
                         n_unlabelled=int((~labelled).sum()), overall=overall, per_class=per_class,
                         chance_p_at_k=float((prior ** 2).sum()))

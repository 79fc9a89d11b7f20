"""Leave-one-out retrieval metrics, checked against values worked out by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from caselens.errors import QueryError
from caselens.indexes.collection import Collection
from caselens.retrieval.eval.retrieval_eval import evaluate_retrieval


def _collection(home: Path, vectors: list[list[float]], labels: list[str | None], patients: list[str]) -> Collection:
    vecs = np.asarray(vectors, np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    record = {"spec": "test:hand", "dim": vecs.shape[1], "modalities": ["image"], "fingerprint": "e" * 16}
    coll = Collection.create("hand", record, home)
    coll.add([{"id": f"i{i}", "kind": "image", "source": f"i{i}",
               "metadata": {"label": lab, "patient_id": p}} for i, (lab, p) in enumerate(zip(labels, patients))], vecs)
    return coll


def test_metrics_match_hand_computation(home: Path) -> None:
    # Four unit vectors at these angles; similarity falls with angle distance.
    angles = [0.0, 0.3, 0.5, 0.9]
    labels = ["a", "a", "b", "b"]
    coll = _collection(home, [[np.cos(t), np.sin(t)] for t in angles], labels, ["p0", "p1", "p2", "p3"])
    res = evaluate_retrieval(coll, "label", k=2)
    # neighbours (by angle distance): 0 -> [1, 2]; 1 -> [2, 0]; 2 -> [1, 3]; 3 -> [2, 1]
    # rel@k:                          0 -> [1, 0]; 1 -> [0, 1]; 2 -> [0, 1]; 3 -> [1, 0]
    assert res.overall["p@1"] == pytest.approx((1 + 0 + 0 + 1) / 4)
    assert res.overall["p@2"] == pytest.approx(0.5)
    # AP@2 with R = 1 relevant item each: 0 -> 1; 1 -> 0.5; 2 -> 0.5; 3 -> 1
    assert res.overall["map@2"] == pytest.approx((1 + 0.5 + 0.5 + 1) / 4)
    # kNN, one vote each, tie broken by the nearer neighbour: 0 -> a ok; 1 -> b wrong; 2 -> a wrong; 3 -> b ok
    assert res.overall["knn@2"] == pytest.approx(0.5)
    assert res.per_class["a"]["n"] == 2 and res.n_queries == 4
    assert res.chance_p_at_k == pytest.approx(0.5)


def test_exclude_same_patient_and_unlabelled(home: Path) -> None:
    angles = [0.0, 0.05, 0.3, 0.6, 0.65]
    labels = ["a", "a", "b", "b", None]
    patients = ["p0", "p0", "p1", "p2", "p3"]
    coll = _collection(home, [[np.cos(t), np.sin(t)] for t in angles], labels, patients)
    plain = evaluate_retrieval(coll, "label", k=1)
    strict = evaluate_retrieval(coll, "label", k=1, exclude_same="patient_id")
    assert plain.n_queries == 4 and plain.n_unlabelled == 1
    # items 0 and 1 are one patient's twins: hits only without patient exclusion
    assert plain.overall["p@1"] == pytest.approx(0.5)
    assert strict.overall["p@1"] == 0.0
    # item 3's nearest is the unlabelled item 4: never relevant
    assert strict.per_class["b"]["p@1"] == 0.0


def test_eval_errors_name_the_column(home: Path) -> None:
    coll = _collection(home, [[1, 0], [0, 1]], ["a", None], ["p", "q"])
    with pytest.raises(QueryError, match="no column 'grade'"):
        evaluate_retrieval(coll, "grade")
    with pytest.raises(QueryError, match="fewer than two"):
        evaluate_retrieval(coll, "label")

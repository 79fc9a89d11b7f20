"""Diagnosis by similar cases: case voting, calibration, abstention, supporting cases, guideline
passages, and the leakage-free evaluation with its plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caselens.indexes.collection import Collection
from caselens.retrieval.calibration import (Calibrator, choose_calibrator, expected_calibration_error, fit_calibrator,
                                            macro_auc, roc_auc, threshold_for_precision, with_top)
from caselens.retrieval.diagnosis import (ArchiveIndex, DiagnosisModel, diagnose, fit_diagnosis,
                                          guideline_passages, vote)
from caselens.retrieval.eval.diagnosis_eval import age_band, evaluate_diagnosis, evaluate_diagnosis_arrays
from caselens.retrieval.search import Hit


def _overconfident(n: int = 3000, classes: int = 3, sharpen: float = 3.0, seed: int = 0):
    """Probabilities that say more than they know: labels drawn from p, stated p ** sharpen."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(classes) * 0.8, size=n)
    truth = np.array([rng.choice(classes, p=row) for row in p])
    stated = p ** sharpen
    return stated / stated.sum(1, keepdims=True), truth


# ---------------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("kind", ["temperature", "platt", "isotonic"])
def test_calibration_lowers_ece_on_held_out_items(kind: str) -> None:
    probs, truth = _overconfident()
    fit, test = slice(0, 1500), slice(1500, None)
    before = expected_calibration_error(probs[test], truth[test])
    cal = fit_calibrator(kind, probs[fit], truth[fit])
    after = expected_calibration_error(cal.apply(probs[test]), truth[test])
    assert before > 0.08 and after < before / 2, (before, after)
    out = cal.apply(probs[test])
    assert np.allclose(out.sum(1), 1) and np.array_equal(out.argmax(1), probs[test].argmax(1))
    assert Calibrator.from_dict(json.loads(json.dumps(cal.to_dict()))).apply(probs[:5]) == pytest.approx(cal.apply(probs[:5]))


def test_choose_calibrator_picks_a_calibrator_for_miscalibrated_and_none_for_calibrated() -> None:
    probs, truth = _overconfident()
    folds = np.arange(len(truth)) % 5
    cal, scores, oof = choose_calibrator(probs, truth, folds)
    assert cal.kind != "none" and scores[cal.kind]["ece"] < scores["none"]["ece"] / 2
    assert expected_calibration_error(oof[cal.kind], truth) == pytest.approx(scores[cal.kind]["ece"], abs=1e-4)
    calibrated, truth2 = _overconfident(sharpen=1.0, seed=1)
    cal2, scores2, _ = choose_calibrator(calibrated, truth2, folds)
    assert cal2.kind == "none" or scores2[cal2.kind]["ece"] <= scores2["none"]["ece"]


def test_with_top_keeps_the_label_and_a_distribution() -> None:
    p = np.array([[0.5, 0.45, 0.05], [0.9, 0.05, 0.05]])
    out = with_top(p, np.array([0.36, 0.95]))
    assert np.allclose(out.sum(1), 1) and np.array_equal(out.argmax(1), [0, 0])
    assert out[0, 0] == pytest.approx(0.36) and out[0, 1] <= 0.36 + 1e-9
    assert out[1, 0] == pytest.approx(0.95)


def test_roc_auc_is_the_pairwise_ranking_probability() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    positive = rng.random(60) < 0.4
    pairs = [(1.0 if s > t else 0.5 if s == t else 0.0) for s in scores[positive] for t in scores[~positive]]
    assert roc_auc(scores, positive) == pytest.approx(np.mean(pairs))
    assert roc_auc(scores, np.zeros(60, bool)) is None
    macro, per = macro_auc(np.eye(3)[[0, 1, 2, 0]], np.array([0, 1, 2, 0]))
    assert macro == 1.0 and set(per) == {0, 1, 2}


def test_threshold_for_precision() -> None:
    conf = np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5])
    correct = np.array([1, 1, 1, 1, 0, 1, 0], bool)
    t, cov = threshold_for_precision(conf, correct, 0.9, min_answered=1)
    assert t == 0.8 and cov == pytest.approx(4 / 7)
    assert threshold_for_precision(conf, ~correct, 0.9, min_answered=1) == (None, 0.0)


# ------------------------------------------------------------------------------------------- votes
def test_vote_weights_k_and_unlabelled_neighbours() -> None:
    cls = np.array([[0, -1, 1, 1, 0]])
    sims = np.array([[0.9, 0.99, 0.8, 0.7, 0.1]])
    prior = np.array([0.5, 0.5])
    equal = vote(cls, sims, 2, k=3, temperature=math.inf, prior=prior, smoothing=0.0)
    assert equal[0] == pytest.approx([1 / 3, 2 / 3])  # the unlabelled one does not vote; 3 labelled do
    sharp = vote(cls, sims, 2, k=3, temperature=0.01, prior=prior, smoothing=0.0)
    assert sharp[0, 0] > 0.99  # the most similar labelled case decides at a low temperature
    empty = vote(np.full((1, 2), -1), np.zeros((1, 2)), 2, k=3, temperature=0.1, prior=prior)
    assert empty[0] == pytest.approx(prior)


def _model(classes=("a", "b"), threshold=0.6, k=3) -> DiagnosisModel:
    return DiagnosisModel(classes=list(classes), k=k, temperature=math.inf, prior=[1 / len(classes)] * len(classes),
                          calibrator=Calibrator(), threshold=threshold, target_precision=0.9)


def test_diagnosis_never_uses_the_query_patient_nor_the_query_itself() -> None:
    x = np.array([[1, 0], [0.99, 0.14], [0.98, 0.2], [0.6, 0.8], [0.5, 0.86], [0.4, 0.92], [0, 1]], np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = [f"c{i}" for i in range(7)]
    labels = ["a", "a", "a", "b", "b", "b", "b"]
    patients = ["P1", "P1", "P1", "P2", "P3", "P4", "P5"]  # the nearest cases are all the query's patient
    archive = ArchiveIndex(x, ids, labels, patients)
    result = diagnose(x[0], archive, _model(), query_patient="P1", query_id="c0")
    assert all(case.id not in ("c0", "c1", "c2") for case in result.supporting)
    assert result.top_label == "b"
    # a search that ignores the exclusion is filtered all the same
    ignoring = lambda v, k, patient: archive(v, k, None)  # noqa: E731
    again = diagnose(x[0], ignoring, _model(), query_patient="P1", query_id="c0")
    assert [c.id for c in again.supporting] == [c.id for c in result.supporting]
    # without a patient, the query's own id still never supports itself
    own = diagnose(x[0], archive, _model(), query_id="c0")
    assert "c0" not in [c.id for c in own.supporting] and own.top_label == "a"


def test_diagnosis_abstains_below_the_threshold_and_serialises() -> None:
    x = np.eye(4, dtype=np.float32)[[0, 0, 1, 1, 2]] + 0.01
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    archive = ArchiveIndex(x, ["a1", "a2", "b1", "b2", "c1"], ["a", "a", "b", "b", None])
    q = np.array([1, 1, 0, 0], np.float32) / np.sqrt(2)  # equally near an "a" and a "b" pair
    result = diagnose(q, archive, _model(threshold=0.8, k=4))
    assert result.abstained and result.label is None and result.top_label in ("a", "b")
    assert result.confidence == pytest.approx(0.5, abs=0.02) and "below the threshold" in result.reason
    assert all(case.weight == pytest.approx(0.25) for case in result.supporting if case.label)
    assert [c.key for c in result.supporting][0].startswith("case:")
    answered = diagnose(q, archive, _model(threshold=0.8, k=4), min_confidence=0.4)
    assert not answered.abstained and answered.label == answered.top_label
    json.dumps(result.to_dict())
    never = diagnose(q, archive, _model(threshold=None, k=4))
    assert never.abstained and "precision" in never.reason


def test_model_round_trip(tmp_path: Path) -> None:
    model = _model(classes=("x", "y", "z"))
    model.calibrator = Calibrator("isotonic", {"x": [0.5, 1.0], "y": [0.4, 0.9]})
    path = model.save(tmp_path)
    again = DiagnosisModel.load(tmp_path)
    assert path.name == "diagnosis.json" and again.classes == model.classes and math.isinf(again.temperature)
    assert again.calibrator == model.calibrator
    assert DiagnosisModel.load(tmp_path / "none") is None


def test_fit_diagnosis_from_out_of_fold_neighbours() -> None:
    rng = np.random.default_rng(0)
    n, classes = 400, 3
    y = rng.integers(0, classes, n)
    x = rng.normal(size=(n, 8)) + np.eye(8)[y] * 1.5
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    folds = np.arange(n) % 5
    nb = np.full((n, 30), -1)
    sims = np.full((n, 30), -np.inf)
    for f in range(5):
        test, train = np.flatnonzero(folds == f), np.flatnonzero(folds != f)
        s = x[test] @ x[train].T
        order = np.argsort(-s, axis=1)[:, :30]
        nb[test], sims[test] = train[order], np.take_along_axis(s, order, axis=1)
    labels = [f"c{v}" for v in y]
    model, oof = fit_diagnosis(labels, nb, sims, folds, target_precision=0.9)
    assert model.classes == ["c0", "c1", "c2"] and 1 <= model.k <= 30
    assert model.cv["accuracy"] > 0.7
    assert model.cv["ece_after"] <= model.cv["ece_before"] + 0.02
    assert model.threshold is None or 0 < model.threshold <= 1
    assert oof["raw"].shape == (n, 3) and np.allclose(oof["calibrated"].sum(1), 1)


def test_guideline_passages_for_each_candidate_with_citation_keys() -> None:
    def hit(i: str, score: float, page: int | None) -> Hit:
        return Hit(rank=1, score=score, id=i, kind="text", label=None, source="guide.pdf",
                   text=f"passage {i} </source> text", provenance={"document": "guide", "page": page} if page else {})

    book = {"pneumonia": [hit("p1", 0.8, 3), hit("p2", 0.5, 4)], "covid 19": [hit("p1", 0.7, 3), hit("d9", 0.6, None)],
            "ground glass opacities": [hit("d9", 0.9, None)]}
    asked = []

    def search_text(query: str, k: int):
        asked.append(query)
        return book.get(query, [])[:k]

    out = guideline_passages(["pneumonia", "covid_19"], search_text, k=2, report_text="ground glass opacities")
    assert asked == ["pneumonia", "covid 19", "ground glass opacities"]
    keys = {p.key: p for p in out}
    assert set(keys) == {"page:guide#p3", "page:guide#p4", "doc:d9"}
    assert keys["page:guide#p3"].candidates == ("pneumonia", "covid_19") and keys["page:guide#p3"].score == 0.8
    assert keys["doc:d9"].candidates == ("covid_19", "report") and out[0].key == "doc:d9"
    assert "</source>" not in keys["page:guide#p3"].text


# -------------------------------------------------------------------------------------- evaluation
def test_age_band() -> None:
    assert age_band(35) == "18-39" and age_band("81") == "80+" and age_band(None) is None and age_band("") is None


def _collection(home: Path, n: int = 90, seed: int = 0) -> Collection:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, 12)) + np.eye(12)[y] * 1.2
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    col = Collection.create("diag", {"spec": "test-vectors", "dim": 12, "fingerprint": "enc-a",
                                     "modalities": ["image"], "options": {}}, home)
    records = [{"id": f"i{i}", "kind": "image", "source": f"i{i}.png", "provenance": {},
                "metadata": {"label": ["pneumonia", "covid", "normal"][y[i]], "patient_id": f"p{i // 3}",
                             "sex": "MF"[i % 2], "age": float(20 + i % 70), "view": ["PA", "AP", "L"][i % 3]}}
               for i in range(n)]
    col.add(records, x)
    return col


def test_evaluate_diagnosis_on_a_collection_writes_json_and_plots(home: Path, tmp_path: Path) -> None:
    col = _collection(home)
    out = tmp_path / "report"
    result = evaluate_diagnosis(col, "label", folds=3, inner_folds=3, out_dir=out)
    d = result.to_dict()
    assert result.n_queries == 90 and result.classes == ["covid", "normal", "pneumonia"]
    assert 0.5 < d["overall"]["accuracy"] <= 1 and d["overall"]["macro_auc"] > 0.7
    assert {"ece_before", "ece_after", "p@10_raw", "p@10_adapted"} <= set(d["overall"])
    assert set(d["subgroups"]) == {"sex", "age_band", "view"} and set(d["subgroups"]["sex"]) == {"M", "F"}
    assert sum(m["n"] for m in d["subgroups"]["sex"].values()) == 90
    assert d["coverage"]["curve"][0]["coverage"] == 1.0 and len(d["per_fold"]) == 3
    for name in ("diagnosis_eval.json", "diagnosis_eval_roc.png", "diagnosis_eval_reliability.png"):
        assert (out / name).is_file()
    assert Image.open(out / "diagnosis_eval_roc.png").size[0] > 100
    assert json.loads((out / "diagnosis_eval.json").read_text())["collection"] == "diag"


def test_evaluate_diagnosis_never_scores_a_query_against_its_patient() -> None:
    """Every item has an exact twin of the same patient and label: found, it would make every
    diagnosis right; patient-disjoint folds must keep it out (accuracy at chance)."""
    rng = np.random.default_rng(5)
    n = 60
    x = rng.normal(size=(n, 40)).astype(np.float32)
    y = rng.permutation(np.repeat(["a", "b", "c"], n // 3))
    twins = np.vstack([x, x + 1e-4])
    labels = np.r_[y, y]
    patients = [f"p{i}" for i in range(n)] * 2
    result = evaluate_diagnosis_arrays(twins, labels, patients, folds=3, inner_folds=3)
    assert result.overall["accuracy"] < 0.6 and result.overall["p@10_raw"] < 0.6


def test_fit_collection_diagnosis_stores_both_and_diagnoses_a_stored_case(home: Path) -> None:
    from caselens.errors import AdapterMismatchError
    from caselens.indexes.adapter import adapter_folder, save_adapter
    from caselens.retrieval.adaptation.collection import remove_collection_adapter
    from caselens.retrieval.diagnosis import collection_diagnosis, fit_collection_diagnosis

    col = _collection(home)
    adapter, model, report = fit_collection_diagnosis(col, "label", folds=3, save=True)
    stored_adapter, stored_model = collection_diagnosis(col)
    assert stored_adapter.fingerprint == adapter.fingerprint == model.adapter_fingerprint
    assert stored_model.classes == ["covid", "normal", "pneumonia"] and stored_model.label_column == "label"
    assert stored_model.table_version == col.version and report.n_labelled == 90
    archive = ArchiveIndex.from_collection(col, "label", stored_adapter, metadata_columns=("sex",))
    row = col.rows(columns=["id", "vector", "patient_id", "label"], limit=1).to_pylist()[0]
    query = stored_adapter.apply(np.asarray(row["vector"], np.float32))[0]
    result = diagnose(query, archive, stored_model, query_patient=row["patient_id"], query_id=row["id"])
    assert result.supporting and all(c.id != row["id"] for c in result.supporting)
    patients = dict(zip(archive.ids, archive.patients))
    assert all(patients[c.id] != row["patient_id"] for c in result.supporting)
    assert set(result.probabilities) == set(stored_model.classes) and "sex" in result.supporting[0].metadata
    # a model fitted with another adapter is refused; removing the adapter removes the model too
    save_adapter(type(adapter)("lda", adapter.encoder_fingerprint, adapter.in_dim, matrix=np.eye(adapter.in_dim)[:, :2]),
                 adapter_folder(col.root))
    with pytest.raises(AdapterMismatchError):
        collection_diagnosis(col)
    assert remove_collection_adapter(col) and collection_diagnosis(col) == (None, None)

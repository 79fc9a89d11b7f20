"""`caselens eval qa` on a small MIRAGE-format file against a real collection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from caselens.errors import QueryError
from caselens.indexes.collection import Collection
from caselens.ingest.pipeline import IngestConfig, ingest
from caselens.ingest.sources import TextCorpusSource
from caselens.cli import main
from caselens.retrieval.eval.qa_eval import calibrate_threshold, evaluate_qa

DOCS = [
    {"id": "pmid:101", "text": "Metformin lowers hepatic glucose production and is first-line therapy for type 2 diabetes."},
    {"id": "pmid:102", "text": "Warfarin is a vitamin K antagonist used to prevent thrombosis; INR is monitored."},
    {"id": "pmid:103", "text": "Salbutamol is a short-acting beta-2 agonist that relieves bronchospasm in asthma."},
]
QUESTIONS = {
    "toy_mc": {
        "q1": {"question": "Which drug is first-line therapy for type 2 diabetes by lowering hepatic glucose production?",
               "options": {"A": "Warfarin", "B": "Metformin", "C": "Salbutamol"}, "answer": "B", "PMID": [101]},
        "q2": {"question": "Which drug relieves bronchospasm in asthma as a beta-2 agonist?",
               "options": {"A": "Salbutamol", "B": "Warfarin", "C": "Metformin"}, "answer": "A", "PMID": [103]},
    },
    "toy_nogold": {
        "q3": {"question": "Which vitamin does warfarin antagonise?", "options": {"A": "vitamin K", "B": "vitamin C"},
               "answer": "A"},
    },
}


@pytest.fixture
def setup(home: Path, tmp_path: Path, minilm) -> tuple[Collection, Path]:
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    coll = Collection.create("pubmed", minilm.info.to_record(), home)
    ingest(TextCorpusSource(corpus), coll, minilm, IngestConfig(progress=False))
    questions = tmp_path / "q.json"
    questions.write_text(json.dumps(QUESTIONS))
    return coll, questions


def test_eval_qa_scores_accuracy_recall_and_citations(setup) -> None:
    coll, questions = setup
    result = evaluate_qa(questions, [coll], "extractive", k=1, progress=False)
    mc = result.tasks["toy_mc"]
    assert mc.n == 2 and mc.gold_recall == 1.0 and mc.n_with_gold == 2
    assert mc.accuracy_rag == 1.0  # the retrieved passage names the right option
    assert mc.accuracy_closed_book is None  # extractive only quotes: no closed-book accuracy, not a zero
    assert mc.citation_validity == 1.0 and mc.abstention_rate == 0.0
    assert result.tasks["toy_nogold"].gold_recall is None
    strict = evaluate_qa(questions, [coll], "extractive", k=1, min_score=0.99, closed_book=False, progress=False)
    assert strict.tasks["toy_mc"].abstention_rate == 1.0 and strict.tasks["toy_mc"].accuracy_rag == 0.0


def test_eval_qa_cli_and_bad_files(setup, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    coll, questions = setup
    out = tmp_path / "qa.json"
    assert main(["--home", str(home), "eval", "qa", "--questions", str(questions), "--knowledge", "pubmed",
                 "--k", "1", "--tasks", "toy_mc", "--json-out", str(out)]) == 0
    assert json.loads(out.read_text())["tasks"]["toy_mc"]["gold_recall"] == 1.0
    assert "toy_mc" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"t": {"q": {"question": "x"}}}))
    with pytest.raises(QueryError, match="needs question, options and answer"):
        evaluate_qa(bad, [coll], "extractive", progress=False)
    with pytest.raises(QueryError, match="not in"):
        evaluate_qa(questions, [coll], "extractive", tasks=["nope"], progress=False)


def test_calibrated_threshold_separates_hits_from_misses() -> None:
    pairs = [(0.9, True), (0.8, True), (0.6, True), (0.55, False), (0.4, False), (0.7, False)]
    threshold, j = calibrate_threshold(pairs)
    assert threshold == 0.6 and j == pytest.approx(1 - 1 / 3)
    assert calibrate_threshold([(0.5, True)]) == (None, None)

"""Gold-document retrieval evaluation (MIRAGE format): metrics, chunk -> document mapping, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from caselens.errors import QueryError
from caselens.indexes.collection import Collection
from caselens.ingest.chunking import chunker_for
from caselens.ingest.pipeline import IngestConfig, ingest
from caselens.ingest.sources import TextCorpusSource
from caselens.cli import main
from caselens.retrieval.eval.text_eval import doc_ids_by_row, evaluate_text, score_ranking

QUIET = IngestConfig(progress=False)


def test_score_ranking_by_hand() -> None:
    s = score_ranking(["a", "g1", "b", "g2"], {"g1", "g2", "g3"}, ks=(1, 2, 4))
    assert s["recall@1"] == 0 and s["recall@2"] == pytest.approx(1 / 3) and s["recall@4"] == pytest.approx(2 / 3)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert s["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / idcg)
    assert s["mrr@10"] == 0.5
    assert score_ranking(["x"], {"g"}, ks=(1,))["mrr@10"] == 0.0


@pytest.fixture
def pubmed_like(home: Path, tmp_path: Path, minilm) -> tuple[Collection, Path]:
    long_text = " ".join(f"Sentence {i} about unrelated cardiology findings in elderly patients." for i in range(60)) + \
        " Finally, zolgensma gene therapy restores SMN protein in spinal muscular atrophy."
    docs = [
        {"id": "pmid:1", "text": "Lentiviral vectors such as ProSavin deliver dopamine synthesis genes in Parkinson disease."},
        {"id": "pmid:2", "text": "Amoxicillin treats community-acquired pneumonia in children."},
        {"id": "pmid:3", "text": long_text},  # becomes several chunks; the answer is in the last one
        {"id": "pmid:4", "text": "Dermoscopy improves the early detection of melanoma."},
    ]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    coll = Collection.create("pubmed", minilm.info.to_record(), home)
    ingest(TextCorpusSource(corpus, chunker=chunker_for(minilm, 96, 16)), coll, minilm, QUIET)
    questions = {
        "pubmedqa": {"q1": {"question": "Does ProSavin use a lentiviral vector?", "options": {"A": "yes", "B": "no"},
                            "answer": "A", "PMID": [1]},
                     "q2": {"question": "Does zolgensma restore SMN protein in spinal muscular atrophy?",
                            "options": {"A": "yes", "B": "no"}, "answer": "A", "PMID": ["3"]}},
        "bioasq": {"q3": {"question": "Is amoxicillin used for pneumonia?", "options": {"A": "yes", "B": "no"},
                          "answer": "A", "PMID": [2, 99]},
                   "q4": {"question": "Is this document absent?", "options": {"A": "yes", "B": "no"}, "answer": "A",
                          "PMID": [12345]}},
        "medqa": {"q5": {"question": "No gold here", "options": {"A": "x"}, "answer": "A"}},
    }
    path = tmp_path / "mirage.json"
    path.write_text(json.dumps(questions))
    return coll, path


def test_chunks_map_back_to_their_document(pubmed_like) -> None:
    coll, _ = pubmed_like
    doc_of = doc_ids_by_row(coll)
    ids = coll.rows(columns=["id"]).column("id").to_pylist()
    assert sum(i.startswith("pmid:3#c") for i in ids) > 2  # the long row was chunked
    assert set(doc_of.values()) == {"pmid:1", "pmid:2", "pmid:3", "pmid:4"}


def test_evaluate_text_per_task_and_mode(pubmed_like) -> None:
    coll, questions = pubmed_like
    result = evaluate_text(coll, questions, progress=False)
    assert result.questions_scored == {"pubmedqa": 2, "bioasq": 1}  # medqa names no PMIDs: not chosen
    assert result.no_gold_in_collection == {"pubmedqa": 0, "bioasq": 1}
    assert result.documents == 4 and result.items > 4
    for mode in ("bm25", "dense", "hybrid"):
        # gold documents present are found first; a gold id absent from the corpus does not count
        assert result.scores[mode]["pubmedqa"]["recall@1"] == 1.0
        assert result.scores[mode]["bioasq"]["recall@1"] == 1.0
        assert result.scores[mode]["all"]["ndcg@10"] == 1.0
        # only 4 documents: every ranking holds each at most once
        assert result.scores[mode]["all"]["recall@100"] == 1.0
    with pytest.raises(QueryError, match="not in"):
        evaluate_text(coll, questions, tasks=["nosuchtask"], progress=False)


def test_eval_text_cli_writes_json(pubmed_like, home: Path, tmp_path: Path, capsys) -> None:
    coll, questions = pubmed_like
    out = tmp_path / "eval" / "text.json"
    assert main(["--home", str(home), "eval", "text", "pubmed", "--questions", str(questions), "--modes", "bm25",
                 "--json-out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "pubmedqa" in printed and "bm25" in printed
    data = json.loads(out.read_text())
    assert data["modes"] == ["bm25"] and data["scores"]["bm25"]["all"]["recall@10"] == 1.0
    assert main(["--home", str(home), "eval", "text", "pubmed", "--questions", str(questions),
                 "--modes", "sparse"]) == 2

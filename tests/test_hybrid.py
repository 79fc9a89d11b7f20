"""BM25 beside dense vectors: the derived BM25 index, reciprocal rank fusion, hybrid search, reranking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from caselens.indexes import bm25_index as bm25
from caselens.indexes import derived
from caselens.indexes.collection import Collection
from caselens.ingest.chunking import chunker_for
from caselens.ingest.pipeline import IngestConfig, ingest
from caselens.ingest.sources import TextCorpusSource
from caselens.cli import main
from caselens.retrieval.fusion import CrossEncoderReranker, TextRanker, keyword_search, rrf
from caselens.retrieval.search import search

QUIET = IngestConfig(progress=False)

DOCS = [
    ("d1", "ProSavin is a lentiviral vector gene therapy for Parkinson disease.", "2014"),
    ("d2", "Community-acquired pneumonia is treated with antibiotics such as amoxicillin.", "2011"),
    ("d3", "Pulmonary surfactant is secreted by type II alveolar cells and lowers surface tension.", "2011"),
    ("d4", "Osteoclasts resorb bone while osteoblasts lay down new bone matrix.", "2015"),
    ("d5", "Chest radiographs show consolidation in lobar pneumonia.", "2014"),
    ("d6", "Tuberculosis is diagnosed with a skin test or an interferon-gamma release assay.", "2016"),
    ("d7", "Melanoma is a malignant tumour of melanocytes; dermoscopy helps early detection.", "2012"),
    ("d8", "Asthma causes reversible airway obstruction and wheezing.", "2013"),
]


def _corpus(path: Path, docs=DOCS) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": t, "year": y}) + "\n" for i, t, y in docs))
    return path


@pytest.fixture
def kb(home: Path, tmp_path: Path, minilm) -> Collection:
    coll = Collection.create("kb", minilm.info.to_record(), home)
    ingest(TextCorpusSource(_corpus(tmp_path / "c.jsonl"), chunker=chunker_for(minilm)), coll, minilm, QUIET)
    return coll


def test_rrf_rewards_agreement_and_keeps_first_seen_order_on_ties() -> None:
    fused = rrf([[1, 2, 3], [3, 4, 1]], rrf_k=60)
    scores = dict((key, s) for s, key in fused)
    assert scores[1] == pytest.approx(1 / 61 + 1 / 63) and scores[4] == pytest.approx(1 / 62)
    assert [key for _, key in fused][:2] == [1, 3]  # in both rankings
    assert [key for _, key in rrf([[7, 8], [8, 7]])] == [7, 8]  # equal scores: first seen first


def test_bm25_finds_rare_terms_and_its_index_follows_the_table(kb: Collection, tmp_path: Path, minilm) -> None:
    result = search(kb, text="ProSavin", k=3, mode="bm25")
    assert result.mode == "bm25" and result.hits[0].id == "d1"
    assert all(h.score > 0 for h in result.hits) and len(result.hits) == 1  # only d1 has the term
    stamp = bm25.read_stamp(kb.layout.bm25_dir)
    assert stamp.table_version == kb.version and stamp.n_docs == len(DOCS)
    # new rows make the index stale: the next search rebuilds it from the new table version
    more = _corpus(tmp_path / "more.jsonl", [("d9", "Cystic fibrosis is caused by CFTR mutations.", "2017")])
    ingest(TextCorpusSource(more, chunker=chunker_for(minilm)), kb, minilm, QUIET)
    assert search(kb, text="CFTR mutations", k=1, mode="bm25").hits[0].id == "d9"
    stamp = bm25.read_stamp(kb.layout.bm25_dir)
    assert stamp.table_version == kb.version and stamp.n_docs == len(DOCS) + 1


def test_damaged_bm25_files_are_detected_and_rebuilt(kb: Collection) -> None:
    derived.refresh_bm25(kb)
    folder = kb.layout.bm25_dir
    victim = folder / bm25.ROWS_FILE
    victim.write_bytes(victim.read_bytes()[:-8] + b"\x00" * 8)
    with pytest.raises(bm25.IndexIntegrityError):
        bm25.load(folder)
    fresh = Collection.open(kb.name, kb.root.parent)  # a new reader: nothing loaded yet
    assert search(fresh, text="osteoclasts", k=1, mode="bm25").hits  # no writer busy: rebuilt, not served damaged
    bm25.load(folder)  # rebuilt: verifies again


def test_filters_apply_before_keyword_and_hybrid_ranking(kb: Collection) -> None:
    for mode in ("bm25", "hybrid"):
        hits = search(kb, text="pneumonia", k=5, where="year = '2014'", mode=mode).hits
        assert hits and all(h.metadata["year"] == "2014" for h in hits)
        assert "d2" not in {h.id for h in hits}  # a pneumonia document of 2011


def test_hybrid_fuses_both_rankings(kb: Collection) -> None:
    ranker = TextRanker(kb)
    query = "lentiviral ProSavin gene therapy"
    dense = [r for _, r in ranker.rank(query, 8, "dense")[0]]
    keyword = [r for _, r in ranker.rank(query, 8, "bm25")[0]]
    hybrid, _ = ranker.rank(query, 8, "hybrid")
    assert [r for _, r in hybrid] == [r for _, r in rrf([dense, keyword])][:8]
    result = search(kb, text=query, k=3, mode="hybrid")
    assert result.mode == "hybrid" and result.hits[0].id == "d1"
    assert result.hits[0].score == pytest.approx(hybrid[0][0])


def test_search_modes_from_the_cli(kb: Collection, home: Path, capsys, tmp_path: Path) -> None:
    assert main(["--home", str(home), "search", "kb", "--text", "alveolar surfactant", "--mode", "bm25",
                 "--json", "--k", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "bm25" and out["hits"][0]["id"] == "d3"
    assert main(["--home", str(home), "info", "kb", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bm25_index"]["fresh"] and info["bm25_index"]["n_docs"] == len(DOCS)
    assert info["chunking"] == {"max_tokens": 256, "overlap": 32}
    png = tmp_path / "q.png"
    from PIL import Image

    Image.new("L", (8, 8)).save(png)
    assert main(["--home", str(home), "search", "kb", "--image", str(png), "--mode", "hybrid"]) == 2
    assert "image query" in capsys.readouterr().err


def _tiny_cross_encoder(folder: Path) -> Path:
    """A randomly initialised BERT cross-encoder saved locally, with MiniLM's packaged vocabulary."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from caselens.ingest.encoders.text import packaged_minilm_path

    tokenizer = AutoTokenizer.from_pretrained(str(packaged_minilm_path()))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64, num_labels=1)
    import torch

    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_cross_encoder_reranker_reorders_the_fused_candidates(kb: Collection, tmp_path: Path) -> None:
    reranker = CrossEncoderReranker(str(_tiny_cross_encoder(tmp_path / "ce")), device="cpu")
    query = "pneumonia chest radiograph"
    plain, snapshot = TextRanker(kb).rank(query, 20, "hybrid")
    reranked, _ = TextRanker(kb, reranker=reranker).rank(query, 3, "hybrid")
    texts = snapshot.row_dicts([r for _, r in plain])
    scores = reranker.rerank(query, [texts[r]["text"] for _, r in plain])
    expected = sorted(zip(scores.tolist(), [r for _, r in plain]), key=lambda x: -x[0])[:3]
    assert [r for _, r in reranked] == [r for _, r in expected]
    assert [s for s, _ in reranked] == pytest.approx([s for s, _ in expected], rel=1e-5)
    result = keyword_search(kb, query, k=2, mode="hybrid", reranker=reranker)
    assert len(result.hits) == 2

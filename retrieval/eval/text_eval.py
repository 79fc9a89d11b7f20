"""Text retrieval evaluation against questions that name their gold documents (MIRAGE format).

For every question with gold ids (``PMID`` in PubMedQA* and BioASQ; ``pmid:<n>`` in the corpus)
the collection is searched in each mode (``bm25``, ``dense``, ``hybrid``) with the question text.
Items are mapped to their document (``parent_id`` of chunks; the id itself otherwise), repeats of
one document are dropped, and the document ranking is scored:

  recall@k  share of the question's gold documents (those present in the collection) in the top k
  nDCG@10   binary-relevance nDCG of the top 10 documents
  MRR@10    1 / rank of the first gold document in the top 10 (0 when none)

Questions none of whose gold documents is in the collection are counted (``no_gold_in_collection``)
and left out of the means. Query embeddings are computed once per question and shared by the
dense and hybrid runs; ``ms_per_query`` is the ranking time per query after that.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from caselens.errors import QueryError
from caselens.indexes.collection import Collection
from caselens.retrieval.eval.qa_eval import _gold_ids, load_questions
from caselens.retrieval.fusion import TextRanker
from caselens.retrieval.search import MODES, collection_encoder

KS = (1, 5, 10, 20, 100)  # recall cut-offs reported


@dataclass
class TextEval:
    """Scores of one evaluation run: ``scores[mode][task][metric]`` (and ``"all"`` over tasks)."""

    collection: str
    encoder: str  # the collection's encoder (dense and hybrid modes)
    questions: str  # questions file name
    modes: list[str]
    items: int  # items (chunks) in the collection
    documents: int  # distinct documents they belong to
    scores: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    questions_scored: dict[str, int] = field(default_factory=dict)  # task -> questions with gold in the collection
    no_gold_in_collection: dict[str, int] = field(default_factory=dict)  # task -> questions left out
    ms_per_query: dict[str, float] = field(default_factory=dict)  # mode -> mean ranking time
    encode_ms_per_query: float = 0.0  # query embedding time (shared by dense and hybrid)
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def doc_ids_by_row(collection: Collection) -> dict[int, str]:
    """``_row`` -> document id: ``parent_id`` where the item has one, else its id without ``#c<n>``."""
    cols = ["_row", "id"] + (["parent_id"] if "parent_id" in collection.columns() else [])
    table = collection.rows(None, cols).to_pydict()
    parents = table.get("parent_id") or [None] * len(table["id"])
    return {int(r): (p or re.sub(r"#c\d+$", "", i)) for r, i, p in zip(table["_row"], table["id"], parents)}


def score_ranking(docs: Sequence[str], gold: set[str], ks: Sequence[int] = KS) -> dict[str, float]:
    """recall@k for ``ks``, nDCG@10 and MRR@10 of a document ranking against ``gold``."""
    out = {f"recall@{k}": len(gold.intersection(docs[:k])) / len(gold) for k in ks}
    dcg = sum(1 / math.log2(i + 2) for i, d in enumerate(docs[:10]) if d in gold)
    idcg = sum(1 / math.log2(i + 2) for i in range(min(len(gold), 10)))
    out["ndcg@10"] = dcg / idcg
    first = next((i for i, d in enumerate(docs[:10]) if d in gold), None)
    out["mrr@10"] = 0.0 if first is None else 1 / (first + 1)
    return out


def _dedupe(rows: Sequence[int], doc_of: dict[int, str], n: int) -> list[str]:
    docs: list[str] = []
    for r in rows:
        d = doc_of.get(r)
        if d is not None and d not in docs:
            docs.append(d)
            if len(docs) >= n:
                break
    return docs


def evaluate_text(collection: Collection, questions: Path, modes: Sequence[str] = ("bm25", "dense", "hybrid"),
                  tasks: Sequence[str] | None = None, ks: Sequence[int] = KS, depth: int = 300,
                  limit_per_task: int | None = None, progress: bool = True) -> TextEval:
    """Score ``collection``'s document rankings for the questions in ``questions`` (see module doc).
    ``depth`` items are read per query before documents are de-duplicated."""
    start = time.perf_counter()
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise QueryError(f"unknown mode(s) {bad}; use {', '.join(MODES)}")
    data = load_questions(Path(questions))
    chosen = list(tasks) if tasks else [t for t, qs in data.items() if any(q.get("PMID") for q in qs.values())]
    missing = [t for t in chosen if t not in data]
    if missing:
        raise QueryError(f"task(s) {missing} not in {questions}; it has {', '.join(data)}")
    if not chosen:
        raise QueryError(f"no task in {questions} names gold documents (PMID); nothing to score")
    doc_of = doc_ids_by_row(collection)
    corpus = set(doc_of.values())
    result = TextEval(collection=collection.name, encoder=collection.encoder["spec"], questions=Path(questions).name,
                      modes=list(modes), items=len(doc_of), documents=len(corpus))
    queries: list[tuple[str, str, set[str]]] = []  # task, question, gold in collection
    for task in chosen:
        items = list(data[task].values())[:limit_per_task] if limit_per_task else list(data[task].values())
        result.questions_scored[task] = result.no_gold_in_collection[task] = 0
        for q in items:
            gold = _gold_ids(q) & corpus
            if not gold:
                result.no_gold_in_collection[task] += 1
                continue
            result.questions_scored[task] += 1
            queries.append((task, q["question"], gold))
    if not queries:
        raise QueryError(f"no question's gold document is in collection {collection.name!r}; ingest the corpus "
                         "the questions refer to")
    ranker = TextRanker(collection, depth=depth)
    vectors = None
    if any(m != "bm25" for m in modes):
        t0 = time.perf_counter()
        vectors = collection_encoder(collection).encode_queries([q for _, q, _ in queries])
        result.encode_ms_per_query = (time.perf_counter() - t0) * 1000 / len(queries)
    max_k = max(ks)
    for mode in modes:
        per_task: dict[str, list[dict[str, float]]] = {}
        elapsed = 0.0
        for i, (task, question, gold) in enumerate(tqdm(queries, desc=f"eval {mode}", disable=not progress)):
            t0 = time.perf_counter()
            found, _ = ranker.rank(question, depth, mode, vector=None if vectors is None else vectors[i])
            elapsed += time.perf_counter() - t0
            docs = _dedupe([r for _, r in found], doc_of, max_k)
            per_task.setdefault(task, []).append(score_ranking(docs, gold, ks))
        result.ms_per_query[mode] = elapsed * 1000 / len(queries)
        table: dict[str, dict[str, float]] = {}
        for task, rows in per_task.items():
            table[task] = {m: float(np.mean([r[m] for r in rows])) for m in rows[0]}
        everything = [r for rows in per_task.values() for r in rows]
        table["all"] = {m: float(np.mean([r[m] for r in everything])) for m in everything[0]}
        result.scores[mode] = table
    result.seconds = time.perf_counter() - start
    return result


def summary_rows(result: TextEval, metrics: Sequence[str] = ("recall@1", "recall@5", "recall@10", "recall@20",
                                                              "ndcg@10")) -> list[list[Any]]:
    """Rows (task, mode, n, metrics...) for printing."""
    rows = []
    for task in [*result.questions_scored, "all"]:
        n = sum(result.questions_scored.values()) if task == "all" else result.questions_scored[task]
        for mode in result.modes:
            vals = result.scores[mode].get(task)
            if vals:
                rows.append([task, mode, n, *[vals[m] for m in metrics]])
    return rows

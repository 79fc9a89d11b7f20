"""Keyword (BM25) and hybrid text search: dense and BM25 rankings fused by reciprocal rank fusion.

Reciprocal rank fusion (Cormack et al., 2009) scores an item ``sum over rankings of
1 / (rrf_k + rank)``; it needs no score calibration between BM25 and cosine similarity. Each
ranking is taken ``depth`` items deep (at least ``k``). Filters (``where``) select candidate rows
before either ranking, exactly as for dense search.

An optional reranker (any object with ``rerank(query, texts) -> scores``, e.g.
:class:`CrossEncoderReranker` over a local sentence-transformers cross-encoder) reorders the fused
top ``depth`` before the top ``k`` are returned.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from caselens.errors import QueryError
from caselens.indexes.bm25_index import Bm25Index
from caselens.indexes.collection import Collection
from caselens.indexes.derived import bm25_for_read
from caselens.indexes.reader import reader_of
from caselens.indexes.snapshot import Snapshot
from caselens.retrieval.search import SearchResult, collection_encoder, hits_for_rows, predicate

RRF_K = 60  # rank offset of reciprocal rank fusion (60 as in Cormack et al.)
DEPTH = 100  # how deep each ranking is read before fusing


class Reranker(Protocol):
    """Reorders candidates by a finer (usually slower) relevance model."""

    def rerank(self, query: str, texts: Sequence[str]) -> np.ndarray:
        """One relevance score per text (higher is better)."""


class CrossEncoderReranker:
    """A sentence-transformers cross-encoder from a local folder (no download) as a reranker."""

    def __init__(self, path: str, batch_size: int = 32, device: str | None = None):
        from sentence_transformers import CrossEncoder

        from caselens.ingest.encoders.base import best_device

        self.model = CrossEncoder(path, device=device or best_device(), local_files_only=True)
        self.batch_size = batch_size

    def rerank(self, query: str, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, np.float32)
        scores = self.model.predict([(query, t) for t in texts], batch_size=self.batch_size,
                                    show_progress_bar=False, convert_to_numpy=True)
        return np.asarray(scores, np.float32).reshape(len(texts), -1)[:, -1]


def rrf(rankings: Sequence[Sequence[int]], rrf_k: int = RRF_K) -> list[tuple[float, int]]:
    """Fuse rankings of item keys (best first) into (score, key) pairs, best first; ties keep the
    order in which keys were first seen."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, key in enumerate(ranking, start=1):
            scores[key] = scores.get(key, 0.0) + 1.0 / (rrf_k + rank)
    order = sorted(scores.items(), key=lambda kv: -kv[1])  # sorted() is stable
    return [(score, key) for key, score in order]


class TextRanker:
    """Ranks a collection's rows for text queries in each mode, on the latest snapshot, holding the
    BM25 index it reads (the FAISS index is held by the collection's reader), so a batch of
    queries pays for loading once."""

    def __init__(self, collection: Collection, depth: int = DEPTH, rrf_k: int = RRF_K,
                 reranker: Reranker | None = None):
        self.collection = collection
        self.depth = depth
        self.rrf_k = rrf_k
        self.reranker = reranker
        self._bm25: tuple[int, Bm25Index] | None = None  # (snapshot version, index)

    @property
    def encoder(self) -> Any:
        return collection_encoder(self.collection)

    def bm25(self, snapshot: Snapshot) -> Bm25Index:
        """The BM25 index read for ``snapshot`` (see :func:`caselens.indexes.derived.bm25_for_read`)."""
        held = self._bm25
        if held is None or held[0] != snapshot.version:
            held = self._bm25 = (snapshot.version, bm25_for_read(self.collection, snapshot.texts, snapshot.version))
        return held[1]

    def rank(self, text: str, n: int, mode: str, vector: np.ndarray | None = None,
             where: str | None = None) -> tuple[list[tuple[float, int]], Snapshot]:
        """Top ``n`` (score, ``_row``) for ``text`` in ``mode`` among the rows matching the predicate
        ``where``, and the snapshot they were ranked in; ``vector`` is the query's embedding when
        already computed (dense and hybrid)."""
        if mode not in ("dense", "bm25", "hybrid"):
            raise QueryError(f"search mode {mode!r} is not known; use dense, bm25 or hybrid")
        depth = max(n, self.depth)
        if mode != "bm25" and vector is None:
            vector = self.encoder.encode_queries([text])[0]
        view = reader_of(self.collection).view()
        snapshot = view.snapshot
        allowed = snapshot.select(where) if where is not None else None
        if mode == "dense":
            found = view.rank(vector, depth if self.reranker else n, allowed)
        elif mode == "bm25":
            found = self._keywords(text, depth if self.reranker else n, snapshot, allowed)
        else:
            dense = view.rank(vector, depth, allowed)
            keyword = self._keywords(text, depth, snapshot, allowed)
            found = rrf([[r for _, r in dense], [r for _, r in keyword]], self.rrf_k)
            if not self.reranker:
                found = found[:n]
        if self.reranker and found:
            texts = snapshot.row_dicts([r for _, r in found])
            scores = self.reranker.rerank(text, [texts.get(r, {}).get("text") or "" for _, r in found])
            order = np.argsort(-scores, kind="stable")[:n]
            found = [(float(scores[i]), found[i][1]) for i in order]
        return found[:n], snapshot

    def _keywords(self, text: str, n: int, snapshot: Snapshot, allowed: np.ndarray | None) -> list[tuple[float, int]]:
        index = self.bm25(snapshot)
        found = index.search(text, n, allowed)
        if index.stamp.table_version != snapshot.version:  # rows deleted since it was built never rank
            held = snapshot.contains(np.asarray([r for _, r in found], np.int64))
            found = [f for f, ok in zip(found, held.tolist()) if ok]
        return found


def keyword_search(collection: Collection, text: str, k: int = 10, where: str | None = None,
                   mode: str = "bm25", depth: int = DEPTH, reranker: Reranker | None = None) -> SearchResult:
    """Top-``k`` items for ``text`` by BM25 (``mode="bm25"``) or dense + BM25 fused (``"hybrid"``)."""
    start = time.perf_counter()
    if k < 1:
        raise QueryError(f"k must be at least 1, got {k}")
    snapshot = reader_of(collection).snapshot()
    where = predicate(collection, snapshot, where)
    found, snapshot = TextRanker(collection, depth=depth, reranker=reranker).rank(text, k, mode, where=where)
    candidates = len(snapshot.select(where)) if where else len(snapshot)
    encoder = collection.encoder["spec"] if mode == "hybrid" else "bm25s"
    return SearchResult(collection=collection.name, query=f"text {text!r}", encoder=encoder,
                        hits=hits_for_rows(snapshot, found), candidates=candidates,
                        milliseconds=(time.perf_counter() - start) * 1000, mode=mode,
                        table_version=snapshot.version).bind(collection)


__all__ = ["CrossEncoderReranker", "DEPTH", "RRF_K", "Reranker", "TextRanker", "keyword_search", "rrf"]

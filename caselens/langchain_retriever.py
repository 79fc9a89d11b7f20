"""LangChain integration: a ``BaseRetriever`` over a caselens collection.

    from caselens.langchain_retriever import CaselensRetriever
    retriever = CaselensRetriever(collection="kb", home="caselens-data", k=5)
    docs = retriever.invoke("shortness of breath")          # Documents with id, score, key, metadata
    docs = retriever.invoke("shortness of breath", k=2)     # k (and where, mode) per call

Needs ``langchain-core`` (``pip install caselens[langchain]``); passes the official
``langchain-tests`` retriever suite. Queries are encoded with the collection's own encoder;
``where`` filters on metadata columns before ranking; ``mode`` is dense, bm25 or hybrid. The
collection is opened once and kept (with its loaded index and encoder) between calls.
"""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import PrivateAttr

from caselens.api import Collection, open as open_collection
from caselens.retrieval.rag.context import citation_key, item_kind


class CaselensRetriever(BaseRetriever):
    """Top-``k`` items of a caselens collection as LangChain documents."""

    collection: str  # collection name
    home: str | None = None  # caselens home folder (default: $CASELENS_HOME or ./caselens-data)
    k: int = 5  # documents per query
    where: str | None = None  # SQL filter on metadata columns
    mode: str = "dense"  # dense, bm25 or hybrid
    _handle: Collection | None = PrivateAttr(default=None)

    def _collection(self) -> Collection:
        if self._handle is None:
            self._handle = open_collection(self.collection, self.home)
        return self._handle

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                k: int | None = None, where: str | None = None, mode: str | None = None,
                                **kwargs: Any) -> list[Document]:
        coll = self._collection()
        result = coll.search(text=query, k=k if k is not None else self.k, where=where if where is not None else self.where,
                             mode=mode or self.mode)
        docs = []
        for hit in result.hits:
            kind = item_kind(hit)
            meta: dict[str, Any] = {"id": hit.id, "score": hit.score, "score_meaning": result.score_meaning,
                                    "rank": hit.rank, "key": citation_key(kind, hit), "kind": kind,
                                    "collection": coll.name, "source": hit.source, "label": hit.label, **hit.metadata}
            docs.append(Document(page_content=hit.text or "", metadata=meta, id=hit.id))
        return docs

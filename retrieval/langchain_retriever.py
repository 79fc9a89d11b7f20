"""LangChain integration: a ``BaseRetriever`` over a caselens collection.

    from caselens.retrieval.langchain_retriever import CaselensRetriever
    retriever = CaselensRetriever(collection="kb", home="caselens-data", k=5)
    docs = retriever.invoke("shortness of breath")      # Documents with score, id, key, metadata

Needs ``langchain-core`` (``pip install caselens[langchain]``). Queries are encoded with the
collection's own encoder; ``where`` filters on metadata columns before ranking.
"""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever

from caselens.indexes.collection import Collection
from caselens.retrieval.rag.context import citation_key, item_kind
from caselens.retrieval.search import search


class CaselensRetriever(BaseRetriever):
    """Top-``k`` items of a caselens collection as LangChain documents."""

    collection: str  # collection name
    home: str | None = None  # caselens home folder (default: $CASELENS_HOME or ./caselens-data)
    k: int = 5  # documents per query
    where: str | None = None  # SQL filter on metadata columns

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        coll = Collection.open(self.collection, self.home)
        result = search(coll, text=query, k=self.k, where=self.where)
        docs = []
        for hit in result.hits:
            kind = item_kind(hit)
            meta: dict[str, Any] = {"id": hit.id, "score": hit.score, "rank": hit.rank, "key": citation_key(kind, hit),
                                    "kind": kind, "collection": coll.name, "source": hit.source, "label": hit.label,
                                    **hit.metadata}
            docs.append(Document(page_content=hit.text or "", metadata=meta))
        return docs

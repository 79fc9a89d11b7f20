"""Storage: LanceDB tables (the source of truth) and FAISS indexes derived from them."""

from typing import Any

__all__ = ["Collection", "IndexStamp", "default_home", "list_collections"]


def __getattr__(name: str) -> Any:
    # imported on first use, so worker processes that only write Lance fragments
    # (caselens.indexes.fragments) do not load LanceDB and FAISS
    if name in ("Collection", "default_home", "list_collections"):
        from caselens.indexes import collection

        return getattr(collection, name)
    if name == "IndexStamp":
        from caselens.indexes.faiss_index import IndexStamp

        return IndexStamp
    raise AttributeError(name)

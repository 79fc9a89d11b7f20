"""Storage: LanceDB tables (the source of truth) and FAISS indexes derived from them."""

from caselens.indexes.collection import Collection, default_home, list_collections
from caselens.indexes.faiss_index import IndexStamp

__all__ = ["Collection", "IndexStamp", "default_home", "list_collections"]

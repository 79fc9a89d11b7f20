"""Storage: LanceDB tables (the source of truth), reader snapshots, and the FAISS and BM25 indexes
derived from them. Import the modules you need (``caselens.indexes.collection``, ``.snapshot``,
``.reader``, ``.derived``); this package imports nothing itself, so light tools stay light."""

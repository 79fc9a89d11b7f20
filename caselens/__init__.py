"""caselens: retrieval engine for medical imaging.

The public API (see ``docs/api.md``)::

    import caselens
    col = caselens.open("cxr", home="caselens-data", create=True)
    col.ingest(manifest="manifest.csv")
    hits = col.search(image="query.png", k=10, exclude_same="patient_id")

The code lives in three subpackages installed from the repository's root folders:
``caselens.ingest`` (sources -> items, encoders), ``caselens.indexes`` (LanceDB tables, snapshots,
FAISS and BM25 indexes) and ``caselens.retrieval`` (search, answers, evaluation, CLI), with
:mod:`caselens.api` on top. The API is imported on first use, so that ``caselens --help`` and
the decoding worker processes do not pay for LanceDB, FAISS and torch.
"""

from typing import Any

__version__ = "0.2.0"
__all__ = ["Collection", "collections", "open"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from caselens import api

        return getattr(api, name)
    raise AttributeError(f"module 'caselens' has no attribute {name!r}")

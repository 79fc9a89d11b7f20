"""caselens: retrieval engine for medical imaging.

The code lives in three subpackages installed from the repository's root folders:
``caselens.ingest`` (sources -> items), ``caselens.indexes`` (LanceDB tables and FAISS indexes)
and ``caselens.retrieval`` (encoders, search, answers, evaluation, CLI).
"""

__version__ = "0.1.0"

"""The Lance library, imported once for every module of the storage layer without pandas.

``import lance`` imports ``pyarrow.dataset``, which would import pandas (~1 s of every cold
command) for nothing a search needs (:mod:`caselens.pandas_later`). Modules of ``indexes`` take
``lance`` from here: ``from caselens.indexes.lance_lib import lance``.
"""

from __future__ import annotations

from caselens.pandas_later import without_pandas

with without_pandas():
    import lance
    import lance.file
    import lance.fragment

__all__ = ["lance"]

"""Collection adaptation: projections of a collection's vectors fitted on its labelled items.

See :func:`~caselens.retrieval.adaptation.fit.fit_adapter` (arrays) and
:func:`~caselens.retrieval.adaptation.collection.fit_collection_adapter` (a collection); the
fitted :class:`~caselens.indexes.adapter.Adapter` is stored and applied by
:mod:`caselens.indexes.adapter`.
"""

"""Sources -> items: readers, de-identification, preprocessing and the ingest pipeline."""

from typing import Any

from caselens.ingest.items import Item, Rejection

__all__ = ["IngestReport", "Item", "Rejection", "ingest"]


def __getattr__(name: str) -> Any:
    # the pipeline (LanceDB, encoders) is imported on first use, so decoding worker processes,
    # which import only the readers, stay light
    if name in ("IngestReport", "ingest"):
        from caselens.ingest import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)

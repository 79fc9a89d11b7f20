"""Sources -> items: readers, de-identification, preprocessing and the ingest pipeline."""

from caselens.ingest.items import Item, Rejection
from caselens.ingest.pipeline import IngestReport, ingest

__all__ = ["IngestReport", "Item", "Rejection", "ingest"]

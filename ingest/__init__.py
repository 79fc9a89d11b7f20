"""Sources -> items: readers, de-identification, preprocessing, encoders and the ingest pipeline.

Import the modules you need (``caselens.ingest.runner`` for whole ingests,
``caselens.ingest.sources``, ``caselens.ingest.encoders``); this package imports nothing itself,
so decoding worker processes, which import only the readers, stay light."""

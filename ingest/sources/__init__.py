"""Readers that turn inputs into items: image folders (with DICOM), single DICOM files, text corpora."""

from caselens.ingest.sources.dicom import DicomReadError, is_dicom, read_dicom
from caselens.ingest.sources.image_folder import ImageSource
from caselens.ingest.sources.text_corpus import TextCorpusSource

__all__ = ["DicomReadError", "ImageSource", "TextCorpusSource", "is_dicom", "read_dicom"]

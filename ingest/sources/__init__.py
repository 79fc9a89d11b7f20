"""Readers that turn inputs into items: image folders (with DICOM), single DICOM files, text corpora, PDFs."""

from caselens.ingest.sources.dicom import DicomReadError, is_dicom, read_dicom
from caselens.ingest.sources.image_folder import ImageSource
from caselens.ingest.sources.pdf import PdfOptions, PdfSource
from caselens.ingest.sources.text_corpus import TextCorpusSource
from caselens.ingest.sources.text_folder import TextFolderSource

__all__ = ["DicomReadError", "ImageSource", "PdfOptions", "PdfSource", "TextCorpusSource", "TextFolderSource",
           "is_dicom", "read_dicom"]

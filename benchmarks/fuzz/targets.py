"""Fuzz targets: one function per reader, taking the bytes of one input file.

Each writes the bytes where the reader expects a file and reads it the way ingest does. A
target may end in items or in rejections with a reason (code and text); a whole source refused
with a :class:`caselens.errors.CaselensError` (e.g. a manifest without a ``path`` column) is a
rejection too. Any other exception, a hang past the time bound or running out of memory is a
crash. Used by ``harness.py`` (atheris) and by ``tests/test_fuzz.py``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from caselens.errors import CaselensError
from caselens.ingest.items import Item, Rejection

_DIR = Path(tempfile.mkdtemp(prefix="caselens-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
SECRET = b"fuzz-secret-of-32-bytes-for-keys"


def _write(name: str, data: bytes) -> Path:
    path = _DIR / name
    path.write_bytes(data)
    return path


def _check(results) -> int:
    """Every result is an item or a rejection with a reason; returns how many there were."""
    n = 0
    for r in results:
        n += 1
        if isinstance(r, Rejection):
            if not (r.reason_code and r.reason):
                raise AssertionError(f"rejection without a reason: {r!r}")
        elif not isinstance(r, Item):
            raise AssertionError(f"reader yielded {type(r).__name__}, not an item or a rejection")
    return n


def dicom(data: bytes) -> None:
    """A DICOM file as a PACS export reads it: its header scanned, then the export (of this one
    file) read into an instance item."""
    from caselens.ingest.dicom_scan import InstanceHeader, header_of
    from caselens.ingest.sources.dicom import DicomOptions
    from caselens.ingest.sources.dicom_source import DicomSource, DicomSourceConfig

    options = DicomOptions(timeout_s=10, max_decoded_bytes=64 << 20)
    folder = _DIR / "dicom"
    folder.mkdir(exist_ok=True)
    path = folder / "IM0001.dcm"
    path.write_bytes(data)
    header = header_of(path, "IM0001.dcm", SECRET, options)
    if not isinstance(header, InstanceHeader):
        _check([header])
    _check(DicomSource(folder, SECRET, DicomSourceConfig(options=options)))


def dicomdir(data: bytes) -> None:
    """A DICOMDIR index: the files it lists."""
    from caselens.ingest.dicom_scan import walk_inputs

    path = _write("DICOMDIR", data)
    try:
        entries = list(walk_inputs(path))
    except CaselensError:
        return
    for entry in entries:
        if not isinstance(entry, (Rejection, tuple)):
            raise AssertionError(f"DICOMDIR walk yielded {entry!r}")


def image(data: bytes) -> None:
    """An image file (PNG, JPEG, TIFF... found by content) in an image folder."""
    from caselens.ingest.sources.image_folder import ImageSource

    path = _write("img.png", data)
    _check([ImageSource(_DIR, secret=SECRET).read(path, {})])


def pdf(data: bytes) -> None:
    """A PDF read into chunk items (text layer; OCR off: it is the PDF parser under test)."""
    from caselens.ingest.sources.pdf import PdfOptions, PdfSource

    folder = _DIR / "pdf"
    folder.mkdir(exist_ok=True)
    (folder / "doc.pdf").write_bytes(data)
    _check(PdfSource(folder / "doc.pdf", PdfOptions(ocr=False, max_pages=50)))


def manifest(data: bytes) -> None:
    """An image manifest (CSV) next to one real image."""
    from caselens.ingest.sources.image_folder import ImageSource, ImageSourceConfig

    folder = _DIR / "manifest"
    if not (folder / "a.png").exists():
        from PIL import Image

        folder.mkdir(exist_ok=True)
        Image.new("L", (8, 8), 7).save(folder / "a.png")
    (folder / "manifest.csv").write_bytes(data)
    try:
        source = ImageSource(manifest=folder / "manifest.csv", secret=SECRET,
                             config=ImageSourceConfig(max_row_bytes=64 << 10, max_manifest_rows=1000))
    except CaselensError:
        return
    _check(source)


def jsonl(data: bytes) -> None:
    """A JSONL text corpus."""
    from caselens.ingest.sources.text_corpus import TextCorpusConfig, TextCorpusSource

    path = _write("corpus.jsonl", data)
    _check(TextCorpusSource(path, config=TextCorpusConfig(max_row_bytes=64 << 10, max_text_chars=32 << 10)))


def csv_corpus(data: bytes) -> None:
    """A CSV text corpus."""
    from caselens.ingest.sources.text_corpus import TextCorpusConfig, TextCorpusSource

    path = _write("corpus.csv", data)
    try:
        source = TextCorpusSource(path, config=TextCorpusConfig(max_row_bytes=64 << 10, max_text_chars=32 << 10))
        _check(source)
    except CaselensError:
        return


TARGETS: dict[str, Callable[[bytes], None]] = {
    "dicom": dicom, "dicomdir": dicomdir, "image": image, "pdf": pdf, "manifest": manifest, "jsonl": jsonl,
    "csv": csv_corpus}
READERS = {"dicom": ("dicom", "dicomdir"), "image": ("image",), "pdf": ("pdf",),
           "manifest": ("manifest", "jsonl", "csv")}  # reader family -> targets


def any_target(data: bytes) -> None:
    """Every target in one: the first byte picks it (one process fuzzes them all, for short runs)."""
    if not data:
        return
    names = sorted(TARGETS)
    TARGETS[names[data[0] % len(names)]](data[1:])

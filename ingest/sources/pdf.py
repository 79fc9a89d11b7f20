"""PDF documents (textbooks, guidelines) as page items or as text chunks pointing to their page.

Each page is read with pypdfium2 (PDFium): its text layer is extracted, and a page whose text
layer is empty (a scanned or image-only page) is rendered and read by OCR (rapidocr-onnxruntime,
whose models ship inside the wheel, so it runs offline) and marked ``ocr``. Two views:

* ``items="chunks"`` (text collections): the page text is split by the encoder's tokenizer
  (:mod:`caselens.ingest.chunking`) into chunk items ``<doc id>#p<page>#c<n>``, each naming its
  page (``page``, ``page_id``, ``parent_id``), its document title and the figures it mentions;
* ``items="pages"`` (image collections, CLIP-style models): one item ``<doc id>#p<page>`` per page,
  the page rendered at ``dpi`` as its image and its text beside it, so an image query finds pages
  with similar figures and a text query reaches page images through a text tower.

Document ids are content hashes, so ingesting the same PDF again adds nothing. Encrypted,
broken, empty and non-PDF files, and pages with no text that OCR cannot read, are rejected with
a reason.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from caselens.errors import SourceError
from caselens.ingest.chunking import Chunker, figure_labels
from caselens.ingest.items import Item, Rejection, content_id, sha256_file

log = logging.getLogger(__name__)

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


@dataclass(frozen=True)
class PdfOptions:
    """How PDF pages are read."""

    items: str = "chunks"  # "chunks": text chunks pointing to their page; "pages": one image item per page
    dpi: int = 100  # resolution pages are rendered at (page items, OCR)
    ocr: bool = True  # OCR pages without a text layer (needs rapidocr-onnxruntime)
    min_text_chars: int = 16  # a text layer shorter than this (non-space characters) counts as none


def clean_page_text(raw: str) -> str:
    """PDF text with line ends normalised, soft hyphens at line ends joined, control characters gone."""
    text = raw.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[\x02\xad]\n?", "", text)  # PDFium marks hyphenation points with \x02
    text = _CONTROL.sub(" ", text)
    text = re.sub(r"[ \t\u00a0]+", " ", text)
    return "\n".join(line.strip() for line in text.split("\n")).strip()


class _Ocr:
    """Lazy rapidocr engine; ``available`` False when the package is not installed."""

    def __init__(self) -> None:
        self._engine: Any = None
        self.available = True
        self.error = ""

    def read(self, image: Image.Image) -> str:
        if self._engine is None:
            try:
                from rapidocr_onnxruntime import RapidOCR
            except ImportError as exc:
                self.available, self.error = False, str(exc)
                raise
            self._engine = RapidOCR()
        import numpy as np

        result, _ = self._engine(np.asarray(image.convert("RGB")))
        lines = [str(r[1]).strip() for r in (result or []) if str(r[1]).strip()]
        return "\n".join(lines)


_OCR = _Ocr()


def render_page(page: Any, dpi: int) -> Image.Image:
    """A PDFium page rendered at ``dpi`` as an RGB image (as page items and OCR see it)."""
    return page.render(scale=dpi / 72).to_pil().convert("RGB")


class PdfSource:
    """PDF files (one file, or every file under a folder) as chunk items or page items."""

    def __init__(self, path: Path, options: PdfOptions | None = None, chunker: Chunker | None = None):
        self.options = options or PdfOptions()
        if self.options.items not in ("chunks", "pages"):
            raise SourceError(f"PDF items must be 'chunks' or 'pages', not {self.options.items!r}")
        if not 36 <= self.options.dpi <= 600:
            raise SourceError(f"PDF dpi {self.options.dpi} is out of range; use 36-600")
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise SourceError(f"--pdf {path}: no such file or folder")
        self.root = self.path if self.path.is_dir() else self.path.parent
        self.chunker = chunker
        self.kind = "text" if self.options.items == "chunks" else "image"

    def files(self) -> list[Path]:
        """The files this source reads: the PDF given, or every non-hidden file under the folder."""
        if self.path.is_file():
            return [self.path]
        return sorted(p for p in self.path.rglob("*") if p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(self.path).parts))

    def input_record(self) -> dict[str, Any]:
        """The folder its items' files are relative to, and the rendering resolution, for the
        collection's local inputs file (:mod:`caselens.ingest.inputs`; never an index column)."""
        return {"kind": "pdf", "root": str(self.root.resolve()), "items": self.options.items,
                "dpi": self.options.dpi}

    def estimate(self) -> int | None:
        return None  # pages and chunks per file are known only once read

    def __iter__(self) -> Iterator[Item | Rejection]:
        for part in self.parts():
            yield from self.read_part(part)

    def parts(self, size: int = 0) -> list[dict[str, Any]]:
        """The files in order, one per group when ``size`` is given (a PDF is many pages), else all
        in one group, for :meth:`read_part`."""
        files = [str(p) for p in self.files()]
        if not files:
            return [{"reject": (str(self.path), "empty_source", "the folder holds no files; point --pdf at PDFs")}]
        return [{"files": [f]} for f in files] if size else [{"files": files}]

    def read_part(self, part: dict[str, Any]) -> Iterator[Item | Rejection]:
        """Items and rejections of one group of :meth:`parts`, in order."""
        if "reject" in part:
            yield Rejection(*part["reject"])
        for name in part.get("files", ()):
            yield from self._read_file(Path(name))

    def part_reader(self) -> "PdfSource":
        """A copy that reads parts, without its chunker (set ``chunker`` on it where it runs)."""
        reader = copy.copy(self)
        reader.chunker = None
        return reader

    # ------------------------------------------------------------------ files
    def _read_file(self, file: Path) -> Iterator[Item | Rejection]:
        import pypdfium2 as pdfium

        rel = str(file.relative_to(self.root))
        with file.open("rb") as fh:
            head = fh.read(1024)
        if not head:
            yield Rejection(rel, "empty_file", "the file is empty")
            return
        if b"%PDF-" not in head:
            yield Rejection(rel, "not_a_pdf", "the file has no PDF header; only PDF files are read by --pdf")
            return
        try:
            doc = pdfium.PdfDocument(str(file))
        except pdfium.PdfiumError as exc:
            if "password" in str(exc).lower():
                yield Rejection(rel, "encrypted_pdf", "the PDF is encrypted with a password; decrypt it "
                                "(e.g. `qpdf --decrypt`) and ingest the copy")
            else:
                yield Rejection(rel, "corrupt_pdf", f"PDFium cannot open the file ({exc}); it is damaged "
                                "or not a PDF")
            return
        try:
            n_pages = len(doc)
            if n_pages == 0:
                yield Rejection(rel, "empty_pdf", "the PDF has no pages")
                return
            sha = sha256_file(file)
            doc_id = content_id(sha)
            meta = doc.get_metadata_dict() if hasattr(doc, "get_metadata_dict") else {}
            title = (meta.get("Title") or "").strip() or file.stem
            for index in range(n_pages):
                yield from self._read_page(doc, index, rel, doc_id, sha, title)
        finally:
            doc.close()

    def _render(self, page: Any) -> Image.Image:
        return render_page(page, self.options.dpi)

    def _read_page(self, doc: Any, index: int, rel: str, doc_id: str, sha: str,
                   title: str) -> Iterator[Item | Rejection]:
        number = index + 1
        ref = f"{rel}#page={number}"
        try:
            page = doc[index]
            textpage = page.get_textpage()
            text = clean_page_text(textpage.get_text_bounded())
            textpage.close()
            image = self._render(page) if (self.options.items == "pages" or
                                           self._too_short(text)) else None
            page.close()
        except Exception as exc:  # PDFium raises various errors on a damaged page
            yield Rejection(ref, "corrupt_page", f"page {number} cannot be read ({type(exc).__name__}: {exc})")
            return
        ocr = False
        if self._too_short(text):
            if not self.options.ocr:
                yield Rejection(ref, "no_text", f"page {number} has no text layer and OCR is off")
                return
            try:
                text = clean_page_text(_OCR.read(image))
            except ImportError:
                yield Rejection(ref, "no_text", f"page {number} has no text layer and OCR is not installed "
                                "(pip install rapidocr-onnxruntime)")
                return
            ocr = True
            if self._too_short(text):
                yield Rejection(ref, "empty_page", f"page {number} has no text layer and OCR found no text "
                                "(blank or figure-only page)")
                return
        page_id = f"{doc_id}#p{number}"
        metadata: dict[str, Any] = {"document": title, "page": number, "page_id": page_id, "ocr": int(ocr)}
        provenance: dict[str, Any] = {"file": rel, "sha256": sha, "page": number, "ocr": ocr,
                                      "reader": "pypdfium2"}
        if self.options.items == "pages":
            figs = figure_labels(text)
            yield Item(id=page_id, kind="image", input=ref, source=ref, image=image, text=text,
                       metadata={**metadata, "parent_id": doc_id, "figures": "; ".join(figs) or None},
                       provenance={**provenance, "dpi": self.options.dpi, "size": list(image.size)})
            return
        if self.chunker is None:
            yield Item(id=f"{page_id}#c0", kind="text", input=f"{ref}#chunk=0", source=ref, text=text,
                       metadata={**metadata, "parent_id": page_id, "chunk": 0,
                                 "figures": "; ".join(figure_labels(text)) or None},
                       provenance=provenance)
            return
        chunking = self.chunker.config.to_record()
        for chunk in self.chunker.split(text):
            yield Item(id=f"{page_id}#c{chunk.index}", kind="text", input=f"{ref}#chunk={chunk.index}",
                       source=ref, text=chunk.text,
                       metadata={**metadata, "parent_id": page_id, "chunk": chunk.index,
                                 "figures": "; ".join(figure_labels(chunk.text)) or None},
                       provenance={**provenance, "chunk": {"index": chunk.index, "start": chunk.start,
                                                           "end": chunk.end, "tokens": chunk.tokens,
                                                           "cut": chunk.cut},
                                   "chunking": chunking})

    def _too_short(self, text: str) -> bool:
        return sum(not c.isspace() for c in text) < self.options.min_text_chars

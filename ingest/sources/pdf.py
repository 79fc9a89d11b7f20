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
a reason; so are files over the bounds of :class:`PdfOptions` (``too_large`` bytes,
``too_many_pages``) and pages with more text than ``max_page_chars`` (``too_long``).
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from caselens.errors import ConfigError, SourceError
from caselens.ingest.chunking import Chunker, figure_labels
from caselens.ingest.items import Item, Rejection, content_id, sha256_file
from caselens.ingest.source_paths import PathNamer, check_mode
from caselens.ingest.walk import check_file, file_entries, read_entries, walk_files

log = logging.getLogger(__name__)

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


@dataclass(frozen=True)
class PdfOptions:
    """How PDF pages are read."""

    items: str = "chunks"  # "chunks": text chunks pointing to their page; "pages": one image item per page
    dpi: int = 100  # resolution pages are rendered at (page items, OCR)
    ocr: bool = True  # OCR pages without a text layer (needs rapidocr-onnxruntime)
    min_text_chars: int = 16  # a text layer shorter than this (non-space characters) counts as none
    max_file_bytes: int = 1 << 30  # PDF files larger than this are not opened (too_large)
    max_pages: int = 10_000  # PDFs with more pages are rejected whole (too_many_pages)
    max_page_chars: int = 200_000  # a page whose text layer is longer is rejected (too_long)
    source_paths: str | None = None  # "relative" | "hashed" | "none"; None: the collection's (see source_paths)

    def __post_init__(self) -> None:
        if self.items not in ("chunks", "pages"):
            raise SourceError(f"PDF items must be 'chunks' or 'pages', not {self.items!r}")
        if not 36 <= self.dpi <= 600:
            raise SourceError(f"PDF dpi {self.dpi} is out of range; use 36-600")
        for name in ("max_file_bytes", "max_pages", "max_page_chars"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        check_mode(self.source_paths)


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
        self.paths = PathNamer()  # how files are named in the collection; set for it by the runner
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise SourceError(f"--pdf {path}: no such file or folder")
        self.root = self.path if self.path.is_dir() else self.path.parent
        self.chunker = chunker
        self.kind = "text" if self.options.items == "chunks" else "image"

    @property
    def source_paths(self) -> str | None:
        return self.options.source_paths

    pseudonymised_patients = False  # textbooks and guidelines

    def _entries(self) -> list[tuple[Path, str] | Rejection]:
        if self.path.is_dir():
            return list(walk_files(self.path, base=self.root))
        problem = check_file(self.path, self.path.name)
        return [problem if problem is not None else (self.path, self.path.name)]

    def files(self) -> list[Path]:
        """The files this source reads: the PDF given, or every non-hidden regular file under the
        folder (symlinks are rejected, not followed)."""
        return [e[0] for e in self._entries() if not isinstance(e, Rejection)]

    def input_record(self) -> dict[str, Any]:
        """The folder its items' files are relative to, and the rendering resolution, for the
        collection's local inputs file (:mod:`caselens.ingest.inputs`; never an index column).
        For a ``hashed`` collection, the hash -> relative path map of its files."""
        if self.paths.mode == "hashed":
            for entry in self._entries():
                if not isinstance(entry, Rejection):
                    self.paths.name(entry[1])
        return {"kind": "pdf", "root": str(self.root.resolve()), "items": self.options.items,
                "dpi": self.options.dpi, "ocr": self.options.ocr,
                "file": self.path.name if self.path.is_file() else None, **self.paths.record()}

    def estimate(self) -> int | None:
        return None  # pages and chunks per file are known only once read

    def __iter__(self) -> Iterator[Item | Rejection]:
        for part in self.parts():
            yield from self.read_part(part)

    def parts(self, size: int = 0) -> list[dict[str, Any]]:
        """The files in order (and the rejections of the walk), one per group when ``size`` is
        given (a PDF is many pages), else all in one group, for :meth:`read_part`."""
        entries = file_entries(self._entries(), "the folder holds no files; point --pdf at PDFs")
        return [{"inputs": [e]} for e in entries] if size else [{"inputs": entries}]

    def read_part(self, part: dict[str, Any]) -> Iterator[Item | Rejection]:
        """Items and rejections of one group of :meth:`parts`, in order."""
        yield from read_entries(part.get("inputs", ()), self._read_file, self.paths.name)

    def part_reader(self) -> "PdfSource":
        """A copy that reads parts, without its chunker (set ``chunker`` on it where it runs) and
        without the collection's key (its path naming takes the key where it runs)."""
        reader = copy.copy(self)
        reader.chunker, reader.paths = None, self.paths.without_secret()
        return reader

    # ------------------------------------------------------------------ files
    def _read_file(self, file: Path, rel: str) -> Iterator[Item | Rejection]:
        import pypdfium2 as pdfium

        name = self.paths.name(rel)
        try:
            size = file.stat().st_size
            with file.open("rb") as fh:
                head = fh.read(1024)
        except OSError as exc:
            yield Rejection(name, "unreadable", f"cannot read file: {exc.strerror or exc}")
            return
        if size > self.options.max_file_bytes:
            yield Rejection(name, "too_large", f"file is {size / 2**20:.0f} MiB (limit "
                                               f"{self.options.max_file_bytes / 2**20:.0f} MiB)")
            return
        rel, source = name, self.paths.source(rel)  # from here on the file goes by its stored name
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
            if n_pages > self.options.max_pages:
                yield Rejection(rel, "too_many_pages", f"the PDF has {n_pages} pages, more than the limit of "
                                f"{self.options.max_pages}; split it")
                return
            sha = sha256_file(file)
            doc_id = content_id(sha)
            meta = doc.get_metadata_dict() if hasattr(doc, "get_metadata_dict") else {}
            title = (str(meta.get("Title") or "")).strip()[:300] or \
                (file.stem if self.paths.mode == "relative" else rel)
            for index in range(n_pages):
                yield from self._read_page(doc, index, rel, source, doc_id, sha, title)
        finally:
            doc.close()

    def _render(self, page: Any) -> Image.Image:
        return render_page(page, self.options.dpi)

    def _read_page(self, doc: Any, index: int, rel: str, source: str | None, doc_id: str, sha: str,
                   title: str) -> Iterator[Item | Rejection]:
        number = index + 1
        ref = f"{rel}#page={number}"
        shown = f"{source}#page={number}" if source else None  # the items' source
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
        if len(text) > self.options.max_page_chars:
            yield Rejection(ref, "too_long", f"page {number} has {len(text)} characters of text, more than the "
                            f"limit of {self.options.max_page_chars}")
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
        provenance: dict[str, Any] = {"file": source, "sha256": sha, "page": number, "ocr": ocr,
                                      "reader": "pypdfium2"}
        if self.options.items == "pages":
            figs = figure_labels(text)
            yield Item(id=page_id, kind="image", input=ref, source=shown, image=image, text=text,
                       metadata={**metadata, "parent_id": doc_id, "figures": "; ".join(figs) or None},
                       provenance={**provenance, "dpi": self.options.dpi, "size": list(image.size)})
            return
        if self.chunker is None:
            yield Item(id=f"{page_id}#c0", kind="text", input=f"{ref}#chunk=0", source=shown, text=text,
                       metadata={**metadata, "parent_id": page_id, "chunk": 0,
                                 "figures": "; ".join(figure_labels(text)) or None},
                       provenance=provenance)
            return
        chunking = self.chunker.config.to_record()
        for chunk in self.chunker.split(text):
            yield Item(id=f"{page_id}#c{chunk.index}", kind="text", input=f"{ref}#chunk={chunk.index}",
                       source=shown, text=chunk.text,
                       metadata={**metadata, "parent_id": page_id, "chunk": chunk.index,
                                 "figures": "; ".join(figure_labels(chunk.text)) or None},
                       provenance={**provenance, "chunk": {"index": chunk.index, "start": chunk.start,
                                                           "end": chunk.end, "tokens": chunk.tokens,
                                                           "cut": chunk.cut},
                                   "chunking": chunking})

    def _too_short(self, text: str) -> bool:
        return sum(not c.isspace() for c in text) < self.options.min_text_chars

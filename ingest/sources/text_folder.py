"""Folders of plain-text and Markdown files (``.txt``, ``.md``, ``.markdown``) as text items.

Each file is one document with a content-hash id (so a re-ingest adds nothing, whatever the file
is called), its title (the first Markdown heading, else the file name) as ``document``, and its
path relative to the folder as ``source``. With a chunker, a file longer than the chunk size
becomes chunk items ``<id>#c<n>`` whose ``parent_id`` names the file's id. Files that are not
UTF-8 text, are empty, or have another suffix are rejected with a reason.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterator

from caselens.errors import SourceError
from caselens.ingest.chunking import Chunker, chunk_item
from caselens.ingest.items import Item, Rejection, content_id, sha256_file

SUFFIXES = (".txt", ".md", ".markdown")


class TextFolderSource:
    """Every non-hidden file under ``root``: text and Markdown files become (chunked) text items."""

    kind = "text"

    def __init__(self, root: Path, chunker: Chunker | None = None):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise SourceError(f"text folder {root} does not exist or is not a folder")
        self.chunker = chunker

    def files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*") if p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(self.root).parts))

    def estimate(self) -> int | None:
        return len(self.files())

    def __iter__(self) -> Iterator[Item | Rejection]:
        for part in self.parts():
            yield from self.read_part(part)

    def parts(self, size: int = 0) -> list[dict[str, Any]]:
        """The files in order, in groups of ``size`` (0: one group), for :meth:`read_part`."""
        files = [str(p) for p in self.files()]
        if not files:
            return [{"reject": (str(self.root), "empty_source", "the folder holds no files")}]
        return [{"files": files[i:i + size]} for i in range(0, len(files), size)] if size else [{"files": files}]

    def read_part(self, part: dict[str, Any]) -> Iterator[Item | Rejection]:
        """Items (chunked) and rejections of one group of :meth:`parts`, in order."""
        if "reject" in part:
            yield Rejection(*part["reject"])
        for name in part.get("files", ()):
            path = Path(name)
            rel = str(path.relative_to(self.root))
            if path.suffix.lower() not in SUFFIXES:
                yield Rejection(rel, "not_text", f"only {', '.join(SUFFIXES)} files are read from a text folder")
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                yield Rejection(rel, "not_utf8", "the file is not UTF-8 text; convert it (e.g. iconv) and retry")
                continue
            if not text.strip():
                yield Rejection(rel, "empty_text", "the file holds no text")
                continue
            heading = re.search(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE)
            item = Item(id=content_id(sha256_file(path)), kind="text", input=rel, source=rel, text=text.strip(),
                        metadata={"document": heading.group(1) if heading else path.stem},
                        provenance={"file": rel, "sha256": sha256_file(path)})
            yield from chunk_item(item, self.chunker)

    def part_reader(self) -> "TextFolderSource":
        """A copy that reads parts, without its chunker (set ``chunker`` on it where it runs)."""
        reader = copy.copy(self)
        reader.chunker = None
        return reader

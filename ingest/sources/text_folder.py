"""Folders of plain-text and Markdown files (``.txt``, ``.md``, ``.markdown``) as text items.

Each file is one document with a content-hash id (so a re-ingest adds nothing, whatever the file
is called), its title (the first Markdown heading, else the file name) as ``document``, and its
path relative to the folder as ``source``. With a chunker, a file longer than the chunk size
becomes chunk items ``<id>#c<n>`` whose ``parent_id`` names the file's id. Files that are not
UTF-8 text, are empty, have another suffix, or exceed the bounds of :class:`TextFolderConfig`
(``too_large`` before reading, ``too_long`` in characters) are rejected with a reason; symlinks
are not followed (``symlink``).
"""

from __future__ import annotations

import copy
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from caselens.errors import ConfigError, SourceError
from caselens.ingest.chunking import Chunker, chunk_item
from caselens.ingest.items import Item, Rejection, content_id
from caselens.ingest.source_paths import PathNamer, check_mode
from caselens.ingest.walk import file_entries, read_entries, walk_files

SUFFIXES = (".txt", ".md", ".markdown")


@dataclass(frozen=True)
class TextFolderConfig:
    """Bounds on the files of a text folder, and how they are named in the collection."""

    max_file_bytes: int = 8 << 20  # files larger than this are not read (too_large)
    max_text_chars: int = 1_000_000  # characters of one file's text (about a 400-page book); longer: too_long
    source_paths: str | None = None  # "relative" | "hashed" | "none"; None: the collection's (see source_paths)

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_text_chars"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        check_mode(self.source_paths)


_HEADING = re.compile(r"^#{1,6}[ \t]+([^\n]{1,300})", re.MULTILINE)  # bounded: no backtracking on long lines


def heading(text: str) -> str | None:
    """The first Markdown heading of ``text`` (at most 300 characters), or None."""
    found = _HEADING.search(text)
    title = found.group(1).rstrip().rstrip("#").rstrip() if found else ""
    return title or None


class TextFolderSource:
    """Every non-hidden file under ``root``: text and Markdown files become (chunked) text items."""

    kind = "text"
    pseudonymised_patients = False

    def __init__(self, root: Path, chunker: Chunker | None = None, config: TextFolderConfig | None = None):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise SourceError(f"text folder {root} does not exist or is not a folder")
        self.chunker = chunker
        self.config = config or TextFolderConfig()
        self.paths = PathNamer()  # how files are named in the collection; set for it by the runner

    @property
    def source_paths(self) -> str | None:
        return self.config.source_paths

    def input_record(self) -> dict[str, Any]:
        """The folder, for the collection's local inputs file (:mod:`caselens.ingest.inputs`: how
        ``verify --repair --reingest`` reads it again)."""
        if self.paths.mode == "hashed":  # the hash -> path map of every file it will read
            for entry in walk_files(self.root):
                if not isinstance(entry, Rejection):
                    self.paths.name(entry[1])
        return {"kind": "text", "root": str(self.root.resolve()), "file": None, **self.paths.record()}

    def files(self) -> list[Path]:
        """The regular files this source reads (symlinks and special files are rejected instead)."""
        return [e[0] for e in walk_files(self.root) if not isinstance(e, Rejection)]

    def estimate(self) -> int | None:
        return sum(1 for _ in walk_files(self.root))

    def __iter__(self) -> Iterator[Item | Rejection]:
        for part in self.parts():  # one walk; each file read as it comes
            yield from self.read_part(part)

    def parts(self, size: int = 0) -> list[dict[str, Any]]:
        """The files in order (and the rejections of the walk), in groups of ``size`` (0: one
        group), for :meth:`read_part`."""
        inputs = file_entries(walk_files(self.root), "the folder holds no files")
        return [{"inputs": inputs[i:i + size]} for i in range(0, len(inputs), size)] if size else [{"inputs": inputs}]

    def read_part(self, part: dict[str, Any]) -> Iterator[Item | Rejection]:
        """Items (chunked) and rejections of one group of :meth:`parts`, in order."""
        yield from read_entries(part.get("inputs", ()), self._read, self.paths.name)

    def part_reader(self) -> "TextFolderSource":
        """A copy that reads parts, without its chunker (set ``chunker`` on it where it runs) and
        without the collection's key (its path naming takes the key where it runs)."""
        reader = copy.copy(self)
        reader.chunker, reader.paths = None, self.paths.without_secret()
        return reader

    def _read(self, path: Path, rel: str) -> Iterator[Item | Rejection]:
        name = self.paths.name(rel)
        if path.suffix.lower() not in SUFFIXES:
            yield Rejection(name, "not_text", f"only {', '.join(SUFFIXES)} files are read from a text folder")
            return
        try:
            size = path.stat().st_size
            if size > self.config.max_file_bytes:
                yield Rejection(name, "too_large", f"file is {size} bytes, more than the limit of "
                                                   f"{self.config.max_file_bytes}; split it")
                return
            with path.open("rb") as fh:
                data = fh.read(self.config.max_file_bytes + 1)  # the file may have grown since
        except OSError as exc:
            yield Rejection(name, "unreadable", f"cannot read file: {exc.strerror or exc}")
            return
        if len(data) > self.config.max_file_bytes:
            yield Rejection(name, "too_large", f"file is more than the limit of {self.config.max_file_bytes} bytes")
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            yield Rejection(name, "not_utf8", "the file is not UTF-8 text; convert it (e.g. iconv) and retry")
            return
        if not text.strip():
            yield Rejection(name, "empty_text", "the file holds no text")
            return
        if len(text) > self.config.max_text_chars:
            yield Rejection(name, "too_long", f"the file has {len(text)} characters, more than the limit of "
                                              f"{self.config.max_text_chars}; split it")
            return
        sha = hashlib.sha256(data).hexdigest()
        source = self.paths.source(rel)
        title = heading(text) or (path.stem if self.paths.mode == "relative" else name)
        item = Item(id=content_id(sha), kind="text", input=name, source=source, text=text.strip(),
                    metadata={"document": title},
                    provenance={"file": source, "sha256": sha})
        yield from chunk_item(item, self.chunker)

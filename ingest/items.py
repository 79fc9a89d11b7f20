"""What sources yield: an :class:`Item` to store or a :class:`Rejection` with its reason."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

from PIL import Image

from caselens.files import sha256_file  # noqa: F401  (re-exported: sources hash their inputs with it)


@dataclass
class Item:
    """One unit of retrieval: an image or a text, with de-identified metadata and provenance."""

    id: str  # stable id: content hash for files, the corpus id for texts
    kind: str  # "image" or "text"
    input: str  # what the ledger calls this input (path relative to the source root, file:line)
    source: str  # where it came from, shown in results (relative path or corpus file)
    image: Image.Image | None = None  # payload of image items (RGB or L, 8-bit)
    text: str | None = None  # payload of text items
    metadata: dict[str, Any] = field(default_factory=dict)  # de-identified; becomes table columns
    provenance: dict[str, Any] = field(default_factory=dict)  # file, hash, frame, window, reader...
    volume: Any = None  # a caselens.ingest.volumes.Volume: slices embedded and pooled into one vector
    members: list[str] = field(default_factory=list)  # inputs this item was built from (one ledger row each)


@dataclass(frozen=True)
class Rejection:
    """An input that could not become an item, and why."""

    input: str  # path relative to the source root, or file:line for corpora
    reason_code: str  # short code: missing_file, corrupt_image, not_an_image, empty_source, ...
    reason: str  # what was wrong and what to do about it


class Source(Protocol):
    """Anything that yields items and rejections for one ingest run."""

    kind: str  # "image" or "text": what its items are

    def estimate(self) -> int | None:
        """Roughly how many inputs there are (for the progress bar); None when unknown."""

    def __iter__(self) -> Iterator[Item | Rejection]:
        """Every input, ending as an item or a rejection; never silently skipped."""


def content_id(sha256_hex: str) -> str:
    """Item id of a file with this content hash."""
    return f"sha256:{sha256_hex[:32]}"

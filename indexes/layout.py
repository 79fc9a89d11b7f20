"""Every file of a collection, named in one place.

A collection is the folder ``<home>/<name>/``::

    lance/items.lance    the items table: ids, vectors, metadata, provenance (the source of truth)
    lance/ledger.lance   every input of every ingest run and its outcome
    faiss/               the derived FAISS index and its stamp (index.faiss, index.json)
    bm25/                the derived BM25 index and its stamp
    adapter/             a fitted projection of the vectors (JSON record + .npy arrays)
    cache/images/        renderings of items (DICOM frames, PDF pages) for viewers and VLMs
    inputs.json          where each ingest run read its files (local, never an index column)
    secret.key           the pseudonym key (mode 0600; never printed, never in a table)
    state.json           facts only writers keep (the next free row number)
    damaged/             files ``verify --repair`` set aside (never deleted)
    .lock                the write lock (flock)

Other modules ask a :class:`Layout` for paths; none spells a file name of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ITEMS = "items"  # LanceDB table names
LEDGER = "ledger"


@dataclass(frozen=True)
class Layout:
    """The paths of the collection whose folder is ``root``."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def lance_dir(self) -> Path:
        """The LanceDB database folder (items and ledger tables)."""
        return self.root / "lance"

    @property
    def items_dir(self) -> Path:
        return self.lance_dir / f"{ITEMS}.lance"

    @property
    def ledger_dir(self) -> Path:
        return self.lance_dir / f"{LEDGER}.lance"

    @property
    def versions_dir(self) -> Path:
        """Where Lance keeps the items table's manifests, one per version."""
        return self.items_dir / "_versions"

    @property
    def faiss_dir(self) -> Path:
        return self.root / "faiss"

    @property
    def bm25_dir(self) -> Path:
        return self.root / "bm25"

    @property
    def adapter_dir(self) -> Path:
        return self.root / "adapter"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def image_cache_dir(self) -> Path:
        return self.cache_dir / "images"

    @property
    def inputs_file(self) -> Path:
        return self.root / "inputs.json"

    @property
    def secret_file(self) -> Path:
        return self.root / "secret.key"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def damaged_dir(self) -> Path:
        """Where ``verify --repair`` moves files it cannot use (manifests that do not decode):
        kept, never deleted."""
        return self.root / "damaged"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    def exists(self) -> bool:
        """Whether a collection lives here: its items table has a committed version (a writer
        killed while creating it leaves a folder without one, which ``create`` may reuse)."""
        return self.items_dir.is_dir() and any(self.versions_dir.glob("*.manifest"))

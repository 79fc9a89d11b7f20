"""BM25 (bm25s) keyword index derived from a collection's text column, beside the FAISS index.

Like the FAISS index it is a cache: built from one table version, stamped with that version, the
tokenizer settings and a checksum of every file, written to a temporary folder and swapped into
place, rebuilt when stale or damaged. Documents are keyed by the table's ``_row`` numbers, so
BM25 and dense rankings name the same items and can be fused.

Layout (the folder is ``Layout.bm25_dir``, ``<collection>/bm25/``): it holds bm25s' own files (sparse score matrix as ``.npy``, vocabulary
and parameters as JSON; read without pickle), ``rows.npy`` (the ``_row`` of each document) and
``stamp.json`` written last.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from caselens.errors import IndexIntegrityError
from caselens.files import sha256_file

log = logging.getLogger(__name__)

STAMP_FILE = "stamp.json"
ROWS_FILE = "rows.npy"
FORMAT = 1


@dataclass(frozen=True)
class Bm25Settings:
    """How texts are turned into BM25 terms; part of the stamp (a change rebuilds the index)."""

    stopwords: str = "en"  # bm25s stop-word list ("en") or "" for none
    stemmer: str = "english"  # Snowball stemmer language (PyStemmer) or "" for none
    k1: float = 1.5  # term-frequency saturation
    b: float = 0.75  # length normalisation


@dataclass(frozen=True)
class Bm25Stamp:
    """What a BM25 index was built from; ``stamp.json`` beside its files."""

    table_version: int  # items table version the texts were read from
    n_docs: int  # documents (rows with text) indexed
    settings: dict[str, Any]  # Bm25Settings as a dict
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    format: int = FORMAT  # layout version of this folder
    seconds: float = 0.0  # build time


def _bm25s() -> Any:
    """The bm25s module, with its logger (which it sets to DEBUG) brought back to warnings."""
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


def _stemmer(settings: Bm25Settings) -> Any:
    if not settings.stemmer:
        return None
    import Stemmer  # PyStemmer

    return Stemmer.Stemmer(settings.stemmer)


class Bm25Index:
    """A loaded BM25 index: rank rows by keyword relevance, optionally within allowed rows."""

    def __init__(self, model: Any, rows: np.ndarray, stamp: Bm25Stamp):
        self.model = model
        self.rows = rows  # _row of document i
        self.stamp = stamp
        self.settings = Bm25Settings(**stamp.settings)
        self._stem = _stemmer(self.settings)
        self._position: dict[int, int] | None = None

    def _query_ids(self, text: str) -> list[int]:
        tokens = _bm25s().tokenize([text], stopwords=self.settings.stopwords or None, stemmer=self._stem,
                                return_ids=False, show_progress=False)
        return self.model.get_tokens_ids(list(tokens[0]))

    def search(self, text: str, k: int, allowed_rows: np.ndarray | None = None) -> list[tuple[float, int]]:
        """Top ``k`` (score, row) for ``text``; rows outside ``allowed_rows`` never rank. Rows with no
        query term (score 0) are left out, so fewer than ``k`` may come back."""
        if not len(self.rows) or k < 1:
            return []
        ids = self._query_ids(text)
        if not ids:
            return []
        scores = np.asarray(self.model.get_scores_from_ids(ids), np.float32)
        if allowed_rows is not None:
            mask = np.isin(self.rows, np.asarray(allowed_rows, np.int64))
            scores = np.where(mask, scores, 0.0)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(float(scores[i]), int(self.rows[i])) for i in top if scores[i] > 0]


def _model(texts: Sequence[str], settings: Bm25Settings) -> Any:
    bm25s = _bm25s()
    model = bm25s.BM25(k1=settings.k1, b=settings.b)
    if len(texts):
        tokens = bm25s.tokenize(list(texts), stopwords=settings.stopwords or None, stemmer=_stemmer(settings),
                                show_progress=False)
        model.index(tokens, show_progress=False)
    return model


def build_in_memory(rows: np.ndarray, texts: Sequence[str], table_version: int,
                    settings: Bm25Settings | None = None) -> Bm25Index:
    """A BM25 index of ``texts`` (keyed by ``rows``) held in memory only, for a reader that
    finds no usable index on disk while a writer holds the collection."""
    settings = settings or Bm25Settings()
    stamp = Bm25Stamp(table_version=int(table_version), n_docs=len(texts), settings=asdict(settings))
    return Bm25Index(_model(texts, settings) if len(texts) else None, np.asarray(rows, np.int64), stamp)


def build(rows: np.ndarray, texts: Sequence[str], folder: Path, table_version: int,
          settings: Bm25Settings | None = None) -> Bm25Stamp:
    """Index ``texts`` (keyed by ``rows``) into ``folder``, replacing what is there atomically."""
    settings = settings or Bm25Settings()
    start = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        if len(texts):
            _model(texts, settings).save(str(tmp), allow_pickle=False)
        np.save(tmp / ROWS_FILE, np.asarray(rows, np.int64), allow_pickle=False)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        stamp = Bm25Stamp(table_version=int(table_version), n_docs=len(texts), settings=asdict(settings),
                          files=files, seconds=round(time.perf_counter() - start, 3))
        (tmp / STAMP_FILE).write_text(json.dumps(asdict(stamp), indent=2, sort_keys=True))
        for p in tmp.iterdir():
            with p.open("rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if folder.exists():
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
            os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote BM25 index (%d documents, table v%d) to %s", stamp.n_docs, stamp.table_version, folder)
    return stamp


def read_stamp(folder: Path) -> Bm25Stamp | None:
    """The stamp in ``folder``, or None when missing or unreadable."""
    try:
        return Bm25Stamp(**json.loads((folder / STAMP_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def load(folder: Path) -> Bm25Index:
    """Load the index in ``folder`` after checking every file against its stamp."""
    bm25s = _bm25s()
    stamp = read_stamp(folder)
    if stamp is None or stamp.format != FORMAT:
        raise IndexIntegrityError(f"no readable BM25 index stamp in {folder}")
    for name, digest in stamp.files.items():
        path = folder / name
        if not path.is_file() or sha256_file(path) != digest:
            raise IndexIntegrityError(f"BM25 index file {path} is missing or does not match its stamp")
    rows = np.load(folder / ROWS_FILE, allow_pickle=False)
    if stamp.n_docs:
        model = bm25s.BM25.load(str(folder), mmap=False, load_corpus=False, allow_pickle=False)
    else:
        model = None
    if len(rows) != stamp.n_docs:
        raise IndexIntegrityError(f"BM25 index in {folder} lists {len(rows)} rows, stamp says {stamp.n_docs}")
    return Bm25Index(model, rows, stamp)

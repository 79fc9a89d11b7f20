"""Where Lance's errors about damaged files become :class:`~caselens.errors.TableDamagedError`.

Every read and write of a collection's Lance tables (:class:`~caselens.indexes.collection.Collection`,
:class:`~caselens.indexes.snapshot.Snapshot`) runs inside a :class:`LanceGuard`. When Lance fails
there (``failed to fill whole buffer``, ``Not found``, ``corrupt file binary mini-block``,
``failed to decode Protobuf`` ... raised as ``OSError``, ``ValueError``, ``ArrowInvalid`` or a Rust
panic), the guard decides once what it means:

- a filter that does not parse or names no column: the original error, for the caller to word;
- a full disk or a refused permission: an ``OSError`` with the system's own words;
- anything else: the table is damaged. The error names the collection, the table and the file
  (from Lance's message when it names one, else from a look at the files the manifest lists:
  missing, not the recorded size, or not decoding), and says to run ``caselens verify NAME --repair``.

A file of the right size that does not decode is found by reading the fragments one by one,
for at most :data:`LOCATE_SECONDS` (only after a failure); beyond that, ``verify`` names it
(:mod:`caselens.indexes.integrity` reads every row).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from caselens.indexes.lance_lib import lance
import pyarrow as pa

from caselens.errors import CaselensError, TableDamagedError

log = logging.getLogger(__name__)

# Lance names files as "<table>.lance/data/<name>.lance", "<table>.lance/_versions/<n>.manifest",
# "_deletions/<...>.arrow|bin" (with or without a leading path)
_FILE_RE = re.compile(r"([\w.-]+\.lance/(?:data/[\w.-]+\.lance|_versions/[\w.-]+\.manifest|_deletions/[\w.-]+))")
LOCATE_SECONDS = 15.0  # how long a failed command may read to name the data file that does not decode
_NOT_DAMAGE = (("no space left on device", errno.ENOSPC), ("disk quota exceeded", errno.EDQUOT),
               ("permission denied", errno.EACCES), ("read-only file system", errno.EROFS))


def lance_message(exc: BaseException) -> str:
    """The useful part of a Lance error message: its first line, without the Rust source location
    and the wrappers ("External error:", "LanceError(IO):")."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r",\s*/\S+\.rs:\d+:\d+\s*$", "", text)
    for prefix in ("External error: ", "LanceError(IO): ", "Generic LocalFileSystem error: "):
        text = text.replace(prefix, "")
    return text.strip()


def is_lance_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is of the kinds Lance raises when it cannot do what it was asked (``OSError``,
    ``ValueError`` and pyarrow's errors, ``RuntimeError``, a Rust panic), not a caselens error nor
    a Python bug (``TypeError``, ``KeyError``, ``AttributeError``... go on as they are)."""
    if isinstance(exc, CaselensError):
        return False
    if type(exc).__name__ == "PanicException":
        return True
    return isinstance(exc, (OSError, ValueError, RuntimeError, pa.ArrowException))


@dataclass(frozen=True)
class LanceGuard:
    """The guard of one Lance table of one collection: ``with guard(): <Lance calls>``."""

    collection: str  # the collection's name
    root: Path  # the collection's folder (files are named relative to it)
    table_dir: Path  # the Lance dataset folder (``lance/items.lance`` or ``lance/ledger.lance``)
    table: str = "items"  # what the table is called in messages: "items" or "ledger"

    @contextlib.contextmanager
    def __call__(self, filter: str | None = None, dataset: Any = None) -> Iterator[None]:  # noqa: A002
        """Run Lance calls; a failure that means damage becomes :class:`TableDamagedError`.
        ``filter`` (with the ``dataset`` it applied to) is the SQL filter of the call: when it is
        itself what Lance refused, the original error goes on."""
        try:
            yield
        except BaseException as exc:
            if not is_lance_failure(exc):
                raise
            if filter and dataset is not None and _filter_refused(dataset, filter):
                raise
            raise self.translate(exc) from exc

    def relative(self, path: str | Path) -> str:
        """``path`` relative to the collection folder (as it is printed)."""
        try:
            return str(Path(path).resolve().relative_to(self.root.resolve()))
        except ValueError:
            return str(path)

    def translate(self, exc: BaseException) -> BaseException:
        """The error to raise for Lance's ``exc``: an ``OSError`` for a full disk or a refused
        permission, else a :class:`TableDamagedError` naming the file."""
        message = lance_message(exc)
        low = message.lower()
        for words, code in _NOT_DAMAGE:
            if words in low:
                return OSError(code, f"{os.strerror(code)} while writing collection {self.collection!r} "
                                     f"({message})", str(self.table_dir))
        files, why = self.locate(message)
        for match in list(_FILE_RE.finditer(message)):  # Lance's absolute path -> the relative one
            tail = match.group(1).split(f"{self.table_dir.name}/", 1)[-1]
            message = re.sub(r"\S*" + re.escape(match.group(1)), self.relative(self.table_dir / tail), message)
        return self.damaged(files, f"{why}{'; ' if why else ''}Lance: {message}")

    def damaged(self, files: list[str], detail: str) -> TableDamagedError:
        """The error for damage found in ``files`` (relative to the collection folder)."""
        where = ", ".join(files) if files else f"a file of {self.relative(self.table_dir)}"
        return TableDamagedError(
            f"collection {self.collection!r}: the {self.table} table is damaged ({where}: {detail}). Nothing was "
            f"changed. Run `caselens verify {self.collection} --repair`: it keeps every row that has a good copy "
            "(nothing is deleted), says what was lost and how to ingest it again",
            collection=self.collection, table=self.table, files=tuple(files))

    def locate(self, message: str) -> tuple[list[str], str]:
        """(files, why) for a Lance failure: the file Lance's ``message`` names, else the manifest
        that does not decode or the data files that are missing or shorter than recorded."""
        named = [m.group(1) for m in _FILE_RE.finditer(message)]
        if named:
            base = self.table_dir.name
            paths = []
            for name in named:  # Lance may give the path without its leading "/"
                tail = name.split(f"{base}/", 1)[1] if name.startswith(f"{base}/") else name
                paths.append(self.relative(self.table_dir / tail))
            return sorted(set(paths)), ""
        try:
            return probe_files(self.table_dir, self.root)
        except Exception as exc:  # noqa: BLE001 - locating is a courtesy: the damage is reported anyway
            log.debug("could not locate the damaged file of %s: %s", self.table_dir, exc)
            return [], ""


def _filter_refused(dataset: Any, predicate: str) -> bool:
    """Whether Lance refuses ``predicate`` itself (planning only: no data is read)."""
    try:
        dataset.scanner(filter=predicate, columns=[dataset.schema.names[0]]).explain_plan()
    except BaseException as exc:  # noqa: BLE001 - any refusal of the plan is the filter's
        return is_lance_failure(exc)
    return False


def manifest_versions(table_dir: Path) -> list[tuple[int, Path]]:
    """(version, manifest file) of every manifest in ``table_dir/_versions``, newest first. Lance
    names them ``{v}.manifest`` (V1) or ``{2**64 - 1 - v:020}.manifest`` (V2)."""
    found: dict[int, Path] = {}
    folder = Path(table_dir) / "_versions"
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    for name in names:
        if not name.endswith(".manifest"):
            continue
        stem = name[:-len(".manifest")]
        if not stem.isdigit():
            continue
        number = int(stem)
        version = (1 << 64) - 1 - number if len(stem) == 20 and number > (1 << 63) else number
        found[version] = folder / name
    return sorted(found.items(), reverse=True)


def newest_readable(table_dir: Path) -> tuple[lance.LanceDataset | None, list[Path]]:
    """The newest version of the table whose manifest decodes, and the newer manifests that do
    not (newest first)."""
    bad: list[Path] = []
    for version, manifest in manifest_versions(table_dir):
        try:
            return lance.dataset(str(table_dir), version=version), bad
        except BaseException as exc:  # noqa: BLE001 - a manifest that does not decode
            if not is_lance_failure(exc):
                raise
            bad.append(manifest)
    return None, bad


def probe_files(table_dir: Path, root: Path) -> tuple[list[str], str]:
    """What makes a table unreadable: the newest manifest when it does not decode, else the data
    files of the latest version that are missing or not the size their manifest records (no row
    read), else the first fragment that does not decode (read for at most
    :data:`LOCATE_SECONDS`). Returns (files relative to ``root``, why)."""
    def rel(path: Path) -> str:
        try:
            return str(path.resolve().relative_to(root.resolve()))
        except ValueError:
            return str(path)

    versions = manifest_versions(table_dir)
    for version, manifest in versions:
        try:
            dataset = lance.dataset(str(table_dir), version=version)
        except BaseException as exc:  # noqa: BLE001 - a manifest Lance cannot read
            if not is_lance_failure(exc):
                raise
            return [rel(manifest)], f"the manifest of version {version} does not decode"
        missing, short, sizes = [], [], []
        for fragment in dataset.get_fragments():
            for data_file in fragment.metadata.files:
                path = Path(table_dir) / "data" / data_file.path
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    missing.append(rel(path))
                    continue
                want = getattr(data_file, "file_size_bytes", None) or 0
                if want and size != want:
                    short.append(rel(path))
                    sizes.append(f"{size} of {want} bytes")
        if missing:
            return missing, "missing"
        if short:
            return short, f"not the size its manifest records ({', '.join(sizes)})"
        return _read_probe(dataset, Path(table_dir), rel)
    return [], "no manifest"


def _read_probe(dataset: lance.LanceDataset, table_dir: Path, rel: Any) -> tuple[list[str], str]:
    """The first fragment of ``dataset`` that does not decode, read fragment by fragment for at
    most :data:`LOCATE_SECONDS` (a command that met damage pays it once, before it stops)."""
    deadline = time.monotonic() + LOCATE_SECONDS
    for fragment in dataset.get_fragments():
        if time.monotonic() > deadline:
            break
        try:
            for _ in fragment.to_batches(batch_size=8192):
                if time.monotonic() > deadline:
                    return [], ""
        except BaseException as exc:  # noqa: BLE001 - the fragment that does not decode
            if not is_lance_failure(exc):
                raise
            return [rel(table_dir / "data" / f.path) for f in fragment.metadata.files], "does not decode"
    return [], ""

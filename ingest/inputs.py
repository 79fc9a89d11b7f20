"""Where each ingest run read its files: ``<collection>/inputs.json``, run id -> input root.

Items store their source relative to the input folder (image folder or manifest folder, DICOM
export root, PDF folder), so no absolute path, which could name a patient or a site, ever
becomes an index column or a search result. To find the file again later (to show a retrieved
case or page to a vision-language generator, :mod:`caselens.retrieval.images`), each run
records its absolute input root, and the reading options that shape the pixels (DICOM window,
PDF resolution), in this small JSON file inside the collection folder::

    {"version": 1, "runs": {"<run id>": {"kind": "images" | "dicom" | "pdf" | "text",
                                          "root": "/abs/folder", "time": "...Z", ...options}},
     "source_paths": "relative" | "hashed" | "none",
     "paths": {"path-<hash>": "relative/path", ...}}

It is a local file of the user's own collection: it is never copied into the items table or
the ledger, and nothing prints it (search and ask output name items by id and stored source).
The ledger (``Collection.ledger``) maps item id -> run id. Each record also says how the input
was read (manifest and its label/text columns, DICOM unit and pooling, PDF items, corpus file
and fields), so that ``caselens verify --repair --reingest`` can read the input of a run again
and store the items a repair could not save (:mod:`caselens.ingest.reingest`).

``source_paths`` is how the collection names its input files (:mod:`caselens.ingest.source_paths`)
and ``paths`` maps the keyed hashes a ``hashed`` collection stores back to relative paths, so
that images can be found again.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from caselens.files import atomic_write_bytes
from caselens.indexes.layout import Layout

log = logging.getLogger(__name__)

VERSION = 1


def inputs_path(collection_root: Path) -> Path:
    """The inputs file of the collection at ``collection_root``."""
    return Layout(Path(collection_root)).inputs_file


def _read(collection_root: Path) -> dict[str, Any]:
    path = inputs_path(collection_root)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.debug("inputs file of %s unreadable (%s); input roots unknown", Path(collection_root).name, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _write(collection_root: Path, data: dict[str, Any]) -> None:
    data = {**data, "version": VERSION}
    atomic_write_bytes(inputs_path(collection_root), json.dumps(data, indent=1, sort_keys=True).encode())


def read_runs(collection_root: Path) -> dict[str, dict[str, Any]]:
    """run id -> {kind, root, time, options...} of every run that recorded its input root, in the
    order they were recorded (oldest first); empty when there is no (readable) inputs file."""
    runs = _read(collection_root).get("runs")
    if not isinstance(runs, dict):
        return {}
    return {str(k): v for k, v in runs.items() if isinstance(v, dict) and isinstance(v.get("root"), str)}


def record_run(collection_root: Path, run_id: str, record: dict[str, Any]) -> None:
    """Add ``run_id`` -> ``record`` ({kind, root, ...}) to the inputs file, atomically.

    A ``paths`` map in the record (hash -> relative path, from a ``hashed`` source) joins the
    collection's map instead. Call with the collection's write lock held (the ingest runner
    does), so that two runs do not both read the old file and one of their records is lost."""
    data = _read(collection_root)
    record = dict(record)
    paths = record.pop("paths", None)
    runs = read_runs(collection_root)
    runs[run_id] = {**record, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    data["runs"] = runs
    if isinstance(paths, dict) and paths:
        data["paths"] = {**(data.get("paths") if isinstance(data.get("paths"), dict) else {}), **paths}
    _write(collection_root, data)


def read_paths(collection_root: Path) -> dict[str, str]:
    """Keyed path hash -> relative path, for the files of ``hashed`` runs (empty when none)."""
    paths = _read(collection_root).get("paths")
    return {str(k): str(v) for k, v in paths.items()} if isinstance(paths, dict) else {}


def read_source_paths(collection_root: Path) -> str | None:
    """The collection's ``source_paths`` setting, or None when it has none recorded."""
    mode = _read(collection_root).get("source_paths")
    return mode if isinstance(mode, str) else None


def write_source_paths(collection_root: Path, mode: str) -> None:
    """Record the collection's ``source_paths`` setting (with its write lock held)."""
    data = _read(collection_root)
    data["source_paths"] = mode
    _write(collection_root, data)


def input_record(source: Any) -> dict[str, Any] | None:
    """What a source says about its input root (``source.input_record()``), or None for sources
    that cannot tell."""
    method = getattr(source, "input_record", None)
    if not callable(method):
        return None
    try:
        record = method()
    except Exception as exc:  # noqa: BLE001 - recording the root never stops an ingest
        log.debug("input root of %s not recorded: %s", type(source).__name__, exc)
        return None
    return record if isinstance(record, dict) and record.get("root") else None

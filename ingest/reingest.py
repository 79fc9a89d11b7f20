"""Ingest again what a repair could not save, from the inputs each run recorded.

``verify`` lists the items the ledger says are stored and the table lacks, by the run that last
accepted each (``missing_by_run``). Each run noted in ``<collection>/inputs.json`` where it read
its files and how (:mod:`caselens.ingest.inputs`); :func:`plan` turns that into one
:class:`~caselens.ingest.runner.IngestRequest` per run, and :func:`reingest` runs them. An ingest
reads the whole recorded input again and stores only what the collection lacks: the other items
are met as duplicates (one more run in their ledger rows), nothing is replaced. DICOM runs read
only the files of the missing items (a series is read with all its member files).

A run that recorded nothing usable (older caselens versions did not note manifests or text
corpora; a folder since moved) gets a reason instead, and the user ingests that input by hand.
No path is printed: requests are built and run here, and the plan says only run, kind and counts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caselens.indexes.collection import Collection
from caselens.ingest.inputs import read_paths, read_runs
from caselens.ingest.runner import IngestRequest, run_ingest

log = logging.getLogger(__name__)


@dataclass
class ReingestStep:
    """What to ingest again for one run."""

    run_id: str
    items: int  # missing items this run was the last to accept
    kind: str | None = None  # images | dicom | pdf | text (None: the run recorded no input)
    possible: bool = False
    reason: str = ""  # why it cannot be done here, and what to do instead
    request: IngestRequest | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "items": self.items, "kind": self.kind, "possible": self.possible,
                "reason": self.reason}


def _dicom_files(collection: Collection, run_id: str, root: Path) -> list[Path]:
    """The files of the items the run accepted that the table lacks (every member of a series),
    under ``root``."""
    rows = [r for r in collection.ledger(run_id=run_id) if r["status"] == "accepted" and r["item_id"]]
    stored = collection.existing_ids({r["item_id"] for r in rows})
    hashed = read_paths(collection.root)  # a collection that hashes its input paths (ingest.source_paths)
    names = sorted({hashed.get(r["input"], r["input"]) for r in rows if r["item_id"] not in stored})
    return [root / n for n in names if n and ".." not in Path(n).parts and not Path(n).is_absolute()]


def request_for(record: dict[str, Any], files: list[Path] | None = None) -> tuple[IngestRequest | None, str]:
    """An ingest request that reads a recorded run's input again, or (None, why not)."""
    kind = record.get("kind")
    root = Path(record["root"])
    if not root.exists():
        return None, f"its {kind} input folder is no longer where the run read it: ingest it again by hand"
    dicom = record.get("dicom") or {}
    window = dicom.get("window") or None
    burned = bool(dicom.get("allow_burned_in", False))
    if kind == "images":
        if "manifest" not in record or record.get("files"):
            return None, ("the run did not record how it read its images (older caselens): ingest its folder or "
                          "manifest again with `caselens ingest`")
        if record["manifest"]:
            manifest = root / record["manifest"]
            if not manifest.is_file():
                return None, "its manifest is no longer where the run read it: ingest it again by hand"
            return IngestRequest(manifest=manifest, label_column=record.get("label_column") or "label",
                                 text_column=record.get("text_column"), window=window, allow_burned_in=burned,
                                 progress=False), ""
        return IngestRequest(images=root, label_from_folder=bool(record.get("label_from_folder")), window=window,
                             allow_burned_in=burned, progress=False), ""
    if kind == "dicom":
        roots = [Path(r) for r in record.get("roots") or ()]  # several folders ingested together
        targets: list[Path] | Path = [f for f in files or [] if f.exists()] or (roots if len(roots) > 1 else root)
        return IngestRequest(dicom=targets, unit=record.get("unit", "instance"), slices=int(record.get("slices", 8)),
                             pooling=record.get("pooling"), window=window, allow_burned_in=burned, progress=False), ""
    if kind == "pdf":
        path = root / record["file"] if record.get("file") else root
        return IngestRequest(pdf=path, pdf_items=record.get("items"), dpi=int(record.get("dpi", 100)),
                             ocr=bool(record.get("ocr", True)), progress=False), ""
    if kind == "text":
        path = root / record["file"] if record.get("file") else root
        if not path.exists():
            return None, "its corpus is no longer where the run read it: ingest it again by hand"
        return IngestRequest(text=path, id_field=record.get("id_field") or "id",
                             text_field=record.get("text_field") or "text", limit=record.get("limit"),
                             progress=False), ""
    return None, f"the run recorded an input of unknown kind {kind!r}"


def plan(collection: Collection, missing_by_run: dict[str, int]) -> list[ReingestStep]:
    """One step per run that lost items: its request, or why there is none."""
    runs = read_runs(collection.root)
    steps = []
    for run_id, count in sorted(missing_by_run.items(), key=lambda kv: -kv[1]):
        record = runs.get(run_id)
        step = ReingestStep(run_id, int(count), record.get("kind") if record else None)
        if record is None:
            step.reason = ("the run recorded no input (a text corpus ingested by an older caselens, or a run made "
                           "through the library without a source root): ingest its input again with `caselens ingest`")
        else:
            files = _dicom_files(collection, run_id, Path(record["root"])) if record.get("kind") == "dicom" else None
            step.request, step.reason = request_for(record, files)
            step.possible = step.request is not None
        steps.append(step)
    return steps


def reingest(name: str, home: Path, steps: list[ReingestStep]) -> list[dict[str, Any]]:
    """Run the possible steps; returns what each did (run, accepted, duplicates, rejected)."""
    done = []
    for step in steps:
        if not step.possible or step.request is None:
            continue
        report = run_ingest(name, step.request, home)
        log.info("re-ingested run %s as run %s: %d accepted", step.run_id, report.run_id, report.accepted)
        done.append({"run_id": step.run_id, "new_run": report.run_id, "accepted": report.accepted,
                     "duplicates": report.duplicates, "rejected": sum(report.rejected.values())})
    return done

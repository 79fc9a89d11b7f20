"""Discovery of a PACS export before the heavy work: which files are DICOM, how they group.

:func:`walk_inputs` lists the files under a folder (or those a DICOMDIR references) without
following symlinks and without leaving the root: a symlink or a path that points outside is a
:class:`~caselens.ingest.items.Rejection`, never read; :func:`walk_many` does the same for several
folders, DICOMDIRs and files at once, naming everything relative to their common folder. :func:`scan_headers` reads every header
(no pixels) and groups instances into patient -> study -> series under *pseudonyms* only;
:func:`scan` does both and summarises (``caselens scan DIR``). Nothing identifying is printed.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from caselens.errors import SourceError
from caselens.ingest.deid import pseudonym
from caselens.ingest.items import Rejection
from caselens.ingest.sources.dicom import (DicomOptions, DicomReadError, check_header, quiet_pydicom, is_dicom,
                                           read_header)
from caselens.ingest.walk import CLUTTER, check_file, walk_files

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SKIP_NAMES = CLUTTER


def is_nifti(path: Path) -> bool:
    """True for ``.nii`` / ``.nii.gz`` files."""
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError, ValueError):
        return False


def walk_inputs(root: Path, files: list[Path] | None = None) -> Iterator[tuple[Path, str] | Rejection]:
    """(path, path relative to the root) of every regular file under ``root``, or the files a
    DICOMDIR lists when ``root`` is a DICOMDIR file, or ``files`` when given (each must lie under
    ``root``). Symlinks and paths leaving the root are yielded as rejections, never followed."""
    root = Path(root).expanduser()
    if files is None and root.is_file() and root.name.upper() == "DICOMDIR":
        yield from _dicomdir_inputs(root)
        return
    if files is None and not root.is_dir():
        raise SourceError(f"{root} is not a folder or a DICOMDIR file; give the folder of the export")
    base = root.resolve()
    if files is not None:
        for f in files:
            f = Path(f)
            rel = os.path.relpath(f, base) if f.is_absolute() else str(f)
            yield from _check_one(base / rel if not f.is_absolute() else f, rel, base)
        return
    for entry in walk_files(base, SKIP_NAMES):
        if isinstance(entry, Rejection):
            yield entry
        else:
            yield from _check_one(entry[0], entry[1], base)


def common_base(paths: list[Path]) -> Path:
    """The folder inputs given as ``paths`` (folders, DICOMDIRs, files) are named relative to: the
    deepest folder holding all of them (a folder counts as itself, a file as its folder)."""
    folders = []
    for p in paths:
        p = Path(p).expanduser()
        resolved = p.resolve()
        folders.append(str(resolved if p.is_dir() else resolved.parent))
    return Path(os.path.commonpath(folders)) if folders else Path.cwd()


def walk_many(paths: list[Path]) -> Iterator[tuple[Path, str] | Rejection]:
    """The inputs of several folders, DICOMDIR files and single files (``--dicom dirA dirB
    f.dcm``), each named relative to :func:`common_base`; a path that does not exist is a
    ``missing_file`` rejection, a file met twice is read once. A folder or DICOMDIR given here is
    followed even when it is a symlink (it was named explicitly); nothing under it is."""
    base = common_base(paths)
    seen: set[str] = set()
    for given in paths:
        given = Path(given).expanduser()
        if not given.exists():
            yield Rejection(os.path.relpath(given.absolute(), base), "missing_file",
                            "no such file or folder (given as an input)")
            continue
        target = given.resolve()
        if target.is_dir():
            entries: Iterator[tuple[Path, str] | Rejection] = walk_files(target, SKIP_NAMES, base=base)
        elif target.name.upper() == "DICOMDIR":
            try:
                entries = iter(list(_dicomdir_inputs(target, base)))
            except SourceError as exc:
                entries = iter([Rejection(os.path.relpath(target, base), "corrupt_dicomdir", str(exc))])
        else:
            entries = _check_one(target, os.path.relpath(target, base), base)
        for entry in entries:
            rel = entry.input if isinstance(entry, Rejection) else entry[1]
            if rel in seen:
                continue
            seen.add(rel)
            yield entry


def _check_one(path: Path, rel: str, base: Path) -> Iterator[tuple[Path, str] | Rejection]:
    problem = check_file(path, rel)
    if problem is not None and problem.reason_code in ("symlink", "bad_path"):
        yield problem
    elif not _inside(path, base):
        yield Rejection(rel, "outside_root", "path leaves the input folder; refused")
    elif problem is not None:
        yield problem
    elif path.name.upper() == "DICOMDIR":
        yield Rejection(rel, "dicomdir_index", "a DICOMDIR index, not an image; pass it as the input to read "
                                               "the files it lists")
    else:
        yield path, rel


def _dicomdir_inputs(dicomdir: Path, base: Path | None = None) -> Iterator[tuple[Path, str] | Rejection]:
    """The files a DICOMDIR lists, named relative to ``base`` (default: the DICOMDIR's folder)."""
    folder = dicomdir.resolve().parent
    base = folder if base is None else base
    try:
        ds = read_header(dicomdir)
        records = list(ds.get("DirectoryRecordSequence", []))
    except DicomReadError as exc:
        raise SourceError(f"DICOMDIR {dicomdir} cannot be read: {exc}") from None
    except Exception as exc:  # a damaged value met while reading the records
        raise SourceError(f"DICOMDIR {dicomdir} cannot be read ({type(exc).__name__})") from None
    seen: set[str] = set()
    for record in records:
        try:
            parts = record.get("ReferencedFileID")
        except Exception as exc:  # a damaged record: this one is skipped, with its reason
            yield Rejection(f"DICOMDIR record {len(seen) + 1}", "corrupt_dicomdir",
                            f"a DICOMDIR record cannot be read ({type(exc).__name__})")
            continue
        if not parts:
            continue
        parts = [parts] if isinstance(parts, str) else list(parts)
        if any("\0" in str(p) for p in parts):
            yield Rejection("/".join(str(p).replace("\0", "") for p in parts), "bad_path",
                            "the DICOMDIR names a file with a NUL character in its path")
            continue
        path = folder.joinpath(*[str(p).strip() for p in parts])
        rel = os.path.relpath(path, base)
        if rel in seen:
            continue
        seen.add(rel)
        if not path.exists():  # DICOMDIRs written on Windows/ISO media may differ in case
            matches = [c for c in path.parent.glob("*") if c.name.upper() == path.name.upper()] if path.parent.is_dir() else []
            path = matches[0] if matches else path
        yield from _check_one(path, rel, base)


@dataclass
class InstanceHeader:
    """What the scan learned about one DICOM file, pseudonymised."""

    path: Path  # the file
    rel: str  # its path relative to the input root (the ledger's name for it)
    patient: str  # patient pseudonym ("pt-…"; "pt-unknown" when the header has no PatientID)
    study: str  # study pseudonym UID ("unknown" when absent)
    series: str  # series pseudonym UID ("unknown" when absent)
    modality: str  # Modality, "" when absent
    frames: int  # NumberOfFrames (1 for single-frame)
    position: float | None  # slice position along the slice normal, for ordering
    instance_number: int | None  # InstanceNumber, the ordering fallback


def _slice_position(ds: Any) -> float | None:
    try:
        pos = [float(v) for v in ds.ImagePositionPatient]
        ori = [float(v) for v in ds.ImageOrientationPatient]
    except (AttributeError, TypeError, ValueError):
        return None
    if len(pos) != 3 or len(ori) != 6:
        return None
    row, col = ori[:3], ori[3:]
    normal = (row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2], row[0] * col[1] - row[1] * col[0])
    return sum(p * n for p, n in zip(pos, normal))


def header_of(path: Path, rel: str, secret: bytes, options: DicomOptions) -> InstanceHeader | Rejection:
    """Read and check one file's header (pixel budget, burned-in annotation) into an
    :class:`InstanceHeader`, or a rejection with its reason code."""
    with quiet_pydicom():  # pydicom's warnings on odd values end as reasons, not console noise
        return _header_of(path, rel, secret, options)


def _header_of(path: Path, rel: str, secret: bytes, options: DicomOptions) -> InstanceHeader | Rejection:
    preamble = is_dicom(path)
    try:
        ds = read_header(path, options)
        _, _, frames, _, _ = check_header(ds, options)
        # pydicom converts values when they are first read: a damaged one raises here, not above
        pid = str(ds.get("PatientID", "") or "").strip()
        study = str(ds.get("StudyInstanceUID", "") or "").strip()
        series = str(ds.get("SeriesInstanceUID", "") or "").strip()
        modality = str(ds.get("Modality", "") or "").strip()
        try:
            number = int(ds.get("InstanceNumber")) if ds.get("InstanceNumber") not in (None, "") else None
        except (TypeError, ValueError):
            number = None
        position = _slice_position(ds)
    except DicomReadError as exc:
        code = exc.code if preamble or exc.code != "corrupt_dicom" else "not_dicom"
        reason = str(exc) if code != "not_dicom" else "not a DICOM file (no DICM preamble, no readable header)"
        return Rejection(rel, code, reason)
    except Exception as exc:  # odd headers: a rejection, never a crash
        return Rejection(rel, "corrupt_dicom", f"DICOM header could not be read ({type(exc).__name__})")
    return InstanceHeader(path=path, rel=rel,
                          patient=pseudonym(pid, secret, "patient") if pid else "pt-unknown",
                          study=pseudonym(study, secret, "uid") if study else "unknown",
                          series=pseudonym(series, secret, "uid") if series else "unknown",
                          modality=modality, frames=frames, position=position, instance_number=number)


def order_slices(instances: list[InstanceHeader]) -> list[InstanceHeader]:
    """Instances of one series in slice order: by position along the normal when every one has
    it, else by InstanceNumber, else by file name."""
    if instances and all(i.position is not None for i in instances):
        return sorted(instances, key=lambda i: (i.position, i.rel))
    return sorted(instances, key=lambda i: (i.instance_number if i.instance_number is not None else 1 << 30, i.rel))


@dataclass
class ScanReport:
    """What ``caselens scan`` found; identifiers are pseudonyms."""

    root: str  # the folder or DICOMDIR scanned
    files: int = 0  # regular files looked at
    instances: list[InstanceHeader] = field(default_factory=list)  # readable DICOM image headers
    rejected: list[Rejection] = field(default_factory=list)  # everything else, with reasons
    nifti: list[str] = field(default_factory=list)  # NIfTI volumes found (relative paths)

    def tree(self) -> dict[str, dict[str, dict[str, list[InstanceHeader]]]]:
        """patient -> study -> series -> instances."""
        out: dict[str, dict[str, dict[str, list[InstanceHeader]]]] = {}
        for inst in self.instances:
            out.setdefault(inst.patient, {}).setdefault(inst.study, {}).setdefault(inst.series, []).append(inst)
        return out

    def summary(self) -> dict[str, Any]:
        """Counts as a JSON-ready dict (pseudonyms only)."""
        tree = self.tree()
        series = []
        for patient, studies in sorted(tree.items()):
            for study, by_series in sorted(studies.items()):
                for uid, insts in sorted(by_series.items()):
                    series.append({"patient": patient, "study": study, "series": uid,
                                   "modality": insts[0].modality, "instances": len(insts),
                                   "frames": sum(i.frames for i in insts)})
        return {
            "root": self.root, "files": self.files,
            "patients": len(tree), "studies": sum(len(s) for s in tree.values()),
            "series": len(series), "instances": len(self.instances),
            "frames": sum(i.frames for i in self.instances),
            "modalities": dict(Counter(i.modality or "?" for i in self.instances).most_common()),
            "nifti_volumes": len(self.nifti),
            "unreadable": len(self.rejected),
            "unreadable_by_reason": dict(Counter(r.reason_code for r in self.rejected).most_common()),
            "series_list": series,
        }


def scan_headers(inputs: Iterator[tuple[Path, str] | Rejection], secret: bytes,
                 options: DicomOptions | None = None, progress: bool = False) -> ScanReport:
    """Read the header of every input; NIfTI files are listed, not opened."""
    from tqdm.auto import tqdm

    options = options or DicomOptions()
    report = ScanReport(root="")
    for entry in tqdm(inputs, desc="reading headers", unit="file", disable=not progress):
        if isinstance(entry, Rejection):
            report.rejected.append(entry)
            continue
        path, rel = entry
        report.files += 1
        if is_nifti(path):
            report.nifti.append(rel)
            continue
        found = header_of(path, rel, secret, options)
        (report.rejected if isinstance(found, Rejection) else report.instances).append(found)
    return report


def scan(root: Path, secret: bytes, options: DicomOptions | None = None, progress: bool = False) -> ScanReport:
    """Walk ``root`` (folder or DICOMDIR) safely and read every header: see :class:`ScanReport`."""
    report = scan_headers(walk_inputs(Path(root)), secret, options, progress)
    report.root = str(root)
    return report

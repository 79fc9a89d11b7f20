"""Image folders: PNG/JPEG/TIFF/... and DICOM files (recognised by preamble or .dcm suffix),
optionally described by a CSV manifest.

Manifest columns: ``path`` (required, relative to the manifest's folder), ``label``,
``patient_id`` (pseudonymised before it is stored); every other column becomes metadata (numbers
when every value in the column is a number). Without a manifest every file under the folder is
read, and with ``label_from_folder`` its parent folder name is its label.

The manifest is streamed twice (once to type its columns, once to read its rows), never held in
memory; its bounds and the image file size bound are in :class:`ImageSourceConfig`.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from PIL import Image, UnidentifiedImageError

from caselens.errors import ConfigError, SourceError
from caselens.ingest.deid import check_key, pseudonym
from caselens.ingest.items import Item, Rejection, content_id, sha256_file
from caselens.ingest.source_paths import PathNamer, check_mode
from caselens.ingest.sources.bounded import Record, csv_records
from caselens.ingest.sources.dicom import DicomOptions, DicomReadError, is_dicom, read_dicom
from caselens.ingest.walk import CLUTTER, check_file, walk_files

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm"}
SKIP_NAMES = CLUTTER | {"manifest.csv", "dicomdir"}


@dataclass(frozen=True)
class ImageSourceConfig:
    """Bounds on a manifest and on image files, and how input files are named in the collection."""

    max_manifest_rows: int = 10_000_000  # manifest rows read at most; the rest are rejected together
    max_row_bytes: int = 1 << 20  # bytes of one manifest row; longer: rejected too_long
    max_file_bytes: int = 1 << 30  # image files (not DICOM: see DicomOptions) larger than this: too_large
    source_paths: str | None = None  # "relative" | "hashed" | "none"; None: the collection's (see source_paths)

    def __post_init__(self) -> None:
        for name in ("max_manifest_rows", "max_row_bytes", "max_file_bytes"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)}")
        check_mode(self.source_paths)


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


class ImageSource:
    """Images (and DICOM instances) from a folder or a list of files, with an optional manifest."""

    kind = "image"

    def __init__(self, root: Path | None = None, manifest: Path | None = None, *, secret: bytes,
                 label_from_folder: bool = False, files: list[Path] | None = None,
                 dicom_options: DicomOptions | None = None, label_column: str = "label",
                 text_column: str | None = None, config: ImageSourceConfig | None = None):
        self.dicom_options = dicom_options  # how DICOM files are read (window, burned-in policy...)
        self.config = config or ImageSourceConfig()
        self.paths = PathNamer()  # how files are named in the collection; set for it by the runner
        if root is None and manifest is None and files is None:
            raise SourceError("give an image folder, a manifest or a list of files")
        if root is not None:
            self.root = Path(root).expanduser().resolve()
        elif manifest is not None:
            self.root = Path(manifest).expanduser().resolve().parent
        else:
            self.root = Path.cwd()
        self.secret = check_key(secret)  # the collection's key: every pseudonym is keyed by it
        self.label_from_folder = label_from_folder
        self.label_column = label_column  # the manifest column holding each image's label
        self.text_column = text_column  # the manifest column holding each case's report / notes (item text)
        self.notes: list[str] = []  # what the user should know about how the manifest was read
        self.files = files
        self.manifest: Path | None = None
        self.columns: list[str] = []
        self.numeric: set[str] = set()
        self.n_rows = 0
        if root is not None and files is None and not self.root.is_dir():
            raise SourceError(f"image folder {root} does not exist or is not a folder")
        if manifest is not None:
            manifest = Path(manifest).expanduser()
            if manifest.is_dir():
                raise SourceError(f"manifest {manifest} is a folder; give the CSV file (its 'path' column names "
                                  "images relative to it), or the folder itself as --images")
            if not manifest.is_file():
                raise SourceError(f"manifest {manifest} does not exist")
            self.manifest = manifest
            self.manifest_dir = manifest.resolve().parent
            self.manifest_name = manifest.name
            self._type_columns()

    @property
    def source_paths(self) -> str | None:
        return self.config.source_paths

    @property
    def pseudonymised_patients(self) -> bool:
        """True when the manifest gives patient ids (pseudonymised before they are stored)."""
        return "patient_id" in self.columns

    def _records(self) -> Iterator[Record]:
        with self.manifest.open("rb") as fh:  # type: ignore[union-attr]
            yield from csv_records(fh, self.config.max_row_bytes)

    def _type_columns(self) -> None:
        """First pass over the manifest: its columns, which of them hold only numbers, its rows."""
        records = self._records()
        header = next((r for r in records), None)
        if header is None or header.fields is None:
            why = header.reason if header is not None else "the file is empty"
            raise SourceError(f"manifest {self.manifest} has no readable header line ({why}); the first line "
                              "must name the columns, one of them 'path'")
        self.columns = [c.strip() for c in header.fields]
        twice = sorted({c for c in self.columns if self.columns.count(c) > 1})
        if twice:
            raise SourceError(f"manifest {self.manifest} names column(s) {twice} more than once; give each "
                              "column one name")
        columns = self.columns
        if "path" not in columns:
            raise SourceError(f"manifest {self.manifest} has no 'path' column (columns: {columns}); "
                              "add one with each image's path relative to the manifest")
        if self.text_column is not None and self.text_column not in columns:
            raise SourceError(f"manifest {self.manifest} has no column {self.text_column!r} for case texts "
                              f"(columns: {', '.join(columns)}); name it with --text-column")
        if self.label_column != "label" and self.label_column not in columns:
            raise SourceError(f"manifest {self.manifest} has no column {self.label_column!r} for labels "
                              f"(columns: {', '.join(columns)}); name the label column with --label-column")
        if self.label_column == "label" and "label" not in columns:
            self.notes.append(f"manifest {self.manifest.name} has no 'label' column: items have no labels (name "
                              f"the label column with --label-column; columns: {', '.join(columns)})")
        untyped = ("path", "label", "patient_id", self.label_column, self.text_column)
        candidates = {i: c for i, c in enumerate(columns) if c not in untyped}
        numeric, seen = set(candidates), set()
        for rec in records:
            if self.n_rows >= self.config.max_manifest_rows:
                break
            self.n_rows += 1
            if rec.fields is None:
                continue
            for i in list(numeric):
                value = rec.fields[i].strip() if i < len(rec.fields) else ""
                if value:
                    seen.add(i)
                    if not _is_number(value):
                        numeric.discard(i)
        self.numeric = {candidates[i] for i in numeric & seen}

    def input_record(self) -> dict[str, Any]:
        """The folder its items' sources are relative to, and how DICOM files were read, for the
        collection's local inputs file (:mod:`caselens.ingest.inputs`; never an index column).
        For a ``hashed`` collection, the hash -> relative path map of every file it will read."""
        from dataclasses import asdict

        base = getattr(self, "manifest_dir", self.root)
        if self.paths.mode == "hashed":
            for rel in self._planned_names():
                self.paths.name(rel)
        return {"kind": "images", "root": str(Path(base).resolve()),
                "dicom": asdict(self.dicom_options or DicomOptions()),
                # how to read the same input again (``verify --repair --reingest``)
                "manifest": getattr(self, "manifest_name", None), "label_column": self.label_column,
                "text_column": self.text_column, "label_from_folder": self.label_from_folder,
                "files": self.files is not None, **self.paths.record()}

    def _planned_names(self) -> Iterator[str]:
        if self.manifest is not None:
            for rec in self._rows():
                if rec.fields is not None:
                    rel = self._row_dict(rec).get("path", "").strip()
                    if rel:
                        yield rel
        elif self.files is not None:
            for path in self.files:
                yield self._rel(Path(path))
        else:
            for entry in walk_files(self.root, SKIP_NAMES):
                if not isinstance(entry, Rejection):
                    yield entry[1]

    def estimate(self) -> int | None:
        if self.manifest is not None:
            return self.n_rows
        if self.files is not None:
            return len(self.files)
        return None

    def _rows(self) -> Iterator[Record]:
        """The manifest's rows after its header (at most ``max_manifest_rows``, then one rejection)."""
        records = self._records()
        next(records, None)  # the header, read in __init__
        for n, rec in enumerate(records):
            if n >= self.config.max_manifest_rows:
                yield Record(rec.line, None, "too_many_rows", f"the manifest has more than "
                             f"{self.config.max_manifest_rows} rows; the rest from this line on is not read "
                             "(split the manifest)")
                return
            yield rec

    def _row_dict(self, rec: Record) -> dict[str, str]:
        return dict(zip(self.columns, rec.fields or []))

    def _inputs(self) -> Iterator[tuple]:
        """The inputs in order, streamed: ``("row", line, row)`` of a manifest, ``("file", path,
        label)`` of a folder or file list, ``("reject", input, code, reason)`` for what cannot be
        read (a manifest line over its bounds, a symlink met by the walk, an empty source)."""
        if self.manifest is not None:
            any_row = False
            for rec in self._rows():
                any_row = True
                if rec.fields is None:
                    ref = f"manifest line {rec.line}" + ("-" if rec.code == "too_many_rows" else "")
                    yield ("reject", ref, rec.code, rec.reason)
                    continue
                yield ("row", rec.line, self._row_dict(rec))
            if not any_row:
                yield ("reject", "manifest", "empty_source", "manifest lists no images")
            return
        if self.files is not None:
            entries: Iterator[tuple[Path, str] | Rejection] = ((Path(p), self._rel(Path(p))) for p in self.files)
        else:
            entries = walk_files(self.root, SKIP_NAMES)
        empty = True
        for entry in entries:
            empty = False
            if isinstance(entry, Rejection):
                yield ("reject", entry.input, entry.reason_code, entry.reason)
                continue
            path, _ = entry
            label = path.parent.name if self.label_from_folder and path.parent != self.root else None
            yield ("file", str(path), label)
        if empty:
            yield ("reject", ".", "empty_source", "folder holds no files; nothing to ingest")

    def _read_input(self, entry: tuple) -> Item | Rejection:
        if entry[0] == "row":
            return self._from_row(entry[1], entry[2])
        if entry[0] == "file":
            return self.read(Path(entry[1]), {"label": entry[2]} if entry[2] else {})
        _, name, code, reason = entry
        if code not in ("empty_source",) and not name.startswith("manifest line"):
            name = self.paths.name(name)  # a file met by the walk: named as the collection names files
        return Rejection(name, code, reason)

    def __iter__(self) -> Iterator[Item | Rejection]:
        for entry in self._inputs():  # streamed: a manifest is never held in memory
            yield self._read_input(entry)

    # A distributed ingest lists the inputs once (``parts``, on the driver) and reads the parts
    # elsewhere (``read_part`` on a light copy from ``part_reader``, given the secret there).
    def parts(self, size: int = 0) -> list[dict[str, Any]]:
        """The inputs in order (see :meth:`_inputs`), in groups of ``size`` (0: one group):
        ``{"inputs": [...]}``."""
        inputs = list(self._inputs())
        if not size:
            return [{"inputs": inputs}]
        return [{"inputs": inputs[i:i + size]} for i in range(0, len(inputs), size)]

    def read_part(self, part: dict[str, Any]) -> Iterator[Item | Rejection]:
        """Items and rejections of one group of :meth:`parts`, in order."""
        for entry in part.get("inputs", ()):
            yield self._read_input(entry)

    def part_reader(self) -> "ImageSource":
        """A copy that reads parts: without the file list and without the secret (set ``secret``
        on it where it runs; its path naming takes the key then, see :meth:`PathNamer.keyed`)."""
        reader = copy.copy(self)
        reader.files, reader.secret, reader.paths = None, b"", self.paths.without_secret()
        return reader

    def _from_row(self, line: int, row: dict[str, str]) -> Item | Rejection:
        rel = (row.get("path") or "").strip()
        ref = f"manifest line {line}"
        if not rel:
            return Rejection(ref, "missing_path", "manifest row has an empty 'path'")
        name = self.paths.name(rel)
        listed = self.manifest_dir / rel
        problem = check_file(listed, name)
        if problem is not None and problem.reason_code == "bad_path":
            return problem
        if problem is not None and problem.reason_code == "symlink":
            return problem
        try:
            inside = listed.resolve().is_relative_to(self.manifest_dir)
        except (OSError, RuntimeError):
            inside = False
        if not inside:
            return Rejection(name, "outside_root", "path leaves the manifest's folder; refused")
        if problem is not None:
            if problem.reason_code == "missing_file":
                return Rejection(name, "missing_file", f"file listed on {ref} does not exist")
            if problem.reason_code == "is_a_folder":
                return Rejection(name, "is_a_folder", f"path on {ref} names a folder, not an image file; list "
                                                      "each image file in the manifest")
            return problem
        meta: dict[str, Any] = {}
        for key, value in row.items():
            if key == "path" or value is None:
                continue
            value = value.strip()
            if not value:
                continue
            meta[key] = float(value) if key in self.numeric else value
        if self.label_column != "label":
            meta["label"] = meta.get(self.label_column)
        item = self.read(listed, meta)
        if self.text_column is not None and isinstance(item, Item):
            item.text = meta.pop(self.text_column, None)  # the case's report: its text, not a metadata column
            item.metadata.pop(self.text_column, None)
        return item

    def _rel(self, path: Path) -> str:
        base = getattr(self, "manifest_dir", self.root)
        try:
            return str(path.relative_to(base))
        except ValueError:
            try:
                return str(path.resolve().relative_to(base))
            except (ValueError, OSError):
                return path.name

    def read(self, path: Path, meta: dict[str, Any]) -> Item | Rejection:
        """Read one file into an item, or say why not."""
        rel = self._rel(path)
        name = self.paths.name(rel)
        problem = check_file(path, name)
        if problem is not None:
            return problem
        meta = dict(meta)
        if meta.get("patient_id"):
            meta["patient_id"] = pseudonym(str(meta["patient_id"]), self.secret, "patient")
        try:
            size = path.stat().st_size
        except OSError as exc:
            return Rejection(name, "unreadable", f"cannot read file: {exc.strerror or exc}")
        if size == 0:
            return Rejection(name, "empty_file", "file is empty")
        dicom = is_dicom(path) or path.suffix.lower() in (".dcm", ".dicom")
        if not dicom and size > self.config.max_file_bytes:
            return Rejection(name, "too_large", f"file is {size / 2**20:.0f} MiB (limit "
                                                f"{self.config.max_file_bytes / 2**20:.0f} MiB)")
        try:
            digest = sha256_file(path)
        except OSError as exc:
            return Rejection(name, "unreadable", f"cannot read file: {exc.strerror or exc}")
        source = self.paths.source(rel)
        prov: dict[str, Any] = {"file": source, "sha256": digest}
        if dicom:
            try:
                image, dmeta, dprov = read_dicom(path, self.secret, self.dicom_options)
            except DicomReadError as exc:
                return Rejection(name, exc.code, self.paths.clean(str(exc), path, rel))
            for key, value in dmeta.items():
                meta.setdefault(key, value)
            prov.update(dprov)
        else:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    with Image.open(path) as im:
                        im.load()
                        image = im.convert("RGB") if im.mode not in ("L", "RGB") else im.copy()
            except UnidentifiedImageError:
                code = "not_an_image" if path.suffix.lower() not in IMAGE_SUFFIXES else "corrupt_image"
                return Rejection(name, code, "not an image or DICOM file Pillow or pydicom can read")
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                return Rejection(name, "too_large", f"image too large to decode safely: {exc}")
            except (OSError, ValueError, SyntaxError) as exc:
                return Rejection(name, "corrupt_image", self.paths.clean(f"image could not be decoded: {exc}", path, rel))
            prov.update({"reader": "pillow", "size": list(image.size)})
        return Item(id=content_id(digest), kind="image", input=name, source=source, image=image,
                    metadata=meta, provenance=prov)

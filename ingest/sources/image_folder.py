"""Image folders: PNG/JPEG/TIFF/... and DICOM files (recognised by preamble or .dcm suffix),
optionally described by a CSV manifest.

Manifest columns: ``path`` (required, relative to the manifest's folder), ``label``,
``patient_id`` (pseudonymised before it is stored); every other column becomes metadata (numbers
when every value in the column is a number). Without a manifest every file under the folder is
read, and with ``label_from_folder`` its parent folder name is its label.
"""

from __future__ import annotations

import copy
import csv
import warnings
from pathlib import Path
from typing import Any, Iterator

from PIL import Image, UnidentifiedImageError

from caselens.errors import SourceError
from caselens.ingest.deid import check_key, pseudonym
from caselens.ingest.items import Item, Rejection, content_id, sha256_file
from caselens.ingest.sources.dicom import DicomOptions, DicomReadError, is_dicom, read_dicom

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm"}
SKIP_NAMES = {"manifest.csv", ".ds_store", "thumbs.db", "dicomdir"}


def _numeric_columns(rows: list[dict[str, str]], columns: list[str]) -> set[str]:
    numeric = set()
    for col in columns:
        values = [r.get(col, "") for r in rows if (r.get(col) or "").strip()]
        if not values:
            continue
        try:
            [float(v) for v in values]
        except ValueError:
            continue
        numeric.add(col)
    return numeric


class ImageSource:
    """Images (and DICOM instances) from a folder or a list of files, with an optional manifest."""

    kind = "image"

    def __init__(self, root: Path | None = None, manifest: Path | None = None, *, secret: bytes,
                 label_from_folder: bool = False, files: list[Path] | None = None,
                 dicom_options: DicomOptions | None = None, label_column: str = "label",
                 text_column: str | None = None):
        self.dicom_options = dicom_options  # how DICOM files are read (window, burned-in policy...)
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
        self.rows: list[dict[str, str]] | None = None
        self.numeric: set[str] = set()
        if root is not None and files is None and not self.root.is_dir():
            raise SourceError(f"image folder {root} does not exist or is not a folder")
        if manifest is not None:
            manifest = Path(manifest).expanduser()
            if not manifest.is_file():
                raise SourceError(f"manifest {manifest} does not exist")
            with manifest.open(newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                columns = [c for c in (reader.fieldnames or [])]
                if "path" not in columns:
                    raise SourceError(f"manifest {manifest} has no 'path' column (columns: {columns}); "
                                      "add one with each image's path relative to the manifest")
                if text_column is not None and text_column not in columns:
                    raise SourceError(f"manifest {manifest} has no column {text_column!r} for case texts "
                                      f"(columns: {', '.join(columns)}); name it with --text-column")
                if label_column != "label" and label_column not in columns:
                    raise SourceError(f"manifest {manifest} has no column {label_column!r} for labels "
                                      f"(columns: {', '.join(columns)}); name the label column with --label-column")
                self.rows = list(reader)
            self.manifest_dir = manifest.resolve().parent
            self.numeric = _numeric_columns(self.rows, [c for c in columns if c not in
                                                        ("path", "label", "patient_id", label_column, text_column)])
            if label_column == "label" and "label" not in columns:
                self.notes.append(f"manifest {manifest.name} has no 'label' column: items have no labels (name "
                                  f"the label column with --label-column; columns: {', '.join(columns)})")

    def input_record(self) -> dict[str, Any]:
        """The folder its items' sources are relative to, and how DICOM files were read, for the
        collection's local inputs file (:mod:`caselens.ingest.inputs`; never an index column)."""
        from dataclasses import asdict

        base = getattr(self, "manifest_dir", self.root)
        return {"kind": "images", "root": str(Path(base).resolve()),
                "dicom": asdict(self.dicom_options or DicomOptions())}

    def estimate(self) -> int | None:
        if self.rows is not None:
            return len(self.rows)
        if self.files is not None:
            return len(self.files)
        return None

    def _walk(self) -> Iterator[Path]:
        for path in sorted(self.root.rglob("*")):
            if path.is_file() and not path.name.startswith(".") and path.name.lower() not in SKIP_NAMES:
                yield path

    def __iter__(self) -> Iterator[Item | Rejection]:
        for part in self.parts():
            yield from self.read_part(part)

    # A distributed ingest lists the inputs once (``parts``, on the driver) and reads the parts
    # elsewhere (``read_part`` on a light copy from ``part_reader``, given the secret there).
    def parts(self, size: int = 0) -> list[dict[str, Any]]:
        """The inputs in order, in groups of ``size`` (0: one group): manifest rows
        ``{"rows": [(line, row), ...]}`` or files ``{"files": [(path, label), ...]}``;
        ``{"reject": (input, code, reason)}`` for an empty source."""
        if self.rows is not None:
            if not self.rows:
                return [{"reject": (str(self.manifest_dir / "manifest"), "empty_source", "manifest lists no images")}]
            rows = list(enumerate(self.rows, start=2))
            return [{"rows": rows[i:i + size]} for i in range(0, len(rows), size)] if size else [{"rows": rows}]
        paths = list(self.files) if self.files is not None else list(self._walk())
        if not paths:
            return [{"reject": (str(self.root), "empty_source", "folder holds no files; nothing to ingest")}]
        files = [(str(p), p.parent.name if self.label_from_folder and p.parent != self.root else None) for p in paths]
        return [{"files": files[i:i + size]} for i in range(0, len(files), size)] if size else [{"files": files}]

    def read_part(self, part: dict[str, Any]) -> Iterator[Item | Rejection]:
        """Items and rejections of one group of :meth:`parts`, in order."""
        if "reject" in part:
            yield Rejection(*part["reject"])
        for line, row in part.get("rows", ()):
            yield self._from_row(line, row)
        for path, label in part.get("files", ()):
            yield self.read(Path(path), {"label": label} if label else {})

    def part_reader(self) -> "ImageSource":
        """A copy that reads parts: without the manifest rows and without the secret (set
        ``secret`` on it where it runs)."""
        reader = copy.copy(self)
        reader.rows, reader.files, reader.secret = None, None, b""
        return reader

    def _from_row(self, line: int, row: dict[str, str]) -> Item | Rejection:
        rel = (row.get("path") or "").strip()
        ref = f"manifest line {line}"
        if not rel:
            return Rejection(ref, "missing_path", "manifest row has an empty 'path'")
        path = (self.manifest_dir / rel).resolve()
        if not path.is_relative_to(self.manifest_dir):
            return Rejection(rel, "outside_root", "path leaves the manifest's folder; refused")
        if not path.is_file():
            return Rejection(rel, "missing_file", f"file listed on {ref} does not exist")
        meta: dict[str, Any] = {}
        for key, value in row.items():
            if key in (None, "path") or value is None:
                continue
            value = value.strip()
            if not value:
                continue
            meta[key] = float(value) if key in self.numeric else value
        if self.label_column != "label":
            meta["label"] = meta.get(self.label_column)
        item = self.read(path, meta)
        if self.text_column is not None and isinstance(item, Item):
            item.text = meta.pop(self.text_column, None)  # the case's report: its text, not a metadata column
            item.metadata.pop(self.text_column, None)
        return item

    def _rel(self, path: Path) -> str:
        base = getattr(self, "manifest_dir", self.root)
        try:
            return str(path.relative_to(base))
        except ValueError:
            return path.name

    def read(self, path: Path, meta: dict[str, Any]) -> Item | Rejection:
        """Read one file into an item, or say why not."""
        rel = self._rel(path)
        if path.is_symlink():
            return Rejection(rel, "symlink", "symbolic link; not followed (copy the file into the folder instead)")
        meta = dict(meta)
        if meta.get("patient_id"):
            meta["patient_id"] = pseudonym(str(meta["patient_id"]), self.secret, "patient")
        try:
            digest = sha256_file(path)
        except OSError as exc:
            return Rejection(rel, "unreadable", f"cannot read file: {exc.strerror or exc}")
        if path.stat().st_size == 0:
            return Rejection(rel, "empty_file", "file is empty")
        prov: dict[str, Any] = {"file": rel, "sha256": digest}
        if is_dicom(path) or path.suffix.lower() in (".dcm", ".dicom"):
            try:
                image, dmeta, dprov = read_dicom(path, self.secret, self.dicom_options)
            except DicomReadError as exc:
                return Rejection(rel, exc.code, str(exc))
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
                return Rejection(rel, code, "not an image or DICOM file Pillow or pydicom can read")
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                return Rejection(rel, "too_large", f"image too large to decode safely: {exc}")
            except (OSError, ValueError, SyntaxError) as exc:
                return Rejection(rel, "corrupt_image", f"image could not be decoded: {exc}")
            prov.update({"reader": "pillow", "size": list(image.size)})
        return Item(id=content_id(digest), kind="image", input=rel, source=rel, image=image,
                    metadata=meta, provenance=prov)

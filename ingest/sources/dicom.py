"""One DICOM file -> a normalised 8-bit 2D image plus de-identified metadata.

Pixels: rescale slope/intercept (modality LUT), then the file's own window (first
WindowCenter/WindowWidth) when present, else a 0.5-99.5 percentile window; MONOCHROME1 is
inverted; colour images (RGB, YBR converted by pydicom) are scaled to 8 bits; multi-frame files
give their middle frame (the frame index is kept in the provenance).
Metadata: modality, body part, view, and *pseudonymised* patient, study and series identifiers.
Names, dates, institutions and free text are not read at all.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from caselens.ingest.deid import pseudonym

MAX_DECODED_BYTES = 1 << 30  # refuse files whose pixel data would decode to more than 1 GiB


class DicomReadError(ValueError):
    """A DICOM file that cannot give an image; ``code`` is the ledger reason code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def is_dicom(path: Path) -> bool:
    """True when the file has the DICOM preamble ("DICM" at byte 128)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _window(values: np.ndarray, ds: Any) -> tuple[np.ndarray, dict[str, Any]]:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        c = float(center[0] if hasattr(center, "__len__") and not isinstance(center, str) else center)
        w = float(width[0] if hasattr(width, "__len__") and not isinstance(width, str) else width)
        if w > 1:
            lo, hi = c - w / 2, c + w / 2
            return np.clip((values - lo) / (hi - lo), 0, 1), {"window": "file", "center": c, "width": w}
    lo, hi = np.percentile(values, [0.5, 99.5])
    if hi <= lo:
        return np.zeros_like(values, dtype=np.float32), {"window": "constant"}
    return np.clip((values - lo) / (hi - lo), 0, 1), {"window": "percentile", "low": 0.5, "high": 99.5}


def read_dicom(path: Path, secret: bytes) -> tuple[Image.Image, dict[str, Any], dict[str, Any]]:
    """Read ``path`` into (image, metadata, provenance); raises :class:`DicomReadError`.

    pydicom's own log and warnings are silenced while reading: every problem ends as the
    raised error's reason, not as noise on the console.
    """
    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _read_dicom(path, secret)
    except DicomReadError:
        raise
    except Exception as exc:  # any other failure on odd input is a rejection, never a crash
        raise DicomReadError("corrupt_dicom", f"DICOM file could not be read ({type(exc).__name__}: {exc})") from None
    finally:
        logger.setLevel(level)


def _read_dicom(path: Path, secret: bytes) -> tuple[Image.Image, dict[str, Any], dict[str, Any]]:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(str(path), force=not is_dicom(path))
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError) as exc:
        raise DicomReadError("corrupt_dicom", f"not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    meta = getattr(ds, "file_meta", None)
    if len(ds) == 0 or (not (meta is not None and "TransferSyntaxUID" in meta)
                        and "SOPClassUID" not in ds and "Rows" not in ds):
        raise DicomReadError("corrupt_dicom", "no recognisable DICOM header (no transfer syntax, SOP class or image size)")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DicomReadError("no_pixel_data", "DICOM file has no pixel data (a report, structure or DICOMDIR?)")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    decoded = rows * cols * frames * samples * max(bits, 8) // 8
    if rows <= 0 or cols <= 0:
        raise DicomReadError("bad_header", f"DICOM header gives image size {rows}x{cols}")
    if decoded > MAX_DECODED_BYTES:
        raise DicomReadError("too_large", f"pixel data would decode to {decoded / 2**20:.0f} MiB "
                                          f"(limit {MAX_DECODED_BYTES / 2**20:.0f} MiB)")
    tsuid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        arr = ds.pixel_array
    except Exception as exc:  # decoders raise many types; every one is a rejection, never a crash
        name = getattr(tsuid, "name", str(tsuid))
        raise DicomReadError("undecodable_pixels", f"pixel data could not be decoded (transfer syntax "
                                                   f"{name}; {type(exc).__name__}: {exc})") from None
    frame = None
    if frames > 1:
        frame = frames // 2
        arr = arr[frame]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    prov: dict[str, Any] = {"reader": "pydicom", "frames": frames, "photometric": photometric,
                            "transfer_syntax": str(tsuid) if tsuid else None}
    if frame is not None:
        prov["frame"] = frame
    if samples == 3 or arr.ndim == 3:
        arr = arr.astype(np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        image = Image.fromarray((scaled * 255).round().astype(np.uint8), "RGB")
        prov["window"] = "minmax"
    else:
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32) if "RescaleSlope" in ds or "ModalityLUTSequence" in ds else arr.astype(np.float32)
        norm, window = _window(values, ds)
        prov.update(window)
        if photometric == "MONOCHROME1":
            norm = 1.0 - norm
        image = Image.fromarray((norm * 255).round().astype(np.uint8), "L")
    metadata: dict[str, Any] = {
        "modality": str(ds.get("Modality", "")) or None,
        "body_part": str(ds.get("BodyPartExamined", "")) or None,
        "view_position": str(ds.get("ViewPosition", "")) or None,
    }
    for key, tag, kind in (("patient_id", "PatientID", "patient"), ("study_uid", "StudyInstanceUID", "uid"),
                           ("series_uid", "SeriesInstanceUID", "uid")):
        value = str(ds.get(tag, "") or "").strip()
        metadata[key] = pseudonym(value, secret, kind) if value else None
    return image, metadata, prov

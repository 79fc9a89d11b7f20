"""Seed inputs for the fuzz targets, made at run time (nothing binary is kept in the repository):
pydicom's test files and a DICOMDIR, small images in several formats, text PDFs, manifests and
corpora."""

from __future__ import annotations

import io
import json
from pathlib import Path

from targets import TARGETS


def _images() -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for fmt, mode in (("PNG", "L"), ("PNG", "RGB"), ("JPEG", "RGB"), ("TIFF", "L"), ("BMP", "RGB"), ("GIF", "P"),
                      ("WEBP", "RGB"), ("PPM", "RGB")):
        im = Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8), "RGB").convert(mode)
        buf = io.BytesIO()
        im.save(buf, fmt)
        out.append(buf.getvalue())
    return out


def _dicom() -> list[bytes]:
    import pydicom.data

    folder = Path(pydicom.data.__file__).parent / "test_files"
    names = ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg.dcm", "examples_palette.dcm",
             "examples_ybr_color.dcm", "JPEG2000.dcm", "MR_small_jpeg_ls_lossless.dcm", "rtplan.dcm",
             "MR_truncated.dcm", "ExplVR_BigEnd.dcm", "no_meta.dcm"]
    return [(folder / n).read_bytes() for n in names if (folder / n).exists()]


def _dicomdir() -> list[bytes]:
    import pydicom.data

    folder = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests"
    return [(folder / "DICOMDIR").read_bytes()] if (folder / "DICOMDIR").exists() else []


def _pdfs() -> list[bytes]:
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    try:
        from test_pdf import write_text_pdf  # the test suite's real-PDF writer
    finally:
        sys.path.pop(0)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, pages in enumerate([[["The lungs exchange oxygen with the blood.", "Figure 1.2 shows it."]],
                                   [["Page one about bone tissue and osteoblasts."], ["Page two about cartilage."]]]):
            out.append(write_text_pdf(Path(tmp) / f"{i}.pdf", pages).read_bytes())
    return out


def _manifests() -> list[bytes]:
    return [b"path,label,patient_id,age\na.png,x,P1,40\nb.png,y,P2,old\n,z,,\n../up.png,w,P3,1\n",
            b'\xef\xbb\xbfpath,label\n"a.png","multi\nline"\n', b"file,label\na.png,x\n"]


def _jsonl() -> list[bytes]:
    rows = [{"id": "a", "text": "pleural effusion", "meta": {"k": [1, 2]}}, {"id": 5, "text": "x"}, {"text": "no id"},
            [1, 2], "str"]
    return ["\n".join(json.dumps(r) for r in rows).encode() + b"\n{bad json\n"]


def _csv() -> list[bytes]:
    return [b'id,text,note\na,"some ""quoted"" text",=cmd\nb,"multi\nline",\n,missing id,\n']


SEEDS = {"dicom": _dicom, "dicomdir": _dicomdir, "image": _images, "pdf": _pdfs, "manifest": _manifests,
         "jsonl": _jsonl, "csv": _csv}


def write_seeds(target: str, folder: Path) -> int:
    """Seed files of ``target`` (or of every target, prefixed with its selector byte, for "all")."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    if target == "all":
        names = sorted(TARGETS)
        for i, name in enumerate(names):
            for data in SEEDS[name]():
                (folder / f"{name}-{n}").write_bytes(bytes([i]) + data)
                n += 1
        return n
    for data in SEEDS[target]():
        (folder / f"{target}-{n}").write_bytes(data)
        n += 1
    return n

"""Every input gets a ledger row: several --dicom folders, a manifest path naming a folder, and
symlinked folders in image, text, PDF and DICOM inputs (rejected, never skipped in silence)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from caselens.errors import SourceError
from caselens.indexes.collection import Collection
from caselens.ingest.items import Rejection
from caselens.ingest.sources.image_folder import ImageSource
from caselens.ingest.sources.pdf import PdfOptions, PdfSource
from caselens.ingest.sources.text_folder import TextFolderSource
from caselens.cli import main

from test_pdf import write_text_pdf

KEY = bytes(range(32))  # a pseudonym key (collections make their own)


def _dicom(name: str) -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file(name))


def test_dicom_with_several_folders_and_files(home: Path, tmp_path: Path, capsys) -> None:
    a, b = tmp_path / "dirA", tmp_path / "dirB"
    (a / "s1").mkdir(parents=True)
    b.mkdir()
    shutil.copy(_dicom("CT_small.dcm"), a / "s1" / "IM1")
    shutil.copy(_dicom("MR_small.dcm"), b / "IM1")  # the same name in both: told apart by folder
    single = tmp_path / "loose.dcm"
    shutil.copy(_dicom("MR_small_RLE.dcm"), single)
    h = ["--home", str(home)]
    assert main(h + ["ingest", "two", "--dicom", str(a), str(b), str(single), str(tmp_path / "gone"),
                     "--source-paths", "relative", "-q"]) == 0
    coll = Collection.open("two", home)
    ledger = {e["input"]: e for e in coll.ledger()}
    assert {k: v["status"] for k, v in ledger.items()} == {
        "dirA/s1/IM1": "accepted", "dirB/IM1": "accepted", "loose.dcm": "accepted", "gone": "rejected"}
    assert ledger["gone"]["reason_code"] == "missing_file"
    assert coll.count() == 3
    # a single missing path is an error to fix, not an input to record
    assert main(h + ["ingest", "two", "--dicom", str(tmp_path / "nope")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_manifest_path_naming_a_folder_has_its_own_reason(tmp_path: Path) -> None:
    Image.new("L", (8, 8), 9).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "manifest.csv").write_text("path,label\na.png,x\nsub,y\nmissing.png,z\n")
    out = list(ImageSource(manifest=tmp_path / "manifest.csv", secret=KEY))
    codes = {x.input: x.reason_code for x in out if isinstance(x, Rejection)}
    assert codes == {"sub": "is_a_folder", "missing.png": "missing_file"}
    assert "folder" in next(x for x in out if getattr(x, "input", "") == "sub").reason
    with pytest.raises(SourceError, match="is a folder"):
        ImageSource(manifest=tmp_path / "sub", secret=KEY)


def test_symlinks_get_a_rejection_row_in_every_folder_source(home: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("L", (8, 8), 9).save(outside / "o.png")
    (outside / "o.md").write_text("# outside\nnot to be read")
    write_text_pdf(outside / "o.pdf", [["outside page text, long enough to count"]])
    # images (and a manifest listing a symlinked file)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("L", (8, 8), 50).save(images / "in.png")
    os.symlink(outside, images / "linked_folder")
    os.symlink(outside / "o.png", images / "linked.png")
    codes = {x.input: getattr(x, "reason_code", "item") for x in ImageSource(images, secret=KEY)}
    assert codes == {"in.png": "item", "linked_folder": "symlink", "linked.png": "symlink"}
    (images / "manifest.csv").write_text("path\nin.png\nlinked.png\n")
    codes = {x.input: getattr(x, "reason_code", "item") for x in ImageSource(manifest=images / "manifest.csv", secret=KEY)}
    assert codes == {"in.png": "item", "linked.png": "symlink"}
    # text folders and PDF folders
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.md").write_text("# A\ninside")
    os.symlink(outside, texts / "more")
    assert {x.input: getattr(x, "reason_code", "item") for x in TextFolderSource(texts)} == {
        "a.md": "item", "more": "symlink"}
    pdfs = tmp_path / "pdfs"
    pdfs.mkdir()
    os.symlink(outside, pdfs / "shelf")
    os.symlink(outside / "o.pdf", pdfs / "o.pdf")
    assert {x.input: x.reason_code for x in PdfSource(pdfs, PdfOptions(ocr=False))} == {
        "shelf": "symlink", "o.pdf": "symlink"}
    # through the CLI: the ledger has the row
    assert main(["--home", str(home), "ingest", "imgs", "--images", str(images), "-q"]) == 0
    ledger = {e["input"]: e["reason_code"] for e in Collection.open("imgs", home).ledger()}
    assert ledger.get("linked_folder") == "symlink" and ledger.get("linked.png") == "symlink"


def test_ledger_json_names_every_input_of_a_mixed_export(home: Path, tmp_path: Path, capsys) -> None:
    export = tmp_path / "export"
    export.mkdir()
    shutil.copy(_dicom("CT_small.dcm"), export / "IM1")
    (export / "notes.txt").write_text("not dicom")
    os.symlink(tmp_path, export / "loop")
    assert main(["--home", str(home), "ingest", "mix", "--dicom", str(export), "-q"]) == 0
    capsys.readouterr()
    assert main(["--home", str(home), "ledger", "mix", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted(r["reason_code"] or r["status"] for r in rows) == ["accepted", "not_dicom", "symlink"]

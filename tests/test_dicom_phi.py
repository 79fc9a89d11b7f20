"""PHI canaries planted in real DICOM files never reach what caselens stores or prints."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

from caselens.ingest.deid import PROFILE, deidentify_dataset, kept_metadata, pseudonym, shift_date
from caselens.cli import main

KEY = bytes(range(32))  # a pseudonym key (collections make their own)

CANARIES = {
    "PatientName": "Canarybird^Zebedee",
    "PatientID": "CANARY-PID-0042",
    "PatientBirthDate": "19120623",
    "InstitutionName": "Canary Royal Infirmary",
    "InstitutionAddress": "1 Canary Wharf Lane",
    "AccessionNumber": "ACCCANARY77",
    "ReferringPhysicianName": "Doctor^Canaryson",
    "OperatorsName": "Tech^Canarylee",
    "StudyDescription": "CANARY STUDY DESCRIPTION",
    "SeriesDescription": "CANARY SERIES DESCRIPTION",
    "ImageComments": "Canary comment: patient lives at 9 Canary Row",
    "PatientComments": "Canary patient comment",
    "StudyID": "CANSTUDY9",
    "StudyInstanceUID": "1.2.826.0.1.3680043.99.424242.1",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.99.424242.2",
    "StudyDate": "20190314",
}
PRIVATE_CANARY = "CANARY-PRIVATE-9931"
SOURCES = ["CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm"]


def _plant(folder: Path) -> list[Path]:
    folder.mkdir()
    out = []
    for i, name in enumerate(SOURCES):
        ds = pydicom.dcmread(get_testdata_file(name))
        for key, value in CANARIES.items():
            setattr(ds, key, value)
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.99.424242.10{i}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        block = ds.private_block(0x0011, "CANARYCO", create=True)
        block.add_new(0x01, "LO", PRIVATE_CANARY)
        path = folder / f"IM{i:04d}"  # no PHI in file names, no suffix
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def _needles() -> list[bytes]:
    values = list(CANARIES.values()) + [PRIVATE_CANARY, "424242", "Zebedee", "Canary", "CANARY", "19120623", "20190314"]
    return sorted({v.encode() for v in values})


def test_deidentified_header_drops_or_replaces_every_canary(tmp_path: Path) -> None:
    path = _plant(tmp_path / "in")[0]
    ds = pydicom.dcmread(path)
    original = path.read_bytes()
    clean = deidentify_dataset(ds, KEY)
    assert path.read_bytes() == original  # the original file is never modified
    dumped = str(clean).encode() + json.dumps(clean.to_json_dict()).encode()
    for needle in _needles():
        assert needle not in dumped, needle
    assert clean.PatientIdentityRemoved == "YES" and "113100" in clean.DeidentificationMethod
    assert clean.StudyInstanceUID == pseudonym(CANARIES["StudyInstanceUID"], KEY, "uid")
    meta = kept_metadata(ds, KEY)
    assert meta["patient_id"] == pseudonym("CANARY-PID-0042", KEY, "patient")
    # dates shift per patient and keep intervals
    shifted = meta["study_date"]
    assert shifted != "20190314" and len(shifted) == 8
    assert shift_date("20190324", 0) == "20190324"
    ds2 = pydicom.dcmread(path)
    ds2.StudyDate = "20190324"
    later = kept_metadata(ds2, KEY)["study_date"]
    import datetime as dt

    gap = dt.datetime.strptime(later, "%Y%m%d") - dt.datetime.strptime(shifted, "%Y%m%d")
    assert gap.days == 10


def test_dicom_phi_canaries_never_reach_tables_indexes_ledger_logs_or_output(
        home: Path, tmp_path: Path, capsys, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    files = _plant(tmp_path / "export")
    h = ["--home", str(home)]
    assert main(["-v"] + h + ["scan", str(tmp_path / "export")]) == 0
    assert main(["-v"] + h + ["ingest", "phi", "--dicom", str(tmp_path / "export"), "--workers", "1"]) == 0
    assert main(["-v"] + h + ["ingest", "phi-series", "--dicom", str(tmp_path / "export"), "--unit", "study"]) == 0
    for f in files[:2]:
        assert main(h + ["search", "phi", "--image", str(f), "--json", "--k", "4"]) == 0
    assert main(h + ["search", "phi", "--image", str(files[0]), "--k", "4"]) == 0
    assert main(h + ["ledger", "phi", "--json"]) == 0
    assert main(h + ["ledger", "phi"]) == 0
    assert main(h + ["info", "phi"]) == 0
    assert main(h + ["scan", str(tmp_path / "export"), "--collection", "phi", "--json"]) == 0
    out = capsys.readouterr()
    printed = (out.out + out.err + caplog.text).encode()
    stored = {p: p.read_bytes() for p in home.rglob("*") if p.is_file()}
    assert any(p.suffix == ".lance" for p in stored) and any(p.name == "index.faiss" for p in stored)
    assert any("ledger.lance" in str(p) for p in stored)
    for needle in _needles():
        assert needle not in printed, needle
        for path, data in stored.items():
            assert needle not in data, (needle, path)
    # positive control: the byte scan does see what is stored (the pseudonym, in clear, in the table)
    secret = (home / "phi" / "secret.key").read_text().strip()
    pid = pseudonym("CANARY-PID-0042", bytes.fromhex(secret), "patient").encode()
    assert any(pid in data for path, data in stored.items() if "items.lance" in str(path))
    assert pid in printed  # scan --collection prints the same pseudonyms ingest stored


def test_profile_is_recorded_with_every_dicom_item(home: Path, tmp_path: Path) -> None:
    from caselens.indexes.collection import Collection

    _plant(tmp_path / "export")
    assert main(["--home", str(home), "ingest", "phi", "--dicom", str(tmp_path / "export"), "-q"]) == 0
    coll = Collection.open("phi", home)
    rows = coll.rows(columns=["provenance", "patient_id", "study_date", "instance_uid"]).to_pylist()
    assert len(rows) == 4
    for row in rows:
        prov = json.loads(row["provenance"])
        assert prov["deid"] == "PS3.15-E.1-basic+113107"
        assert row["patient_id"].startswith("pt-") and row["instance_uid"].startswith("2.25.")
        assert row["study_date"] != CANARIES["StudyDate"]
    assert PROFILE["codes"] == ["113100", "113107"]

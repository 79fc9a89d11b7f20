"""Clinical imaging ingest on real DICOM: discovery, decoding, windows, safety, units, workers."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from caselens.indexes.collection import Collection
from caselens.ingest.dicom_scan import scan, walk_inputs
from caselens.ingest.items import Item, Rejection
from caselens.ingest.pipeline import IngestConfig, ingest
from caselens.ingest.sources.dicom import WINDOW_PRESETS, DicomOptions, decode_frames, read_dicom
from caselens.ingest.sources.dicom_source import DicomSource, DicomSourceConfig
from caselens.ingest.volumes import pool, sample_indices
from caselens.cli import main
from caselens.ingest.encoders import load_encoder
from caselens.errors import QueryError

from conftest import SHARED_DATA, needs_shared

KEY = bytes(range(32))  # a pseudonym key (collections make their own)

QUIET = IngestConfig(progress=False)
WG04 = SHARED_DATA / "dicom" / "wg04"


def _pydicom_dir() -> Path:
    import pydicom.data

    return Path(pydicom.data.__file__).parent / "test_files"


def _deid_dir() -> Path:
    import deid_data

    return Path(deid_data.__file__).parent


def _ingest(home: Path, source: DicomSource, name: str = "ct"):
    enc = load_encoder("classic")
    coll = Collection.open(name, home) if Collection.exists(name, home) else \
        Collection.create(name, enc.info.to_record(), home)
    source.secret = coll.secret()
    return coll, ingest(source, coll, enc, QUIET)


# ------------------------------------------------------------------ discovery
def test_scan_groups_a_dicomdir_tree_by_patient_study_series_without_phi(capsys) -> None:
    dicomdir = _pydicom_dir() / "dicomdirtests" / "DICOMDIR"
    report = scan(dicomdir, KEY)
    summary = report.summary()
    assert (summary["patients"], summary["studies"], summary["series"], summary["instances"]) == (2, 6, 13, 31)
    assert summary["modalities"] == {"MR": 17, "CT": 11, "CR": 3}
    assert all(s["patient"].startswith("pt-") and s["study"].startswith("2.25.") for s in summary["series_list"])
    # the CLI prints the same counts and no identifier in clear
    import pydicom

    names = set()
    for inst in report.instances:
        ds = pydicom.dcmread(inst.path, stop_before_pixels=True)
        names.update({str(ds.PatientName), str(ds.PatientID), str(ds.StudyInstanceUID)})
    assert main(["scan", str(dicomdir), "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["series"] == 13
    for name in names - {""}:
        assert name not in out


def test_scan_of_a_folder_recognises_dicom_by_preamble_not_suffix(tmp_path: Path, capsys) -> None:
    src = _pydicom_dir()
    shutil.copy(src / "CT_small.dcm", tmp_path / "IM0001")  # no suffix, as in PACS exports
    shutil.copy(src / "MR_small.dcm", tmp_path / "IM0002")
    (tmp_path / "notes.txt").write_text("not dicom")
    summary = scan(tmp_path, KEY).summary()
    assert summary["instances"] == 2 and summary["modalities"] == {"CT": 1, "MR": 1}
    assert summary["unreadable_by_reason"] == {"not_dicom": 1}
    assert main(["scan", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 DICOM instances" in out and "not_dicom" in out


def test_symlinks_and_paths_leaving_the_root_are_refused(tmp_path: Path, home: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(_pydicom_dir() / "CT_small.dcm", outside / "secret.dcm")
    root = tmp_path / "export"
    (root / "sub").mkdir(parents=True)
    shutil.copy(_pydicom_dir() / "MR_small.dcm", root / "sub" / "IM1")
    os.symlink(outside / "secret.dcm", root / "link.dcm")
    os.symlink(outside, root / "linkdir")
    entries = list(walk_inputs(root))
    codes = {e.input: e.reason_code for e in entries if isinstance(e, Rejection)}
    assert codes == {"link.dcm": "symlink", "linkdir": "symlink"}
    files = list(walk_inputs(root, files=[outside / "secret.dcm"]))
    assert [e.reason_code for e in files] == ["outside_root"]
    coll, report = _ingest(home, DicomSource(root, KEY))
    assert report.accepted == 1 and dict(report.rejected) == {"symlink": 2}


# ------------------------------------------------------------------ pixels
def test_burned_in_annotation_is_rejected_by_default_and_flagged_when_allowed(home: Path) -> None:
    us = _deid_dir() / "data" / "ultrasounds" / "GREYSCALE_IMAGE.dcm"
    with pytest.raises(Exception) as info:
        read_dicom(us, KEY)
    assert getattr(info.value, "code", None) == "burned_in_annotation"
    image, meta, prov = read_dicom(us, KEY, DicomOptions(allow_burned_in=True))
    assert meta["burned_in_annotation"] == "YES" and image.size[0] > 0


def test_window_presets_and_per_modality_defaults() -> None:
    ct = _pydicom_dir() / "CT_small.dcm"
    base, _, prov = read_dicom(ct, KEY)
    assert prov["window"] == "percentile"  # no window in the file, no body part: percentile
    seen = {}
    for name, (center, width) in WINDOW_PRESETS.items():
        image, _, prov = read_dicom(ct, KEY, DicomOptions(window=name))
        assert prov["window"] == name and prov["center"] == center and prov["width"] == width
        seen[name] = np.asarray(image, np.float32)
    assert seen["brain"].mean() > seen["bone"].mean()  # narrow soft-tissue window saturates more
    assert not np.array_equal(seen["lung"], seen["mediastinum"])
    mr = _pydicom_dir() / "MR_small.dcm"
    _, _, prov = read_dicom(mr, KEY, DicomOptions(window="lung"))
    assert prov["window"] == "percentile"  # presets are Hounsfield units: MR falls back
    with pytest.raises(ValueError, match="choose one of"):
        DicomOptions(window="liver-ish")


def test_photometric_interpretations_and_multiframe() -> None:
    d = _pydicom_dir()
    palette, _, prov = read_dicom(d / "examples_palette.dcm", KEY)
    assert palette.mode == "RGB" and prov["window"] == "palette"
    ybr, _, prov = read_dicom(d / "SC_ybr_full_422_uncompressed.dcm", KEY)
    rgb, _, _ = read_dicom(d / "SC_rgb_small_odd.dcm", KEY)
    assert ybr.mode == "RGB" and rgb.mode == "RGB"
    frames, _, prov = decode_frames(d / "SC_rgb_rle_2frame.dcm", KEY, frames="all")
    assert len(frames) == 2 and prov["frame"] == [0, 1]


@needs_shared(WG04)
def test_wg04_compressed_files_decode_to_the_pixels_of_their_rle_twin() -> None:
    """Lossless syntaxes (JPEG lossless, JPEG-LS lossless, J2K reversible): identical stored values
    and identical 8-bit images. Lossy J2K (J2KI, about 13:1): mean absolute error under 1% of the
    image's value range and correlation above 0.99 (measured: 0.61-0.87%, >= 0.993); 8-bit images
    within 6 grey levels on average (measured 1.7-5.1)."""
    import pydicom

    checked = Counter()
    for folder in ("JPLL", "JLSL", "J2KR", "J2KI"):
        for f in sorted((WG04 / folder).iterdir()):
            twin = WG04 / "RLE" / f.name.replace(folder, "RLE")
            a = pydicom.dcmread(f).pixel_array.astype(np.float64)
            ref_ds = pydicom.dcmread(twin)
            b = ref_ds.pixel_array.astype(np.float64)
            assert a.shape == b.shape, f.name
            if folder == "J2KI":  # lossy: mean error < 1% of the image's range, correlation > 0.99
                span = float(b.max() - b.min())
                assert np.abs(a - b).mean() < 0.01 * span, f.name
                assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99, f.name
            else:
                assert np.array_equal(a, b), f.name
            # and our 8-bit rendering agrees (exactly for lossless)
            ia = np.asarray(read_dicom(f, KEY)[0], np.int16)
            ib = np.asarray(read_dicom(twin, KEY)[0], np.int16)
            assert (np.abs(ia - ib).max() == 0) if folder != "J2KI" else (np.abs(ia - ib).mean() < 6)
            checked[folder] += 1
    assert checked == {"JPLL": 2, "JLSL": 2, "J2KR": 3, "J2KI": 3}


@needs_shared(WG04)
def test_every_test_file_is_ingested_or_rejected_with_a_reason(home: Path, tmp_path: Path) -> None:
    """pydicom's test files, deid-data and WG04: zero crashes, every file in the ledger."""
    root = tmp_path / "all"
    shutil.copytree(_pydicom_dir(), root / "pydicom")
    shutil.copytree(_deid_dir(), root / "deid")
    shutil.copytree(WG04, root / "wg04")
    n_files = sum(1 for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    coll, report = _ingest(home, DicomSource(root, KEY, config=DicomSourceConfig(workers=2, source_paths="relative")),
                           "all")  # names checked below: relative paths (the default for DICOM is hashed)
    ledger = coll.ledger(report.run_id)
    assert len(ledger) == n_files == report.accepted + report.duplicates + sum(report.rejected.values())
    assert all(e["reason_code"] and e["reason"] for e in ledger if e["status"] == "rejected")
    by_input = {e["input"]: e for e in ledger}
    for name in ("wg04/J2KI/CT1_J2KI", "wg04/JLSL/MR1_JLSL", "wg04/RLE/US1_RLE", "pydicom/MR_small_RLE.dcm",
                 "pydicom/JPEG2000.dcm", "pydicom/SC_rgb_jpeg_gdcm.dcm", "deid/data/humans/ctbrain1.dcm"):
        assert by_input[name]["status"] == "accepted", by_input[name]
    assert by_input["pydicom/rtplan.dcm"]["reason_code"] == "no_pixel_data"
    assert by_input["pydicom/README.txt"]["reason_code"] == "not_dicom"
    assert by_input["deid/data/ultrasounds/GREYSCALE_IMAGE.dcm"]["reason_code"] == "burned_in_annotation"
    wg04 = [e for e in ledger if e["input"].startswith("wg04/")]
    assert len(wg04) == 22 and all(e["status"] in ("accepted", "duplicate") for e in wg04)
    assert report.accepted >= 115 and coll.count() == report.accepted


# ------------------------------------------------------------------ units
def test_series_and_study_units_pool_sampled_slices_with_provenance(home: Path) -> None:
    dicomdir = _pydicom_dir() / "dicomdirtests" / "DICOMDIR"
    coll, report = _ingest(home, DicomSource(dicomdir, KEY, config=DicomSourceConfig(unit="series", slices=3)), "series")
    assert report.accepted == 13 and not report.rejected
    ledger = coll.ledger(report.run_id)
    assert len(ledger) == 31 and {e["status"] for e in ledger} == {"accepted"}  # one row per file
    assert len({e["item_id"] for e in ledger}) == 13
    rows = coll.rows(columns=["id", "provenance", "series_uid", "patient_id", "modality"]).to_pylist()
    prov = [json.loads(r["provenance"]) for r in rows]
    assert all(p["unit"] == "series" and p["pooling"] == "mean" and p["slices_used"] <= 3 for p in prov)
    big = max(prov, key=lambda p: p["instances"])
    assert big["instances"] > 3 and big["slices_used"] == 3 and len(big["chosen"]) == 3 and big["slice_choice"]
    assert all(r["series_uid"].startswith("2.25.") for r in rows)
    study_coll, study = _ingest(home, DicomSource(dicomdir, KEY, config=DicomSourceConfig(unit="study", slices=2)), "study")
    assert study.accepted == 6
    sprov = [json.loads(r["provenance"]) for r in study_coll.rows(columns=["provenance"]).to_pylist()]
    assert sum(p["series"] for p in sprov) == 13 and all(p["unit"] == "study" for p in sprov)
    # a second run adds nothing: unit ids are content-addressed
    _, again = _ingest(home, DicomSource(dicomdir, KEY, config=DicomSourceConfig(unit="series", slices=3)), "series")
    assert again.accepted == 0 and again.duplicates == 13


def test_pooling_and_slice_sampling() -> None:
    assert sample_indices(10, 3) == [1, 5, 8] and sample_indices(2, 5) == [0, 1] and sample_indices(0, 3) == []
    v = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
    mean = pool(v, None, "mean")
    assert np.allclose(mean, np.array([2, 2]) / np.linalg.norm([2, 2]))
    mm = pool(v, None, "maxmean")
    assert mm.shape == (4,) and np.isclose(np.linalg.norm(mm), 1)
    study = pool(np.array([[1, 0], [1, 0], [1, 0], [0, 1]], np.float32), [0, 0, 0, 1], "mean")
    assert np.allclose(study, np.array([1, 1]) / np.sqrt(2))  # series weigh equally, not slices


def test_nifti_volumes_go_the_same_way(home: Path, tmp_path: Path) -> None:
    import nibabel as nib

    folder = tmp_path / "nifti"
    folder.mkdir()
    rng = np.random.default_rng(0)
    vol = (rng.normal(40, 30, (32, 32, 20)) - 1000 * (np.arange(20) < 5)).astype(np.int16)
    img = nib.Nifti1Image(vol, np.eye(4))
    img.header["descrip"] = b"PATIENT Canary^Nifti"
    nib.save(img, folder / "ct.nii.gz")
    (folder / "bad.nii").write_bytes(b"\x00" * 50)
    coll, report = _ingest(home, DicomSource(folder, KEY, config=DicomSourceConfig(unit="series", slices=4)), "nii")
    assert report.accepted == 1 and dict(report.rejected) == {"corrupt_nifti": 1}
    prov = json.loads(coll.rows(columns=["provenance"]).to_pylist()[0]["provenance"])
    assert prov["reader"] == "nibabel" and prov["slices"] == sample_indices(20, 4) and prov["pooling"] == "mean"
    stored = b"".join(p.read_bytes() for p in coll.root.rglob("*") if p.is_file())
    assert b"Canary" not in stored


def test_workers_give_the_same_items_as_inline_decoding(home: Path, tmp_path: Path) -> None:
    d = _pydicom_dir()
    folder = tmp_path / "mix"
    folder.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm",
                 "rtplan.dcm", "MR_truncated.dcm", "examples_palette.dcm"):
        shutil.copy(d / name, folder / name)
    inline = [it for it in DicomSource(folder, KEY)]
    # a prefetch bound of 1 byte of pixels: one decoded file waits for the consumer at a time
    for config in (DicomSourceConfig(workers=2), DicomSourceConfig(workers=1, prefetch=2, prefetch_bytes=1)):
        parallel = [it for it in DicomSource(folder, KEY, config)]
        assert [type(x).__name__ for x in inline] == [type(x).__name__ for x in parallel]
        assert [getattr(x, "id", getattr(x, "reason_code", None)) for x in inline] == \
            [getattr(x, "id", getattr(x, "reason_code", None)) for x in parallel]
        for a, b in zip(inline, parallel):
            if isinstance(a, Item):
                assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.metadata == b.metadata


def test_prefetch_is_bounded_by_decoded_pixels_as_well_as_by_files() -> None:
    from caselens.ingest.sources import dicom_source

    d = _pydicom_dir()
    names = ["CT_small.dcm", "MR_small.dcm", "SC_rgb_rle.dcm", "rtplan.dcm", "MR_small_RLE.dcm"] * 3
    tasks = [(str(d / n), n, KEY, DicomOptions()) for n in names]
    one = dicom_source._pixel_bytes(dicom_source._instance_task(*tasks[0]))
    assert one == 128 * 128  # CT_small: one 8-bit plane
    for window_bytes, most in ((0, (len(tasks), len(tasks))), (one, (2, 3))):
        pulled: list[tuple] = []

        def feed(pulled=pulled):
            for t in tasks:
                pulled.append(t)
                yield t

        results = dicom_source.ordered_map(dicom_source._instance_task, feed(), 1, window=100,
                                           window_bytes=window_bytes)
        got = [next(results)]
        # no pixel budget: the whole 100-file window is handed to the worker at once; a budget of
        # one CT_small image: 2 tasks (2 per worker) before a result is seen, then one more
        assert len(pulled) == most[0]
        got.append(next(results))
        assert len(pulled) == most[1]
        got.extend(results)
        assert [getattr(x, "input", None) for x in got] == names
    with pytest.raises(ValueError, match="prefetch"):
        DicomSourceConfig(prefetch=0)


def test_cli_ingests_an_export_folder_with_units_and_workers(home: Path, tmp_path: Path, capsys) -> None:
    dicomdir = _pydicom_dir() / "dicomdirtests"
    h = ["--home", str(home)]
    assert main(h + ["ingest", "tiny", "--dicom", str(dicomdir / "DICOMDIR"), "--unit", "series", "--slices", "2",
                     "--workers", "1", "-q"]) == 0
    out = capsys.readouterr().out
    assert "13 accepted" in out
    # max/mean concatenation: the collection holds vectors twice the encoder's size, queries match
    assert main(h + ["ingest", "mm", "--dicom", str(dicomdir / "DICOMDIR"), "--pooling", "maxmean", "--unit",
                     "series", "-q"]) == 0
    mm = Collection.open("mm", home)
    assert mm.dim == 2 * load_encoder("classic").info.dim and mm.encoder["pooling"] == "maxmean"
    assert mm.count() == 13
    query = next(p for p in sorted((dicomdir / "77654033").rglob("*")) if p.is_file())
    capsys.readouterr()
    assert main(h + ["search", "mm", "--image", str(query), "--json", "--k", "3"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert len(hits) == 3 and hits[0]["score"] >= hits[-1]["score"]
    # the pooling is the collection's: another one, or per-instance items, are refused
    assert main(h + ["ingest", "mm", "--dicom", str(dicomdir), "--pooling", "mean", "--unit", "series"]) == 2
    assert "maxmean-pooled" in capsys.readouterr().err
    assert main(h + ["ingest", "mm2", "--dicom", str(dicomdir), "--pooling", "maxmean"]) == 2
    assert "--unit series" in capsys.readouterr().err


def test_image_folders_refuse_symlinks_too(home: Path, tmp_path: Path) -> None:
    from caselens.ingest.sources import ImageSource

    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(_pydicom_dir() / "CT_small.dcm", folder / "a.dcm")
    os.symlink(_pydicom_dir() / "MR_small.dcm", folder / "b.dcm")
    codes = [getattr(x, "reason_code", "item") for x in ImageSource(folder, secret=KEY)]
    assert sorted(codes) == ["item", "symlink"]


def test_per_file_time_and_worker_memory_bounds(tmp_path: Path) -> None:
    import pydicom
    from pydicom.uid import RLELossless

    ds = pydicom.dcmread(_pydicom_dir() / "MR_small.dcm")
    arr = np.zeros((4096, 4096), np.int16)
    arr[::64] = 1000
    ds.Rows = ds.Columns = 4096
    ds.compress(RLELossless, arr, encoding_plugin="pylibjpeg")  # 0.5 MB file, 32 MiB decoded
    folder = tmp_path / "big"
    folder.mkdir()
    ds.save_as(folder / "IM1")
    tight = DicomSourceConfig(workers=1, worker_memory_bytes=64 << 20)
    assert [getattr(x, "reason_code", "item") for x in DicomSource(folder, KEY, tight)] == ["too_large"]
    roomy = DicomSourceConfig(workers=1)
    assert [getattr(x, "reason_code", "item") for x in DicomSource(folder, KEY, roomy)] == ["item"]
    # header budget: refused before decoding
    small_budget = DicomSourceConfig(options=DicomOptions(max_decoded_bytes=1 << 20))
    rejected = list(DicomSource(folder, KEY, small_budget))
    assert rejected[0].reason_code == "too_large" and "MiB" in rejected[0].reason
    # wall-clock bound per file
    with pytest.raises(Exception) as info:
        decode_frames(folder / "IM1", KEY, DicomOptions(timeout_s=1e-4))
    assert getattr(info.value, "code", None) == "timeout"


def test_a_collection_keeps_its_window_and_queries_are_read_with_it(home: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "ct"
    folder.mkdir()
    shutil.copy(_pydicom_dir() / "CT_small.dcm", folder / "IM1")
    shutil.copy(_pydicom_dir() / "MR_small.dcm", folder / "IM2")
    h = ["--home", str(home)]
    assert main(h + ["ingest", "lung", "--dicom", str(folder), "--window", "lung", "-q"]) == 0
    assert Collection.open("lung", home).encoder["window"] == "lung"
    capsys.readouterr()
    assert main(h + ["search", "lung", "--image", str(folder / "IM1"), "--json", "--k", "1"]) == 0
    hit = json.loads(capsys.readouterr().out)["hits"][0]
    assert hit["source"].startswith("path-") and hit["score"] > 0.9999  # same window: the very same vector
    assert main(h + ["ingest", "lung", "--dicom", str(folder), "--window", "bone"]) == 2
    assert "--window lung" in capsys.readouterr().err


def test_a_series_folder_queries_a_series_collection_pooled_like_ingest(home: Path, tmp_path: Path) -> None:
    import shutil

    import caselens

    col = caselens.open("series-q", home, create=True)
    col.ingest(dicom=_pydicom_dir() / "dicomdirtests", unit="series", progress=False)
    query = tmp_path / "one-series"
    shutil.copytree(_pydicom_dir() / "dicomdirtests" / "98892003" / "MR700", query)
    found = col.search(query, k=3)
    assert found.query.startswith("series ") and "one-series" not in found.query and found.hits[0].score == pytest.approx(1.0, abs=1e-5)
    stored = found.hits[0]
    assert json.loads(col.storage.rows(f"id = '{stored.id}'", ["provenance"]).to_pylist()[0]["provenance"])["unit"] \
        == "series"
    others = col.search(query, k=3, exclude_same="patient_id")  # the series' patient, from its headers
    assert stored.id not in {h.id for h in others}
    assert all(h.metadata.get("patient_id") != stored.metadata.get("patient_id") for h in others)
    with pytest.raises(QueryError, match="point the query at one series"):
        col.search(_pydicom_dir() / "dicomdirtests" / "98892003", k=3)

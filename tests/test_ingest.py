"""Ingest with real files, real LanceDB and FAISS: every input accepted or rejected with a reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caselens.errors import EncoderMismatchError, SourceError, UnsupportedModalityError
from caselens.indexes.collection import Collection
from caselens.ingest.items import Item
from caselens.ingest.pipeline import IngestConfig, ingest
from caselens.ingest.sources import ImageSource, TextCorpusSource, read_dicom
from caselens.ingest.sources.image_folder import ImageSourceConfig
from caselens.ingest.encoders import load_encoder

KEY = bytes(range(32))  # a pseudonym key (collections make their own)

QUIET = IngestConfig(progress=False)


def _ingest_folder(home: Path, folder: Path, name: str = "cases", manifest: bool = True, encoder: str = "classic"):
    enc = load_encoder(encoder)
    coll = (Collection.open(name, home) if Collection.exists(name, home)
            else Collection.create(name, enc.info.to_record(), home))
    relative = ImageSourceConfig(source_paths="relative")  # the tests name inputs by their paths
    src = ImageSource(manifest=folder / "manifest.csv", secret=coll.secret(), config=relative) if manifest else \
        ImageSource(folder, secret=coll.secret(), config=relative)
    return coll, ingest(src, coll, enc, QUIET)


def test_manifest_ingest_stores_items_metadata_and_ledger(home: Path, image_folder: Path) -> None:
    coll, report = _ingest_folder(home, image_folder)
    assert report.accepted == 12 and not report.rejected and report.duplicates == 0
    assert coll.count() == 12
    rows = coll.rows(columns=["id", "label", "patient_id", "age", "source"]).to_pylist()
    assert {r["label"] for r in rows} == {"stripes", "blob"}
    # numeric manifest columns become numeric columns, so SQL comparisons work
    assert coll.count("age > 62") == sum(1 for r in rows if r["age"] > 62) > 0
    # patient ids are pseudonymised, consistently
    assert all(r["patient_id"].startswith("pt-") for r in rows)
    assert len({r["patient_id"] for r in rows}) == 6
    assert not any(r["patient_id"] in ("P0", "P1") for r in rows)
    ledger = coll.ledger(report.run_id)
    assert len(ledger) == 12 and {e["status"] for e in ledger} == {"accepted"}
    assert report.index is not None and report.index.ntotal == 12


def test_second_ingest_adds_nothing(home: Path, image_folder: Path) -> None:
    coll, first = _ingest_folder(home, image_folder)
    version = coll.version
    coll, second = _ingest_folder(home, image_folder)
    assert second.accepted == 0 and second.duplicates == 12
    assert coll.count() == 12
    assert {e["status"] for e in coll.ledger(second.run_id)} == {"duplicate"}
    ids = coll.rows(columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids))
    assert coll.version >= version


def test_bad_inputs_are_rejected_with_reasons_and_nothing_stored_is_lost(home: Path, image_folder: Path) -> None:
    coll, first = _ingest_folder(home, image_folder)
    before = set(coll.rows(columns=["id"]).column("id").to_pylist())
    (image_folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (image_folder / "notes.txt").write_text("not an image")
    (image_folder / "empty.png").write_bytes(b"")
    (image_folder / "fake.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x01\x02" * 30)
    with (image_folder / "manifest.csv").open("a") as fh:
        fh.write("corrupt.png,blob,P9,50\nnotes.txt,blob,P9,50\nmissing.png,blob,P9,50\n"
                 "empty.png,blob,P9,50\nfake.dcm,blob,P9,50\n../outside.png,blob,P9,50\n,blob,P9,50\n")
    coll, report = _ingest_folder(home, image_folder)
    assert report.accepted == 0 and report.duplicates == 12
    assert dict(report.rejected) == {"corrupt_image": 1, "not_an_image": 1, "missing_file": 1, "empty_file": 1,
                                     "corrupt_dicom": 1, "outside_root": 1, "missing_path": 1}
    rejected = {e["input"]: e for e in coll.ledger(report.run_id) if e["status"] == "rejected"}
    assert rejected["missing.png"]["reason_code"] == "missing_file"
    assert all(e["reason"] for e in rejected.values())
    assert set(coll.rows(columns=["id"]).column("id").to_pylist()) == before


def test_empty_folder_is_rejected_not_silent(home: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    coll, report = _ingest_folder(home, empty, manifest=False)
    assert report.accepted == 0 and dict(report.rejected) == {"empty_source": 1}
    assert coll.ledger(report.run_id)[0]["reason_code"] == "empty_source"


def test_missing_folder_and_manifest_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        ImageSource(tmp_path / "nope", secret=KEY)
    with pytest.raises(SourceError, match="manifest .* does not exist"):
        ImageSource(manifest=tmp_path / "nope.csv", secret=KEY)
    bad = tmp_path / "m.csv"
    bad.write_text("file,label\na.png,x\n")
    with pytest.raises(SourceError, match="no 'path' column"):
        ImageSource(manifest=bad, secret=KEY)


def test_metadata_type_clash_rejects_row_and_keeps_others(home: Path, image_folder: Path, tmp_path: Path) -> None:
    from PIL import Image

    coll, _ = _ingest_folder(home, image_folder)  # creates a numeric "age" column
    other = tmp_path / "more"
    other.mkdir()
    shutil.copy(image_folder / "blob_0.png", other / "dup.png")
    Image.new("L", (40, 40), 90).save(other / "a.png")
    Image.new("L", (40, 40), 30).save(other / "b.png")
    (other / "manifest.csv").write_text("path,label,age\ndup.png,blob,51\na.png,blob,50\nb.png,blob,old\n")
    report = ingest(ImageSource(manifest=other / "manifest.csv", secret=coll.secret()), coll,
                    load_encoder("classic"), QUIET)
    assert report.duplicates == 1 and report.accepted == 1
    assert dict(report.rejected) == {"bad_metadata": 1}
    bad = next(e for e in coll.ledger(report.run_id) if e["status"] == "rejected")
    assert bad["input"] == "b.png" and "age" in bad["reason"]
    assert coll.count("age = 50") == 1 and coll.count() == 13


class _ListSource:
    """Image items made here (id, metadata), optionally failing before item ``fail_at``."""

    kind = "image"

    def __init__(self, rows: list[tuple[str, dict]], fail_at: int | None = None):
        self.rows, self.fail_at = rows, fail_at

    def estimate(self) -> int:
        return len(self.rows)

    def __iter__(self):
        for i, (name, meta) in enumerate(self.rows):
            if i == self.fail_at:
                raise RuntimeError("the export went away")
            yield Item(id=f"id-{name}", kind="image", input=name, source=name,
                       image=Image.new("L", (32, 32), 10 + 7 * i), metadata=dict(meta))


def test_rows_are_written_in_groups_with_their_ledger_rows_after_them(home: Path, monkeypatch) -> None:
    enc = load_encoder("classic")
    coll = Collection.create("groups", enc.info.to_record(), home)
    calls: list[tuple[str, list[str]]] = []
    add, record = Collection.add, Collection.record
    monkeypatch.setattr(Collection, "add", lambda self, recs, vecs: (calls.append(("add", [r["id"] for r in recs])),
                                                                   add(self, recs, vecs))[1])
    monkeypatch.setattr(Collection, "record", lambda self, run, entries: (calls.append(
        ("record", [e.item_id for e in entries])), record(self, run, entries))[1])
    rows = [(f"im{i}", {"label": "a"}) for i in range(11)]
    report = ingest(_ListSource(rows), coll, enc, IngestConfig(batch_size=2, write_items=4, progress=False))
    assert report.accepted == 11 and coll.count() == 11
    # groups of whole batches, at least write_items each (the last: what was left); ledger after rows
    assert [k for k, _ in calls] == ["add", "record"] * 3
    assert [len(ids) for k, ids in calls if k == "add"] == [4, 4, 3]
    assert all(calls[i][1] == calls[i + 1][1] for i in range(0, len(calls), 2))
    assert len(coll.ledger(report.run_id)) == 11


def test_an_error_mid_run_keeps_the_finished_batches_and_a_rerun_completes(home: Path) -> None:
    enc = load_encoder("classic")
    coll = Collection.create("broken", enc.info.to_record(), home)
    rows = [(f"im{i}", {"label": "a"}) for i in range(9)]
    config = IngestConfig(batch_size=2, write_items=100, progress=False)
    with pytest.raises(RuntimeError, match="went away"):
        ingest(_ListSource(rows, fail_at=7), coll, enc, config)
    assert coll.count() == 6  # three whole batches; the one in flight is not stored
    assert sorted(e["status"] for e in coll.ledger()) == ["accepted"] * 6
    report = ingest(_ListSource(rows), coll, enc, config)
    assert report.duplicates == 6 and report.accepted == 3 and coll.count() == 9


def test_a_new_column_typed_by_an_earlier_item_of_the_same_write_group(home: Path) -> None:
    enc = load_encoder("classic")
    coll = Collection.create("clash", enc.info.to_record(), home)
    rows = [("a", {"score": 5}), ("b", {"score": "high"}), ("c", {"score": 7.5})]
    report = ingest(_ListSource(rows), coll, enc, IngestConfig(batch_size=1, progress=False))
    assert report.accepted == 2 and dict(report.rejected) == {"bad_metadata": 1}
    assert coll.count("score > 6") == 1
    bad = next(e for e in coll.ledger(report.run_id) if e["status"] == "rejected")
    assert bad["input"] == "b" and "score" in bad["reason"]


def test_encoder_mismatch_and_modality_are_refused(home: Path, image_folder: Path, minilm) -> None:
    coll, _ = _ingest_folder(home, image_folder)
    count = coll.count()
    src = ImageSource(manifest=image_folder / "manifest.csv", secret=coll.secret())
    with pytest.raises(EncoderMismatchError, match="fingerprint"):
        ingest(src, coll, load_encoder("pixels"), QUIET)
    text_coll = Collection.create("texts", minilm.info.to_record(), home)
    with pytest.raises(UnsupportedModalityError):
        ingest(src, text_coll, minilm, QUIET)
    assert coll.count() == count


def test_dicom_files_decode_with_metadata_and_rejections(home: Path, dicom_folder: Path) -> None:
    (dicom_folder / "broken.dcm").write_bytes(Path(dicom_folder / "CT_small.dcm").read_bytes()[:600])
    coll, report = _ingest_folder(home, dicom_folder, manifest=False)
    assert report.accepted == 6, coll.ledger(report.run_id)
    assert sum(report.rejected.values()) == 1
    rows = {r["source"]: r for r in coll.rows(columns=["source", "modality", "study_uid", "provenance"]).to_pylist()}
    assert rows["CT_small.dcm"]["modality"] == "CT"
    assert rows["MR_small.dcm"]["modality"] == "MR"
    assert rows["CT_small.dcm"]["study_uid"].startswith("2.25.")
    prov = json.loads(rows["rtdose.dcm"]["provenance"])
    assert prov["frames"] > 1 and prov["frame"] == prov["frames"] // 2


def test_dicom_window_and_compressed_twin_decode_alike(dicom_files: list[Path]) -> None:
    ct = next(f for f in dicom_files if f.name == "CT_small.dcm")
    image, meta, prov = read_dicom(ct, KEY)
    assert image.mode == "L" and image.size == (128, 128)
    assert prov["window"] in ("file", "percentile")
    raw = np.asarray(read_dicom(next(f for f in dicom_files if f.name == "MR_small.dcm"), KEY)[0], np.int16)
    rle = np.asarray(read_dicom(next(f for f in dicom_files if f.name == "MR_small_RLE.dcm"), KEY)[0], np.int16)
    assert np.abs(raw - rle).max() == 0


def test_dicom_phi_never_stored(home: Path, dicom_files: list[Path], tmp_path: Path) -> None:
    import pydicom

    ds = pydicom.dcmread(dicom_files[0])
    ds.PatientName = "Canary^Zebedee"
    ds.PatientID = "CANARY-0042"
    ds.InstitutionName = "Canary General Hospital"
    ds.AccessionNumber = "ACC-CANARY-77"
    folder = tmp_path / "phi"
    folder.mkdir()
    ds.save_as(folder / "phi.dcm")
    coll, report = _ingest_folder(home, folder, manifest=False)
    assert report.accepted == 1
    stored = b"".join(p.read_bytes() for p in coll.root.rglob("*") if p.is_file())
    for canary in (b"Zebedee", b"CANARY-0042", b"Canary General", b"ACC-CANARY"):
        assert canary not in stored


def test_text_corpus_ingest_rejects_bad_rows_and_flags_truncation(home: Path, tmp_path: Path, minilm) -> None:
    corpus = tmp_path / "c.jsonl"
    long_text = "The alveoli exchange gases across a thin membrane. " * 80
    corpus.write_text("\n".join([
        json.dumps({"id": "d1", "text": "Pneumonia is an infection of the lung parenchyma.", "year": 2020}),
        json.dumps({"id": "d2", "text": long_text}),
        "{not json",
        json.dumps({"text": "no id"}),
        json.dumps({"id": "d3", "text": "   "}),
        json.dumps({"id": "d1", "text": "same id again"}),
    ]) + "\n")
    coll = Collection.create("kb", minilm.info.to_record(), home)
    report = ingest(TextCorpusSource(corpus), coll, minilm, QUIET)
    assert report.accepted == 2 and report.duplicates == 1
    assert dict(report.rejected) == {"bad_json": 1, "missing_id": 1, "empty_text": 1}
    assert report.warnings["truncated"] == 1
    entry = next(e for e in coll.ledger(report.run_id) if e["item_id"] == "d2")
    assert entry["reason_code"] == "truncated" and "tokens" in entry["reason"]
    assert coll.count("year = 2020") == 1

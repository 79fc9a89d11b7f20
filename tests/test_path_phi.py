"""PHI in file names: PACS exports name folders after patients. With ``--source-paths hashed``
(the default for DICOM and for manifests with patient ids) a canary in folder and file names
appears nowhere in the LanceDB files, in ``search``/``ledger`` output or in logs, while ``ask``
still finds the images through the collection's local inputs file."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caselens.indexes.collection import Collection
from caselens.ingest.inputs import read_paths, read_source_paths
from caselens.ingest.pipeline import IngestConfig, ingest
from caselens.ingest.source_paths import PathNamer
from caselens.ingest.sources.dicom import DicomOptions, decode_frames
from caselens.ingest.sources.dicom_source import DicomSource, DicomSourceConfig
from caselens.ingest.sources.image_folder import ImageSource, ImageSourceConfig
from caselens.ingest.encoders import load_encoder
from caselens.cli import main
from caselens.retrieval.rag import AskConfig, ask
from caselens.retrieval.images import item_images
from caselens.retrieval.search import search, search_vector

from test_rag_images import Seeing  # a generator that sees images and keeps its request

CANARY = "CANARY"
WORDS = (CANARY, "Smith_John", "MRN778899", "Doe_Jane")
OPEN = AskConfig(min_score=-1.0, require_citations=False)


def _leaks(text: str | bytes) -> list[str]:
    data = text if isinstance(text, bytes) else text.encode()
    return [w for w in WORDS if w.encode() in data]


def _collection_leaks(root: Path) -> dict[str, list[str]]:
    """Files of the collection (all but the local inputs file) whose bytes hold a canary word."""
    return {str(p.relative_to(root)): found for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "inputs.json" and (found := _leaks(p.read_bytes()))}


def _export(tmp_path: Path) -> Path:
    from pydicom.data import get_testdata_file

    export = tmp_path / "pacs"
    (export / "CANARY_Smith_John").mkdir(parents=True)
    (export / "CANARY_Doe_Jane").mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), export / "CANARY_Smith_John" / "MRN778899.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), export / "CANARY_Doe_Jane" / "MRN112233.dcm")
    (export / "CANARY_Smith_John" / "CANARY_broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00" * 9)
    (export / "CANARY_Doe_Jane" / "CANARY_note.txt").write_text("not dicom")
    return export


def test_dicom_path_canaries_never_leak_and_images_are_still_found(home: Path, tmp_path: Path, capsys,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    export = _export(tmp_path)
    h = ["--home", str(home)]
    with caplog.at_level(logging.DEBUG):
        assert main(h + ["-v", "ingest", "pacs", "--dicom", str(export), "-q"]) == 0
        ct = export / "CANARY_Smith_John" / "MRN778899.dcm"
        assert main(h + ["search", "pacs", "--image", str(ct), "--json"]) == 0
        assert main(h + ["search", "pacs", "--image", str(ct)]) == 0
        assert main(h + ["ledger", "pacs", "--json"]) == 0
        assert main(h + ["ledger", "pacs"]) == 0
        assert main(h + ["verify", "pacs", "--json"]) == 0
        out = capsys.readouterr()
    coll = Collection.open("pacs", home)
    assert read_source_paths(coll.root) == "hashed"
    ledger = coll.ledger()
    assert len(ledger) == 4 and {e["reason_code"] for e in ledger if e["status"] == "rejected"} == {
        "not_dicom", "corrupt_dicom"}
    assert all(e["input"].startswith("path-") for e in ledger)
    assert _collection_leaks(coll.root) == {}, "a canary reached the collection's files"
    assert _leaks(out.out) == [] and _leaks(out.err) == []
    assert _leaks("\n".join(r.getMessage() for r in caplog.records)) == []
    # the local map (never an index column) finds the image again for a vision-language generator
    assert set(read_paths(coll.root).values()) >= {"CANARY_Smith_John/MRN778899.dcm"}
    gen = Seeing()
    # asked with the MR (the query itself is never a similar case), so the CT is the top case
    ask([], "What does this show?", generator=gen, cases=coll, image=export / "CANARY_Doe_Jane" / "MRN112233.dcm",
        config=OPEN)
    top = gen.request.items[0]
    assert top.source.startswith("path-") and top.image_path and Path(top.image_path).is_file()
    expected = decode_frames(ct, coll.secret(), DicomOptions())[0][0]
    with Image.open(top.image_path) as im:
        assert np.array_equal(np.asarray(im), np.asarray(expected))


def test_series_members_and_manifest_images_resolve_through_the_map(home: Path, tmp_path: Path,
                                                                   dicom_files) -> None:
    classic = load_encoder("classic")
    quiet = IngestConfig(progress=False)
    export = tmp_path / "pacs" / "CANARY_Smith_John"
    export.mkdir(parents=True)
    shutil.copy(dicom_files[-1], export / "MRN778899_dose.dcm")  # a multi-frame series
    series = Collection.create("series", classic.info.to_record(), home)
    source = DicomSource(export.parent, series.secret(), DicomSourceConfig(unit="series", slices=3))
    assert ingest(source, series, classic, quiet).accepted == 1
    hit = search_vector(series, series.vectors()[1][0], k=1).hits[0]
    assert hit.provenance["chosen"][0]["file"].startswith("path-") and _leaks(json.dumps(hit.provenance)) == []
    assert item_images(series, [hit])[0] is not None
    assert _collection_leaks(series.root) == {}
    # images named after patients, with a manifest giving patient ids: hashed by default too
    folder = tmp_path / "ward" / "CANARY_Doe_Jane"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray((np.arange(64 * 64).reshape(64, 64) * (i + 1) % 251).astype(np.uint8)).save(
            folder / f"MRN778899_{i}.png")
    (folder.parent / "manifest.csv").write_text("path,label,patient_id\n" + "".join(
        f"CANARY_Doe_Jane/MRN778899_{i}.png,x,MRN778899\n" for i in range(3)))
    images = Collection.create("images", classic.info.to_record(), home)
    ingest(ImageSource(manifest=folder.parent / "manifest.csv", secret=images.secret()), images, classic, quiet)
    assert read_source_paths(images.root) == "hashed" and _collection_leaks(images.root) == {}
    hits = search(images, image=folder / "MRN778899_1.png", k=3).hits
    found = item_images(images, hits)
    assert all(found) and Path(found[0]) == folder / "MRN778899_1.png"


def test_a_collection_keeps_its_path_setting(home: Path, tmp_path: Path, capsys) -> None:
    export = _export(tmp_path)
    images = tmp_path / "plain"
    images.mkdir()
    Image.new("L", (16, 16), 7).save(images / "a.png")
    h = ["--home", str(home)]
    # plain images: relative by default; a DICOM export into it must say so
    assert main(h + ["ingest", "mixed", "--images", str(images), "-q"]) == 0
    assert read_source_paths(Collection.open("mixed", home).root) == "relative"
    assert main(h + ["ingest", "mixed", "--dicom", str(export), "-q"]) == 2
    assert "--source-paths relative" in capsys.readouterr().err
    assert main(h + ["ingest", "mixed", "--dicom", str(export), "--source-paths", "hashed", "-q"]) == 2
    assert main(h + ["ingest", "mixed", "--dicom", str(export), "--source-paths", "relative", "-q"]) == 0
    # none: nothing names the files, not even a local map
    assert main(h + ["ingest", "nameless", "--dicom", str(export), "--source-paths", "none", "-q"]) == 0
    coll = Collection.open("nameless", home)
    rows = coll.rows(columns=["source", "provenance"]).to_pylist()
    assert all(r["source"] is None and json.loads(r["provenance"])["file"] is None for r in rows)
    assert read_paths(coll.root) == {} and _collection_leaks(coll.root) == {}
    assert main(h + ["ingest", "nameless", "--dicom", str(export), "--source-paths", "hashed"]) == 2
    assert "stores its input paths as 'none'" in capsys.readouterr().err


def test_path_names_are_keyed_and_reasons_are_scrubbed(tmp_path: Path) -> None:
    a, b = PathNamer("hashed", b"1" * 32), PathNamer("hashed", b"2" * 32)
    assert a.name("Smith_John/x.dcm") == a.name("Smith_John/x.dcm") != b.name("Smith_John/x.dcm")
    assert a.seen == {a.name("Smith_John/x.dcm"): "Smith_John/x.dcm"}
    path = tmp_path / "Smith_John" / "x.dcm"
    reason = f"cannot open '{path}' (Smith_John/x.dcm)"
    assert _leaks(a.clean(reason, path, "Smith_John/x.dcm")) == [] and "Smith_John" not in a.clean(
        reason, path, "Smith_John/x.dcm")
    assert PathNamer().clean(reason, path, "Smith_John/x.dcm") == "cannot open 'Smith_John/x.dcm' (Smith_John/x.dcm)"
    with pytest.raises(ValueError):
        PathNamer("hashed")  # no key, no hashes

"""The Ray runner (`caselens ingest --runner ray`) on a local Ray cluster: the same table (ids,
vectors, metadata columns, provenance) and ledger as the local pipeline on the same inputs, for
images with a manifest (and DICOM files in it), DICOM series, and a chunked text corpus; a worker
killed mid-run and a driver killed after its first commit, then a re-run: every item exactly once,
every input in the ledger."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom.data
import pytest

from caselens.indexes.collection import Collection
from caselens.ingest.encoders import load_encoder
from caselens.ingest.pipeline import IngestConfig, ingest
from caselens.ingest.source_paths import PathNamer
from caselens.ingest.sources import ImageSource, TextCorpusSource
from caselens.ingest.sources.dicom_source import DicomSource, DicomSourceConfig

from conftest import make_images

ray_runner = pytest.importorskip("caselens.ingest.ray_runner")
RayConfig = ray_runner.RayConfig
SecretRef = pytest.importorskip("caselens.ingest.ray_stages").SecretRef
QUIET = dict(progress=False, build_index=False)
# small parts, fragments and commits, so one run writes several fragments and commits
SMALL = RayConfig(part_inputs=3, fragment_rows=4)


@pytest.fixture(scope="module")
def classic():
    return load_encoder("classic")


def _twins(home: Path, record: dict) -> tuple[Collection, Collection]:
    """Two empty collections with the same encoder and the same pseudonym key."""
    local = Collection.create("local", record, home)
    distributed = Collection.create("distributed", record, home)
    (distributed.root / "secret.key").write_text((local.root / "secret.key").read_text())
    return local, distributed


def _content(col: Collection) -> tuple[list[dict], np.ndarray, list[tuple], list[str]]:
    table = col.rows().sort_by("id")
    rows = table.column("_row").to_pylist()
    assert len(set(rows)) == len(rows), "row numbers handed out twice"
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == len(ids), "an item stored twice"
    vectors = np.asarray(table.column("vector").to_pylist(), np.float32)
    ledger = sorted((r["input"], r["status"], r["item_id"], r["reason_code"]) for r in col.ledger())
    schema = [f"{f.name}:{f.type}" for f in table.schema]
    return table.drop_columns(["_row", "vector"]).to_pylist(), vectors, ledger, schema


def _assert_same(local: Collection, distributed: Collection) -> None:
    rows_a, vec_a, ledger_a, schema_a = _content(local)
    rows_b, vec_b, ledger_b, schema_b = _content(distributed)
    assert schema_b == schema_a
    assert rows_b == rows_a  # the _checksum of each row included: every writer computes it the same way
    assert all(r["_checksum"] is not None for r in rows_b)
    assert np.allclose(vec_b, vec_a, atol=1e-5)
    assert ledger_b == ledger_a


def _image_inputs(folder: Path) -> Path:
    """12 PNGs with a manifest (patients, labels, a numeric column), two DICOM files, the same
    image listed twice, a missing file and a file that is not an image."""
    make_images(folder, n_per_class=6)
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(pydicom.data.get_testdata_file(name), folder / name)
    (folder / "broken.png").write_bytes(b"not a png at all")
    with (folder / "manifest.csv").open("a") as fh:
        fh.write("CT_small.dcm,ct,P7,70\nMR_small.dcm,mr,P8,71\nstripes_0.png,stripes,P0,40\n"
                 "missing.png,blob,P9,1\nbroken.png,blob,P9,2\n")
    return folder / "manifest.csv"


def test_images_with_manifest_same_table_and_ledger_as_local(ray_cluster, home: Path, tmp_path: Path,
                                                             classic) -> None:
    manifest = _image_inputs(tmp_path / "images")
    local, distributed = _twins(home, classic.info.to_record())
    ingest(ImageSource(manifest=manifest, secret=local.secret()), local, classic, IngestConfig(**QUIET))
    report = ray_runner.ingest(ImageSource(manifest=manifest, secret=distributed.secret()), distributed, classic,
                               IngestConfig(write_items=5, **QUIET), SMALL)
    assert (report.accepted, report.duplicates, dict(report.rejected)) == (14, 1, {"missing_file": 1,
                                                                                   "corrupt_image": 1})
    assert distributed.version > 4, "expected several commits"
    _assert_same(local, distributed)
    assert "age" in distributed.columns()  # a column the manifest brought, made as locally
    _assert_secret_not_in_ray_logs(distributed.secret())
    # a second run adds nothing: every input a duplicate or the same rejection
    again = ray_runner.ingest(ImageSource(manifest=manifest, secret=distributed.secret()), distributed, classic,
                              IngestConfig(**QUIET), SMALL)
    assert (again.accepted, again.duplicates) == (0, 15) and distributed.count() == 14


def _assert_secret_not_in_ray_logs(secret: bytes) -> None:
    """The pseudonym key reaches the workers as a Ray object only: never in a log, a task or actor
    description (all of which Ray writes under its session folder)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    needles = [secret.hex().encode(), repr(secret).encode(), secret]
    for path in logs.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(n in data for n in needles), f"the collection secret appears in {path}"


def test_part_readers_carry_no_secret_and_no_inputs(tmp_path: Path) -> None:
    manifest = _image_inputs(tmp_path / "images")
    source = ImageSource(manifest=manifest, secret=b"s" * 32)
    reader = source.part_reader()
    # the manifest is streamed, never held: parts carry its rows, the reader only the file's name
    assert reader.secret == b"" and reader.files is None and reader.paths.secret == b"" \
        and source.secret == b"s" * 32
    parts = source.parts(4)
    assert [len(p["inputs"]) for p in parts] == [4, 4, 4, 4, 1]
    reader.secret = b"s" * 32
    assert [it.id if hasattr(it, "id") else it.reason_code for p in parts for it in reader.read_part(p)] == \
        [it.id if hasattr(it, "id") else it.reason_code for it in source]
    dicom = DicomSource(manifest.parent, b"s" * 32).part_reader()
    assert dicom.secret == b"" and dicom.config.workers == 0
    assert "hidden" in repr(SecretRef.__new__(SecretRef))


def test_dicom_series_same_table_and_ledger_as_local(ray_cluster, home: Path, tmp_path: Path, classic) -> None:
    export = tmp_path / "export"
    shutil.copytree(Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "77654033", export)
    shutil.copy(pydicom.data.get_testdata_file("MR_small.dcm"), export / "MR_small.dcm")
    (export / "README.txt").write_text("not DICOM")
    cfg = DicomSourceConfig(unit="series", slices=2)
    local, distributed = _twins(home, classic.info.to_record())
    ingest(DicomSource(export, local.secret(), cfg), local, classic, IngestConfig(**QUIET))
    report = ray_runner.ingest(DicomSource(export, distributed.secret(), cfg), distributed, classic,
                               IngestConfig(**QUIET), RayConfig(part_inputs=2, fragment_rows=2))
    assert report.accepted >= 3 and sum(report.rejected.values()) >= 1
    _assert_same(local, distributed)
    assert all(p.startswith("pt-") for p in distributed.rows(columns=["patient_id"]).column("patient_id").to_pylist())


@pytest.mark.slow  # two Ray workers load MiniLM: ~25 s on the 2-core build machine
def test_chunked_text_corpus_same_table_and_ledger_as_local(ray_cluster, home: Path, tmp_path: Path, minilm) -> None:
    from caselens.ingest.chunking import chunker_for

    corpus = tmp_path / "corpus.jsonl"
    long = " ".join(f"Sentence {i} says the lung shows a finding number {i}." for i in range(40))
    lines = [f'{{"id": "d{i}", "text": "Pneumonia note {i}. {long if i % 4 == 0 else "Short text."}", '
             f'"year": {2000 + i}, "journal": "J{i % 3}"}}' for i in range(10)]
    lines += ['{"id": "d3", "text": "the same id again"}', "not json", '{"text": "no id"}']
    corpus.write_text("\n".join(lines) + "\n")
    chunker = chunker_for(minilm, max_tokens=64, overlap=8)
    local, distributed = _twins(home, minilm.info.to_record())
    ingest(TextCorpusSource(corpus, chunker=chunker), local, minilm, IngestConfig(**QUIET))
    report = ray_runner.ingest(TextCorpusSource(corpus, chunker=chunker), distributed, minilm,
                               IngestConfig(**QUIET), RayConfig(part_inputs=4, fragment_rows=5))
    assert report.duplicates == 1 and report.rejected["bad_json"] == 1 and report.rejected["missing_id"] == 1
    assert distributed.count() > 10  # long rows became several chunks
    _assert_same(local, distributed)


def _expected(manifest: Path, secret: bytes = b"k" * 32) -> tuple[set[str], set[str]]:
    """Ids a clean run stores and the inputs its ledger names: the manifest names patients, so a
    collection with key ``secret`` names its files by keyed hashes (ingest.source_paths)."""
    source = ImageSource(manifest=manifest, secret=secret)
    source.paths = PathNamer("hashed", secret)
    items = list(source)
    return {it.id for it in items if hasattr(it, "id")}, {it.input for it in items}


def _exactly_once(col: Collection, ids: set[str], inputs: set[str], run_id: str | None = None) -> None:
    stored = col.rows(columns=["id", "_row"])
    assert sorted(stored.column("id").to_pylist()) == sorted(ids)
    assert len(set(stored.column("_row").to_pylist())) == stored.num_rows
    ledger = col.ledger(run_id)
    assert {r["input"] for r in ledger} == inputs
    accepted = [r["item_id"] for r in col.ledger() if r["status"] == "accepted"]
    assert sorted(accepted) == sorted(ids), "every stored item accepted once over all runs"


def test_worker_killed_mid_run_then_rerun_stores_every_item_once(ray_cluster, home: Path, tmp_path: Path,
                                                                  classic) -> None:
    manifest = _image_inputs(tmp_path / "images")
    col = Collection.create("faulty", classic.info.to_record(), home)
    ids, inputs = _expected(manifest, col.secret())
    (ray_cluster / "encode").touch()  # the first encoder call dies (os._exit): Ray restarts the actor
    (ray_cluster / "read").touch()  # and the first read task dies: Ray runs it again
    report = ray_runner.ingest(ImageSource(manifest=manifest, secret=col.secret()), col, classic,
                               IngestConfig(write_items=4, **QUIET), SMALL)
    assert not (ray_cluster / "encode").exists() and not (ray_cluster / "read").exists(), "the faults did not fire"
    _exactly_once(col, ids, inputs, report.run_id)
    again = ray_runner.ingest(ImageSource(manifest=manifest, secret=col.secret()), col, classic,
                              IngestConfig(**QUIET), SMALL)
    assert again.accepted == 0
    _exactly_once(col, ids, inputs, again.run_id)


def test_driver_killed_after_first_commit_then_rerun_stores_every_item_once(ray_cluster, home: Path,
                                                                             tmp_path: Path, classic) -> None:
    import ray

    manifest = _image_inputs(tmp_path / "images")
    ids, _ = _expected(manifest)
    (ray_cluster / "commit").touch()  # the driver SIGKILLs itself right after its first commit
    cmd = [sys.executable, "-m", "caselens.cli", "--home", str(home), "ingest", "col", "--manifest",
           str(manifest), "--runner", "ray", "--address", ray.get_runtime_context().gcs_address,
           "--write-items", "4", "--no-index", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    col = Collection.open("col", home)
    first = col.count()
    assert 0 < first < len(ids), "the kill should land between commits"
    assert col.ledger() == [], "killed before its first ledger rows"
    report = ray_runner.ingest(ImageSource(manifest=manifest, secret=col.secret()), col, classic,
                               IngestConfig(**QUIET), SMALL)
    assert report.duplicates == first + 1  # rows of the killed run, and the image listed twice
    stored = col.rows(columns=["id", "_row"])
    assert sorted(stored.column("id").to_pylist()) == sorted(ids)
    assert len(set(stored.column("_row").to_pylist())) == stored.num_rows
    assert {r["input"] for r in col.ledger(report.run_id)} == _expected(manifest, col.secret())[1]

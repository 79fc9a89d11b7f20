"""The public Python API: the documented example runs as written, and the API's own promises."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import caselens
from caselens.errors import CollectionNotFoundError, PseudonymKeyError, QueryError
from caselens.ingest.deid import pseudonym
from caselens.ingest.items import content_id, sha256_file
from caselens.ingest.sources import ImageSource
from tests.conftest import ROOT, make_images


def _documented_example() -> str:
    text = (ROOT / "docs" / "api.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_the_documented_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, minilm) -> None:
    data = tmp_path / "data"
    make_images(data / "images")
    manifest = data / "images" / "manifest.csv"
    manifest.write_text(manifest.read_text().replace("path,label,", "path,finding,"))  # labels under another name
    (data / "query.png").write_bytes((data / "images" / "stripes_1.png").read_bytes())
    rows = [{"id": "asthma", "text": "Asthma is a chronic inflammatory disease of the airways."},
            {"id": "eczema", "text": "Eczema is an inflammatory disease of the skin."},
            {"id": "gout", "text": "Gout is an arthritis caused by urate crystals in a joint."}]
    (data / "kb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_documented_example(), "docs/api.md", "exec"), scope)  # noqa: S102 - our own documentation
    hits, answer, quality = scope["hits"], scope["answer"], scope["quality"]
    # the manifest names patients, so the collection stores keyed hashes of its paths: found by content
    twin_id = content_id(sha256_file(data / "images" / "stripes_1.png"))
    twin = scope["cases"].storage.rows(f"id = '{twin_id}'", ["id", "patient_id"]).to_pylist()[0]
    assert len(hits) == 5 and hits[0].label == "stripes"  # the training-free features still find the class
    assert all(h.metadata.get("patient_id") != twin["patient_id"] and h.id != twin["id"] for h in hits)
    assert "asthma" in answer.answer.lower() and answer.grounding["cited"]
    assert quality.n_queries == 12 and 0 <= quality.overall["p@10"] <= 1
    assert {h.label for h in scope["same"]} == {"stripes"} and scope["hits"][0].id not in {h.id for h in scope["same"]}
    html = (tmp_path / "hits.html").read_text()
    assert html.count("<img") == len(hits) and "data:image/png;base64," in html  # thumbnails inlined
    table = pq.read_table(tmp_path / "cases.parquet")
    assert table.num_rows == 12 and "finding" in table.column_names and "label" in table.column_names
    assert table.column("vector").type.list_size == scope["cases"].info()["encoder"]["dim"]
    diagnosis = scope["diagnosis"]
    assert diagnosis.top_label == "stripes" and abs(sum(diagnosis.probabilities.values()) - 1) < 1e-3
    assert twin["id"] not in {c.id for c in diagnosis.supporting}
    assert all(c.metadata.get("patient_id") != twin["patient_id"] for c in diagnosis.supporting)


def test_open_refuses_missing_collections_and_names_what_exists(home: Path, image_folder: Path) -> None:
    with pytest.raises(CollectionNotFoundError, match="collections there: none"):
        caselens.open("nope", home)
    col = caselens.open("new", home, create=True)
    assert not col.exists
    with pytest.raises(CollectionNotFoundError, match="ingest something"):
        col.search(text="x")
    col.ingest(manifest=image_folder / "manifest.csv", progress=False)
    assert col.exists and len(col) == 12 and caselens.collections(home) == ["new"]


def test_search_by_bytes_vector_id_and_outside_patient(home: Path, image_folder: Path) -> None:
    col = caselens.open("c", home, create=True)
    col.ingest(manifest=image_folder / "manifest.csv", progress=False)
    by_path = col.search(image_folder / "blob_2.png", k=3)
    by_bytes = col.search((image_folder / "blob_2.png").read_bytes(), k=3)
    assert [h.id for h in by_bytes] == [h.id for h in by_path]
    _, vectors = col.storage.vectors()
    by_vector = col.search(vector=vectors[0], k=1)
    assert by_vector[0].score == pytest.approx(1.0, abs=1e-5)
    by_id = col.search(id=by_path[0].id, k=11)
    assert by_path[0].id not in [h.id for h in by_id] and len(by_id) == 11
    # an outside query naming its patient: that patient's items never come back
    outside = col.search(image_folder / "blob_2.png", k=12, exclude_same="patient_id", query_patient="P5")
    excluded = pseudonym("P5", col.storage.secret(), "patient")
    assert outside.hits and all(h.metadata.get("patient_id") != excluded for h in outside)
    with pytest.raises(QueryError, match="exactly one"):
        col.search(text="x", vector=vectors[0])
    with pytest.raises(QueryError, match="no item"):
        col.search(id="sha256:nope")


def test_pseudonyms_use_the_collection_key_from_every_entry_point(home: Path, image_folder: Path) -> None:
    from caselens.cli import main

    api = caselens.open("api", home, create=True)
    api.ingest(manifest=image_folder / "manifest.csv", progress=False)
    assert main(["--home", str(home), "ingest", "cli", "--manifest", str(image_folder / "manifest.csv"), "-q"]) == 0
    cli = caselens.open("cli", home)
    for col in (api, cli):
        stored = set(col.storage.rows(columns=["patient_id"]).column("patient_id").to_pylist())
        assert stored == {pseudonym(f"P{i}", col.storage.secret(), "patient") for i in range(6)}
    assert api.storage.secret() != cli.storage.secret()
    with pytest.raises(PseudonymKeyError, match="empty or short key"):
        ImageSource(manifest=image_folder / "manifest.csv", secret=b"")
    (cli.path / "secret.key").write_text("")
    with pytest.raises(PseudonymKeyError, match="empty or"):
        cli.ingest(images=image_folder, progress=False)


def test_export_vectors_round_trips_ids_and_vectors(home: Path, image_folder: Path, tmp_path: Path) -> None:
    col = caselens.open("e", home, create=True)
    col.ingest(manifest=image_folder / "manifest.csv", progress=False)
    path = col.export_vectors(tmp_path / "out" / "v.parquet", columns=["label"])
    table = pq.read_table(path)
    assert table.column_names == ["id", "label", "vector"]
    ids = table.column("id").to_pylist()
    vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False))
    stored = col.storage.rows(columns=["id", "vector"]).to_pylist()
    expected = {r["id"]: np.asarray(r["vector"], np.float32) for r in stored}
    assert sorted(ids) == sorted(expected) and all(np.allclose(vectors[i], expected[x]) for i, x in enumerate(ids))
    with pytest.raises(QueryError, match="no column"):
        col.export_vectors(tmp_path / "x.parquet", columns=["nope"])


def test_collections_are_lancedb_tables_readable_by_lancedb_itself(home: Path, image_folder: Path) -> None:
    lancedb = pytest.importorskip("lancedb", reason="lancedb is not installed")
    col = caselens.open("compat", home, create=True)
    col.ingest(manifest=image_folder / "manifest.csv", progress=False)
    db = lancedb.connect(str(col.path / "lance"))
    items = db.open_table("items").to_arrow()
    assert items.num_rows == 12 and set(items.column("id").to_pylist()) == set(col.storage.existing_ids())
    assert json.loads(items.schema.metadata[b"caselens"])["encoder"]["spec"] == "classic"
    assert db.open_table("ledger").count_rows() == 12

"""Damage to a collection's source of truth, on real Lance files: every command names the
collection and the file and exits 3 (never a traceback), ``verify`` finds silent bit flips by
row checksums and the index's copy, ``verify --repair`` keeps every row that has a good copy
(older versions, the index) without deleting anything, says what was lost and ingests it again;
the ledger keeps one row per input and outcome over re-runs; phantoms are reported."""

from __future__ import annotations

import json
import os
import shutil
from datetime import timedelta
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest

from caselens.cli import main
from caselens.errors import TableDamagedError
from caselens.indexes import derived
from caselens.indexes.checksums import row_checksums
from caselens.indexes.collection import Collection
from caselens.indexes.ledger import LEDGER_SCHEMA, OLD_COLUMNS, LedgerEntry, expected_ids
from tests.conftest import make_images

DIM = 16


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _collection(home: Path, batches: int = 3, per: int = 40, compact: bool = True) -> tuple[Collection, np.ndarray]:
    """A collection written in ``batches`` appends (each with its ledger rows), then compacted: the
    newest data file holds every row, older versions keep the rows in their own files."""
    record = {"spec": "test:vectors", "dim": DIM, "modalities": ["image"], "fingerprint": "e" * 16, "options": {}}
    coll = Collection.create("dmg", record, home)
    vecs = _vectors(batches * per)
    for b in range(batches):
        part = range(b * per, (b + 1) * per)
        coll.add([{"id": f"v{i}", "kind": "image", "source": f"f{i}.png", "metadata": {"label": f"l{i % 3}"}}
                  for i in part], vecs[b * per:(b + 1) * per])
        coll.record(f"run{b}", [LedgerEntry(f"f{i}.png", "accepted", f"v{i}") for i in part])
    if compact:
        coll.compact()
    derived.refresh(coll)
    return coll, vecs


def _newest_data(coll: Collection, table: str = "items") -> Path:
    folder = (coll.layout.items_dir if table == "items" else coll.layout.ledger_dir) / "data"
    return max(folder.glob("*.lance"), key=lambda p: (p.stat().st_mtime_ns, p.name))


def _manifest(coll: Collection) -> Path:
    return min(coll.layout.versions_dir.glob("*.manifest"))  # V2 names: the newest version sorts first


def _rel(coll: Collection, path: Path) -> str:
    return str(path.relative_to(coll.root))


def _flip_until_lance_fails(path: Path) -> None:
    """Flip one bit after another in the metadata at the end of a Lance file until it no longer
    decodes (deterministic for a given file)."""
    data = bytearray(path.read_bytes())
    table_dir = path.parents[1]
    for pos in range(len(data) - 48, max(0, len(data) - 4000), -5):
        data[pos] ^= 0x10
        path.write_bytes(bytes(data))
        try:
            lance.dataset(str(table_dir)).to_table()
        except Exception:  # noqa: BLE001 - what we want: Lance fails
            return
        data[pos] ^= 0x10
    path.write_bytes(bytes(data))
    pytest.fail("no single bit flip near the end made Lance fail")


def _flip_vector_bits(path: Path, vectors: np.ndarray, rows: list[int]) -> None:
    """Flip one mantissa bit of the first value of each vector in ``rows`` where it lies in the file:
    Lance reads the file as before, with those values changed."""
    data = bytearray(path.read_bytes())
    for r in rows:
        at = bytes(data).find(vectors[r].tobytes())
        assert at >= 0, "vector bytes not found in the data file"
        data[at + 1] ^= 0x04
    path.write_bytes(bytes(data))


def _cli(home: Path, *args: str) -> list[str]:
    return ["--home", str(home), *args]


# ------------------------------------------------------------------ checksums
def test_row_checksums_cover_every_stored_value_and_ignore_column_order_and_new_null_columns() -> None:
    n = 50
    vecs = _vectors(n)
    table = pa.table({"id": [f"v{i}" for i in range(n)], "_row": pa.array(range(n), pa.int64()),
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), DIM),
                      "text": [None if i % 2 else f"t{i}" for i in range(n)],
                      "age": pa.array([float(i) if i % 3 else None for i in range(n)])})
    sums = row_checksums(table)
    assert len(set(sums.tolist())) == n
    assert (row_checksums(table.select(["age", "vector", "id", "text", "_row"])) == sums).all()
    assert (row_checksums(table.append_column("later", pa.nulls(n, pa.string()))) == sums).all()
    assert (row_checksums(table.slice(7, 20)) == sums[7:27]).all()
    changed = vecs.copy()
    changed[3, 5] = np.nextafter(changed[3, 5], 2)  # the smallest change of one value
    other = table.set_column(2, "vector", pa.FixedSizeListArray.from_arrays(pa.array(changed.reshape(-1)), DIM))
    assert (row_checksums(other) != sums).tolist() == [i == 3 for i in range(n)]
    renamed = table.set_column(0, "id", pa.array([f"v{i}" if i != 9 else "v9x" for i in range(n)]))
    assert (row_checksums(renamed) != sums).sum() == 1


def test_rows_written_by_add_carry_checksums_that_verify(home: Path) -> None:
    coll, _ = _collection(home, batches=2, per=30)
    table = coll.rows()
    assert table.column("_checksum").null_count == 0
    assert (row_checksums(table) == table.column("_checksum").to_numpy()).all()
    assert "_checksum" not in coll.columns() and "_checksum" not in coll.metadata_columns()
    report = derived.verify(coll)
    assert report.ok and report.checksum_mismatches == 0 and report.unchecked_rows == 0
    assert report.index_compared == 60 and report.index_exact and report.index_mismatches == 0


# ------------------------------------------------------------- damage -> errors
@pytest.mark.parametrize("damage", ["truncate", "bitflip", "delete", "manifest"])
def test_every_command_on_a_damaged_table_names_collection_and_file_and_exits_3(
        home: Path, damage: str, capsys: pytest.CaptureFixture) -> None:
    coll, _ = _collection(home)
    path = _manifest(coll) if damage == "manifest" else _newest_data(coll)
    if damage == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    elif damage == "bitflip":
        _flip_until_lance_fails(path)
    elif damage == "delete":
        path.unlink()
    else:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    capsys.readouterr()
    failed = 0
    for args in (["info", "dmg"], ["search", "dmg", "--id", "v1"], ["index", "dmg", "--rebuild", "-q"]):
        code = main(_cli(home, *args))
        err = capsys.readouterr().err
        assert "Traceback" not in err
        if damage == "bitflip" and code == 0:  # the flipped bits lie in a column this command does not read
            continue
        assert code == 3, args
        failed += 1
        assert "'dmg'" in err and "caselens verify dmg --repair" in err and _rel(coll, path) in err
    assert failed >= 1
    with pytest.raises(TableDamagedError) as caught:
        Collection.open("dmg", home).rows()
    assert caught.value.collection == "dmg" and caught.value.table == "items"
    # verify reports instead of failing, and names the file
    assert main(_cli(home, "verify", "dmg", "--json")) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    report = json.loads(captured.out)
    assert not report["ok"] and _rel(coll, path) in report["damaged_files"]


def test_a_damaged_ledger_is_named_by_the_ledger_command(home: Path, capsys: pytest.CaptureFixture) -> None:
    coll, _ = _collection(home)
    path = _newest_data(coll, "ledger")
    os.truncate(path, path.stat().st_size // 3)
    capsys.readouterr()
    assert main(_cli(home, "ledger", "dmg")) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err and "ledger table is damaged" in err and _rel(coll, path) in err
    assert main(_cli(home, "verify", "dmg", "--json")) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ledger_problems"] and _rel(coll, path) in report["ledger_problems"][0]


# ---------------------------------------------------------------- silent flips
def test_silent_bit_flips_are_found_by_checksums_and_the_index_and_repaired_from_older_files(home: Path) -> None:
    coll, vecs = _collection(home)
    path = _newest_data(coll)
    _flip_vector_bits(path, vecs, [5, 47, 101])
    assert lance.dataset(str(coll.layout.items_dir)).to_table().num_rows == 120  # Lance notices nothing
    report = derived.verify(coll)
    assert not report.ok and report.checksum_mismatches == 3
    assert sorted(report.checksum_mismatch_ids) == ["v101", "v47", "v5"]
    assert report.index_mismatches == 3 and sorted(report.index_mismatch_ids) == ["v101", "v47", "v5"]
    assert any(_rel(coll, path) in p for p in report.table_problems)
    version = coll.version
    report = derived.verify(coll, repair=True)
    assert report.ok, report
    repair = report.repairs[0]
    assert repair["kept"] == 117 and repair["recovered"] == 3 and repair["lost"] == 0
    assert coll.version > version and path.exists()  # a new version; the damaged file is left on disk
    rows, stored = coll.vectors()
    assert np.array_equal(stored[np.argsort(rows)], vecs)


def test_silent_flips_without_older_copies_take_the_vector_from_the_flat_index(home: Path) -> None:
    coll, vecs = _collection(home)
    lance.dataset(str(coll.layout.items_dir)).cleanup_old_versions(older_than=timedelta(0), delete_unverified=True)
    _flip_vector_bits(_newest_data(coll), vecs, [8, 60])
    report = derived.verify(coll, repair=True)
    assert report.ok and report.repairs[0]["from_index"] == 2 and report.repairs[0]["lost"] == 0
    rows, stored = coll.vectors()
    assert np.array_equal(stored[np.argsort(rows)], vecs)


# --------------------------------------------------------------------- repair
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_repair_keeps_every_row_with_a_good_copy_and_deletes_nothing(home: Path, damage: str,
                                                                      capsys: pytest.CaptureFixture) -> None:
    coll, vecs = _collection(home)
    derived.delete(coll, ["v7"])  # a deletion after the compaction: the repair must not bring it back
    path = _newest_data(coll)
    files_before = {p.name for p in coll.root.rglob("*") if p.is_file()}
    if damage == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    else:
        path.unlink()
        files_before.discard(path.name)
    capsys.readouterr()
    assert main(_cli(home, "verify", "dmg", "--repair", "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["repairs"][0]["lost"] == 0 and report["repairs"][0]["recovered"] == 119
    assert files_before <= {p.name for p in coll.root.rglob("*") if p.is_file()}  # nothing deleted
    coll = Collection.open("dmg", home)
    assert coll.count() == 119 and "v7" not in coll.existing_ids()
    assert main(_cli(home, "search", "dmg", "--id", "v3", "--json")) == 0
    capsys.readouterr()
    # the table goes on: a new row gets a number never used before
    coll.add([{"id": "new", "kind": "image", "source": "new.png", "metadata": {}}], _vectors(1, seed=5))
    assert int(coll.rows("id = 'new'", ["_row"]).column("_row")[0].as_py()) >= 120
    assert derived.verify(coll, repair=True).ok


def test_a_corrupt_latest_manifest_is_set_aside_not_deleted(home: Path, capsys: pytest.CaptureFixture) -> None:
    coll, _ = _collection(home)
    path = _manifest(coll)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(_cli(home, "verify", "dmg", "--repair", "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["repairs"][0]["set_aside"] == [_rel(coll, path)]
    assert list(coll.layout.damaged_dir.rglob(path.name))  # kept
    coll = Collection.open("dmg", home)
    assert coll.count() == 120
    coll.add([{"id": "after", "kind": "image", "source": "a.png", "metadata": {}}], _vectors(1, seed=9))
    assert coll.count() == 121


def test_a_damaged_ledger_is_rebuilt_from_older_versions(home: Path) -> None:
    coll, _ = _collection(home)
    coll.ledger_table.compact()  # one file holds every ledger row; older versions hold them too
    path = _newest_data(coll, "ledger")
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(TableDamagedError):
        coll.ledger()
    report = derived.verify(coll, repair=True)
    assert report.ok and report.repairs[0]["table"] == "ledger" and report.repairs[0]["lost"] == 0
    assert len(coll.ledger()) == 120 and report.expected == 120


def test_lost_rows_are_listed_by_run_and_ingested_again_from_the_recorded_inputs(
        home: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import caselens

    col = caselens.open("cxr", home, create=True)
    first = make_images(tmp_path / "a", n_per_class=4, seed=1)
    second = make_images(tmp_path / "b", n_per_class=3, seed=2)
    col.ingest(manifest=first / "manifest.csv", progress=False)
    col.ingest(manifest=second / "manifest.csv", progress=False)
    storage = Collection.open("cxr", home)
    ids = storage.existing_ids()
    assert len(ids) == 14
    # a collection older than the cleanup window: no older copy of any row is left
    lance.dataset(str(storage.layout.items_dir)).cleanup_old_versions(older_than=timedelta(0), delete_unverified=True)
    os.truncate(_newest_data(storage), _newest_data(storage).stat().st_size // 2)
    capsys.readouterr()
    assert main(_cli(home, "verify", "cxr", "--repair", "--json")) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["lost_count"] == 14 and report["missing_count"] == 14
    assert sorted(report["missing_by_run"].values()) == [6, 8]
    assert [s["possible"] for s in report["reingest"]] == [True, True]
    assert main(_cli(home, "verify", "cxr", "--repair")) == 1
    out = capsys.readouterr().out
    assert "to ingest again: run" in out and "--reingest" in out
    assert main(_cli(home, "verify", "cxr", "--repair", "--reingest", "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["after_reingest"]["ok"] and sum(r["accepted"] for r in report["reingested"]) == 14
    storage = Collection.open("cxr", home)
    assert storage.existing_ids() == ids
    labels = storage.rows(columns=["label"]).column("label").to_pylist()
    assert set(labels) == {"stripes", "blob"}  # read with its manifest again: metadata back too


# --------------------------------------------------------------------- ledger
def test_the_ledger_keeps_one_row_per_input_and_outcome_over_reruns(home: Path) -> None:
    coll, _ = _collection(home, batches=1, per=20)
    entries = [LedgerEntry(f"f{i}.png", "duplicate", f"v{i}", "already_present", "stored") for i in range(20)]
    entries.append(LedgerEntry("bad.png", "rejected", "", "corrupt_image", "cannot read"))
    for run in range(5):
        coll.record(f"rerun{run}", entries)
    rows = coll.ledger()
    assert len(rows) == 20 + 20 + 1
    dup = [r for r in rows if r["status"] == "duplicate"]
    assert all(r["runs"] == 5 and r["run_id"] == "rerun0" and r["last_run"] == "rerun4" for r in dup)
    assert len(coll.ledger(run_id="rerun4")) == 21 and len(coll.ledger(run_id="run0")) == 20
    assert coll.ledger(run_id="rerun2") == []  # neither the first nor the last run of any row
    assert len(expected_ids(coll.ledger_table.table())) == 20
    # deleted, then accepted again: the last event wins whatever the clock says
    derived.delete(coll, ["v3"])
    assert "v3" not in expected_ids(coll.ledger_table.table())
    coll.add([{"id": "v3", "kind": "image", "source": "f3.png", "metadata": {}}], _vectors(1, seed=3))
    coll.record("again", [LedgerEntry("f3.png", "accepted", "v3")])
    assert "v3" in expected_ids(coll.ledger_table.table())
    accepted = [r for r in coll.ledger(item_ids=["v3"]) if r["status"] == "accepted"]
    assert len(accepted) == 1 and accepted[0]["runs"] == 2
    derived.refresh(coll)
    assert derived.verify(coll).ok


def test_an_old_ledger_is_read_as_it_is_and_migrated_by_the_first_write(home: Path) -> None:
    coll, _ = _collection(home, batches=1, per=10)
    schema = pa.schema([LEDGER_SCHEMA.field(c) for c in OLD_COLUMNS])
    old = []
    for run in range(4):  # the old form: a row per input per run
        old += [{"run_id": f"r{run}", "time": f"2024-01-0{run + 1}T00:00:00Z", "input": f"f{i}.png", "item_id": f"v{i}",
                 "status": "accepted" if run == 0 else "duplicate", "reason_code": "", "reason": ""} for i in range(10)]
    old.append({"run_id": "del", "time": "2024-01-05T00:00:00Z", "input": "delete v2", "item_id": "v2",
                "status": "deleted", "reason_code": "deleted", "reason": ""})
    lance.write_dataset(pa.Table.from_pylist(old, schema=schema), str(coll.layout.ledger_dir), mode="overwrite",
                        schema=schema)
    coll = Collection.open("dmg", home)
    rows = coll.ledger()
    assert len(rows) == 41 and all(r["runs"] == 1 for r in rows)
    before = expected_ids(coll.ledger_table.table())
    assert before == {f"v{i}" for i in range(10)} - {"v2"}
    versions = len(lance.dataset(str(coll.layout.ledger_dir)).versions())
    coll.record("new", [LedgerEntry("f0.png", "duplicate", "v0", "already_present", "")])
    rows = coll.ledger()
    assert len(rows) == 10 + 10 + 1
    assert next(r for r in rows if r["input"] == "f0.png" and r["status"] == "duplicate")["runs"] == 4
    assert expected_ids(coll.ledger_table.table()) == before
    assert len(lance.dataset(str(coll.layout.ledger_dir)).versions()) > versions  # old rows kept in older versions


def test_phantoms_are_reported_and_recorded_by_repair(home: Path) -> None:
    coll, _ = _collection(home, batches=1, per=10)
    coll.add([{"id": "ghost", "kind": "image", "source": "g.png", "metadata": {}}], _vectors(1, seed=4))
    derived.refresh(coll)
    report = derived.verify(coll)  # stored, and no ledger row at all (a run killed before its ledger write)
    assert not report.ok and report.phantoms == ["ghost"] and report.phantom_count == 1
    report = derived.verify(coll, repair=True)
    assert report.ok and not report.phantoms
    row = next(r for r in coll.ledger(item_ids=["ghost"]) if r["status"] == "accepted")
    assert row["input"] == "g.png" and row["reason_code"] == "recovered"


def test_a_rerun_that_meets_an_item_stored_without_its_ledger_row_records_its_acceptance(home: Path) -> None:
    coll, _ = _collection(home, batches=1, per=10)
    coll.add([{"id": "late", "kind": "image", "source": "l.png", "metadata": {}}], _vectors(1, seed=7))
    derived.refresh(coll)
    assert derived.verify(coll).phantoms == ["late"]
    # the re-run finds it stored: a duplicate, which the ledger records as the acceptance it lacked
    coll.record("rerun", [LedgerEntry("l.png", "duplicate", "late", "already_present", "stored"),
                          LedgerEntry("f1.png", "duplicate", "v1", "already_present", "stored")])
    rows = {(r["item_id"], r["status"]): r for r in coll.ledger(item_ids=["late", "v1"])}
    assert rows[("late", "accepted")]["reason_code"] == "recovered" and ("late", "duplicate") not in rows
    assert ("v1", "duplicate") in rows  # an item the ledger holds as accepted stays a duplicate
    assert derived.verify(coll).ok


def test_a_collection_made_before_checksums_still_verifies_and_gets_them_on_new_rows(home: Path) -> None:
    coll, vecs = _collection(home, batches=1, per=10, compact=False)
    table = coll.rows().drop_columns(["_checksum"])
    schema = coll.dataset().schema.remove(coll.dataset().schema.get_field_index("_checksum"))
    shutil.rmtree(coll.layout.items_dir)
    lance.write_dataset(table.cast(schema), str(coll.layout.items_dir), schema=schema)
    coll = Collection.open("dmg", home)
    derived.refresh(coll, rebuild=True)
    report = derived.verify(coll)
    assert report.ok and report.unchecked_rows == 10 and any("no checksum" in n for n in report.notes)
    coll.add([{"id": "new", "kind": "image", "source": "n.png", "metadata": {}}], _vectors(1, seed=6))
    coll.record("later", [LedgerEntry("n.png", "accepted", "new")])
    derived.refresh(coll)
    report = derived.verify(coll)
    assert report.ok and report.unchecked_rows == 10 and coll.count() == 11


def test_a_collection_whose_creation_was_killed_is_created_again(home: Path, image_folder: Path) -> None:
    import caselens

    # a writer killed while creating the ledger and the table: folders with data files, no version
    for table in ("ledger", "items"):
        folder = home / "half" / "lance" / f"{table}.lance" / "data"
        folder.mkdir(parents=True)
        (folder / "partial.lance").write_bytes(b"\0" * 64)
    assert not Collection.exists("half", home)
    report = caselens.open("half", home, create=True).ingest(manifest=image_folder / "manifest.csv", progress=False)
    assert report.accepted == 12
    coll = Collection.open("half", home)
    assert len(coll.ledger()) == 12 and derived.verify(coll).ok

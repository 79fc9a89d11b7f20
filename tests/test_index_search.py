"""FAISS index life cycle and search, on real LanceDB tables and FAISS files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from caselens import files
from caselens.errors import EncoderMismatchError, QueryError
from caselens.indexes import derived, faiss_index
from caselens.indexes.collection import Collection
from caselens.indexes.join_cache import JoinCache
from caselens.indexes.reader import reader_of
from caselens.ingest.pipeline import IngestConfig, ingest
from caselens.ingest.sources import ImageSource
from caselens.ingest.encoders import load_encoder
from caselens.retrieval.search import search, search_vector
from caselens.ingest.sources.image_folder import ImageSourceConfig


@pytest.fixture
def cases(home: Path, image_folder: Path) -> Collection:
    enc = load_encoder("classic")
    coll = Collection.create("cases", enc.info.to_record(), home)
    relative = ImageSourceConfig(source_paths="relative")  # results are checked by file name
    ingest(ImageSource(manifest=image_folder / "manifest.csv", secret=coll.secret(), config=relative), coll, enc,
           IngestConfig(progress=False))
    return coll


def _vector_collection(home: Path, n: int = 40, dim: int = 8, seed: int = 0) -> tuple[Collection, np.ndarray]:
    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    record = {"spec": "test:vectors", "dim": dim, "modalities": ["image"], "fingerprint": "f" * 16, "options": {}}
    coll = Collection.create("vecs", record, home)
    coll.add([{"id": f"v{i}", "kind": "image", "source": f"v{i}", "metadata": {"group": f"g{i % 4}", "score": float(i)}}
              for i in range(n)], vecs)
    return coll, vecs


def test_image_in_index_finds_itself_first(cases: Collection, image_folder: Path) -> None:
    for name in ("stripes_2.png", "blob_4.png"):
        result = search(cases, image=image_folder / name, k=5)
        assert result.hits[0].source == name
        assert result.hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert [h.rank for h in result.hits] == [1, 2, 3, 4, 5]
        assert all(a.score >= b.score for a, b in zip(result.hits, result.hits[1:]))
        # the training-free descriptor still groups the synthetic classes
        assert result.hits[1].label == result.hits[0].label


def test_where_and_exclude_same_filter_before_ranking(cases: Collection, image_folder: Path) -> None:
    result = search(cases, image=image_folder / "stripes_0.png", k=20, where="label = 'blob'")
    assert result.hits and {h.label for h in result.hits} == {"blob"} and len(result.hits) == 6
    mine = cases.rows("source = 'stripes_0.png'", ["patient_id"]).to_pylist()[0]["patient_id"]
    result = search(cases, image=image_folder / "stripes_0.png", k=20, exclude_same="patient_id")
    assert len(result.hits) == 12 - 2  # the query's patient has two images
    assert all(h.metadata.get("patient_id") != mine for h in result.hits)
    assert result.candidates == 10


def test_bad_queries_raise_query_errors(cases: Collection, image_folder: Path) -> None:
    with pytest.raises(QueryError, match="no column"):
        search(cases, image=image_folder / "blob_0.png", exclude_same="nonexistent")
    with pytest.raises(QueryError, match="could not be applied"):
        search(cases, image=image_folder / "blob_0.png", where="label = = 'x'")
    with pytest.raises(QueryError, match="does not exist"):
        search(cases, image=image_folder / "nothing.png")
    with pytest.raises(QueryError, match="exactly one"):
        search(cases)
    (image_folder / "bad.png").write_bytes(b"no image")
    with pytest.raises(QueryError, match="cannot be read"):
        search(cases, image=image_folder / "bad.png")


def test_vector_search_matches_brute_force_with_filters(home: Path) -> None:
    coll, vecs = _vector_collection(home)
    q = vecs[3] + 0.1 * vecs[7]
    q /= np.linalg.norm(q)
    expected = np.argsort(-(vecs @ q))[:5]
    got = search_vector(coll, q, k=5)
    assert [h.id for h in got.hits] == [f"v{i}" for i in expected]
    allowed = [i for i in range(len(vecs)) if i % 4 == 1]
    expected = sorted(allowed, key=lambda i: -float(vecs[i] @ q))[:3]
    got = search_vector(coll, q, k=3, where="\"group\" = 'g1'")
    assert [h.id for h in got.hits] == [f"v{i}" for i in expected]
    got = search_vector(coll, q, k=3, where="score >= 30")
    assert all(int(h.id[1:]) >= 30 for h in got.hits) and len(got.hits) == 3
    with pytest.raises(QueryError, match="dimension"):
        search_vector(coll, np.ones(5), k=3)


def test_rows_committed_after_the_index_are_found_without_touching_it(home: Path) -> None:
    coll, vecs = _vector_collection(home)
    stamp = derived.refresh(coll)
    assert stamp.ntotal == len(vecs) and stamp.table_version == coll.version
    extra = np.eye(8, dtype=np.float32)[:1]
    coll.add([{"id": "new", "kind": "image", "source": "new", "metadata": {}}], extra)
    coll.delete(["v5"])
    hits = search_vector(coll, extra[0], k=1).hits
    assert hits[0].id == "new"  # ranked exactly beside the stamped index
    assert "v5" not in [h.id for h in search_vector(coll, vecs[5], k=40).hits]  # deleted since: never ranks
    assert faiss_index.read_stamp(coll.layout.faiss_dir) == stamp  # readers never write the index
    after = derived.refresh(coll)  # the writer's job
    assert after.table_version == coll.version and after.live == len(vecs)
    assert search_vector(coll, extra[0], k=1).hits[0].id == "new"


def test_damaged_index_is_never_served_and_a_writer_rebuilds_it(home: Path) -> None:
    coll, vecs = _vector_collection(home)
    derived.refresh(coll)
    path = coll.layout.faiss_dir / faiss_index.INDEX_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(faiss_index.IndexIntegrityError, match="checksum"):
        faiss_index.load_index(coll.layout.faiss_dir, coll.encoder["fingerprint"])
    hits = search_vector(coll, vecs[5], k=1).hits  # ranked exactly rather than from a damaged index
    assert hits[0].id == "v5" and path.read_bytes() == bytes(data)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    assert search_vector(coll, vecs[9], k=1).hits[0].id == "v9"
    derived.refresh(coll)  # a writer rebuilds it
    index, _ = faiss_index.load_index(coll.layout.faiss_dir, coll.encoder["fingerprint"], cached=False)
    assert index.ntotal == len(vecs)


def test_index_from_another_encoder_is_refused(home: Path) -> None:
    coll, vecs = _vector_collection(home)
    derived.refresh(coll)
    stamp_path = coll.layout.faiss_dir / faiss_index.STAMP_FILE
    stamp = json.loads(stamp_path.read_text())
    stamp["encoder_fingerprint"] = "0" * 16
    stamp_path.write_text(json.dumps(stamp))
    with pytest.raises(EncoderMismatchError, match="refusing"):
        search_vector(coll, vecs[0], k=3)


def test_collection_refuses_a_different_encoder_for_queries(cases: Collection) -> None:
    with pytest.raises(EncoderMismatchError):
        cases.check_encoder(load_encoder("pixels").info.to_record())


def test_atomic_write_leaves_previous_index_when_interrupted(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    coll, vecs = _vector_collection(home)
    derived.refresh(coll)
    before = (coll.layout.faiss_dir / faiss_index.INDEX_FILE).read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "fsync", boom)  # the atomic writer of caselens.files
    coll.add([{"id": "x", "kind": "image", "source": "x", "metadata": {}}], vecs[:1])
    with pytest.raises(OSError):
        derived.refresh(coll)
    assert (coll.layout.faiss_dir / faiss_index.INDEX_FILE).read_bytes() == before
    assert not list(coll.layout.faiss_dir.glob("*.tmp"))
    monkeypatch.undo()
    assert search_vector(coll, vecs[0], k=2).candidates == len(vecs) + 1


def test_hnsw_index_above_threshold_searches_with_selector(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(600, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    monkeypatch.setattr(faiss_index, "HNSW_THRESHOLD", 100)
    index, factory = faiss_index.build_index(vecs, np.arange(600) + 1000)
    assert factory == "HNSW32"
    scores, ids = faiss_index.search_index(index, vecs[:5], 1)
    assert list(ids[:, 0]) == [1000, 1001, 1002, 1003, 1004]
    allowed = np.arange(1000, 1600, 2)
    _, ids = faiss_index.search_index(index, vecs[1:2], 10, allowed_ids=allowed)
    assert all(i % 2 == 0 for i in ids[0] if i >= 0)


def _unit(dim: int, i: int) -> np.ndarray:
    return np.eye(dim, dtype=np.float32)[i]


def test_writes_by_another_process_are_seen_by_the_next_search(home: Path) -> None:
    import subprocess
    import sys
    import textwrap

    coll, vecs = _vector_collection(home)
    assert search_vector(coll, vecs[3], k=1).hits[0].id == "v3"  # index loaded, version checked
    assert search_vector(coll, vecs[3], k=1).hits[0].id == "v3"  # served without asking LanceDB
    code = textwrap.dedent(f"""
        import numpy as np
        from caselens.indexes.collection import Collection
        coll = Collection.open("vecs", {str(home)!r})
        coll.add([{{"id": "new", "kind": "image", "source": "new", "metadata": {{}}}}],
                 np.eye(8, dtype=np.float32)[:1])
        coll.delete(["v3"])
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    # as soon as the other process's writes returned: the addition is found, the deletion gone
    assert search_vector(coll, _unit(8, 0), k=1).hits[0].id == "new"
    assert "v3" not in [h.id for h in search_vector(coll, vecs[3], k=10).hits]
    assert reader_of(coll).snapshots.latest_version() == Collection.open("vecs", home).version


def test_writes_through_another_handle_are_seen_within_the_same_instant(home: Path) -> None:
    coll, vecs = _vector_collection(home)
    other = Collection.open("vecs", home)
    for i in range(3):  # no pause: searches right after a write, well inside any caching window
        assert search_vector(coll, vecs[10 + i], k=1).hits[0].id == f"v{10 + i}"
        other.add([{"id": f"new{i}", "kind": "image", "source": "new", "metadata": {}}], _unit(8, i)[None])
        other.delete([f"v{10 + i}"])
        assert search_vector(coll, _unit(8, i), k=1).hits[0].id == f"new{i}"
        assert f"v{10 + i}" not in [h.id for h in search_vector(coll, vecs[10 + i], k=10).hits]


def test_version_probe_agrees_with_lancedb(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    coll, vecs = _vector_collection(home)
    other = Collection.open("vecs", home)
    snapshots = reader_of(coll).snapshots
    snapshots.current()
    writes = [lambda: other.add([{"id": "a", "kind": "image", "source": "a", "metadata": {"new_key": "x"}}],
                                vecs[:1]),
              lambda: other.delete(["v1"]), lambda: other.compact()]
    for write in writes:
        before = snapshots.current().version
        with monkeypatch.context() as m:  # unchanged: answered from the file system alone
            m.setattr(Collection, "version", property(lambda self: pytest.fail("asked LanceDB")))
            assert snapshots.latest_version() == before
        write()
        assert snapshots.latest_version() == other.version > before
        assert snapshots.current().version == other.version
    monkeypatch.setenv("CASELENS_VERSION_PROBE", "0")
    snapshots.invalidate()
    assert snapshots.current().version == other.version
    with monkeypatch.context() as m:  # probe off: every check asks LanceDB
        m.setattr(Collection, "version", property(lambda self: 10_000))
        assert snapshots.latest_version() == 10_000


def test_join_cache_ignores_unknown_rows_and_fills_empty_columns(home: Path) -> None:
    coll, _ = _vector_collection(home)
    snapshot = reader_of(coll).snapshot()
    rows = snapshot.row_dicts([3, -1, 10_000, 5, 3])
    assert sorted(rows) == [3, 5]
    assert rows[3]["id"] == "v3" and rows[3]["label"] is None and rows[3]["group"] == "g3"
    assert set(rows[3]) == {c for c in coll.columns() if c != "vector"}
    assert snapshot.row_dicts(np.array([5])) == {5: rows[5]}


def test_snapshots_are_built_incrementally_and_match_a_fresh_read(home: Path) -> None:
    coll, vecs = _vector_collection(home)
    reader = reader_of(coll)
    first = reader.snapshot()
    coll.add([{"id": f"n{i}", "kind": "image", "source": "n", "metadata": {"group": "gn"}} for i in range(3)], vecs[:3])
    coll.delete(["v0", "v7"])
    coll.compact()
    later = reader.snapshot()
    assert later is not first and later.version > first.version
    fresh = Collection.open("vecs", home)
    expected = reader_of(fresh).snapshot()
    assert list(later.rows) == list(expected.rows) and later.row_of("v0") is None and later.row_of("n2") is not None
    assert later.row_dicts(later.rows.tolist()) == expected.row_dicts(expected.rows.tolist())
    assert first.row_of("v0") == 0  # an older snapshot stays as it was


def test_row_numbers_are_never_reused_after_deleting_the_last_rows(home: Path) -> None:
    coll, vecs = _vector_collection(home, n=5)
    derived.refresh(coll)
    coll.delete(["v4", "v3"])
    coll.add([{"id": "late", "kind": "image", "source": "late", "metadata": {}}], vecs[:1])
    rows = coll.rows(columns=["id", "_row"]).to_pylist()
    assert {r["id"]: r["_row"] for r in rows}["late"] == 5
    # the stale index still holds rows 3 and 4 (deleted): the new row is not taken for either
    assert search_vector(coll, vecs[0], k=5).hits[0].id in ("v0", "late")
    assert {h.id for h in search_vector(coll, vecs[4], k=5).hits} == {"v0", "v1", "v2", "late"}


def test_a_search_returns_while_another_process_holds_the_write_lock(home: Path) -> None:
    import subprocess
    import sys
    import textwrap
    import time

    coll, vecs = _vector_collection(home)
    derived.refresh(coll)
    marker = home / "locked"
    code = textwrap.dedent(f"""
        import time, numpy as np
        from pathlib import Path
        from caselens.indexes.collection import Collection
        coll = Collection.open("vecs", {str(home)!r})
        with coll.lock.hold():
            coll.add([{{"id": "while-locked", "kind": "image", "source": "x", "metadata": {{}}}}],
                     np.eye(8, dtype=np.float32)[1:2])
            Path({str(marker)!r}).write_text("1")
            time.sleep(60)
    """)
    writer = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert writer.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with coll.lock.try_hold() as held:
            assert not held  # the other process really holds it
        start = time.monotonic()
        hits = search_vector(coll, _unit(8, 1), k=1).hits
        assert time.monotonic() - start < 10 and hits[0].id == "while-locked"  # committed before: seen
    finally:
        writer.kill()
        writer.wait()


def test_tombstones_are_excluded_whichever_list_is_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    vecs = rng.normal(size=(300, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    monkeypatch.setattr(faiss_index, "HNSW_THRESHOLD", 100)
    index, factory = faiss_index.build_index(vecs, np.arange(300))
    assert factory == "HNSW32"
    params = {"efSearch": 64}
    first, second = [0, 1], [2]
    cases = [(first, {0, 1}, {2}), (first, {0, 1}, {2}), (second, {2}, {0, 1}), (None, set(), {0, 1, 2})]
    for deleted, gone, back in cases:
        _, ids = faiss_index.search_index(index, vecs[:3], 1, params=params, deleted=deleted)
        found = set(ids[:, 0].tolist())
        assert not found & gone and back <= found
    faiss_index.search_index(index, vecs[:3], 1, params=params, deleted=first)  # parameters kept for it
    first.append(2)  # the same list object, changed: its new contents count
    _, ids = faiss_index.search_index(index, vecs[:3], 1, params=params, deleted=first)
    assert not set(ids[:, 0].tolist()) & {0, 1, 2}


def test_join_reads_the_same_rows_from_buffers_arrow_and_lancedb(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    coll, vecs = _vector_collection(home)
    extra = [{"id": "ü", "kind": "text", "source": "Grüße ✓ 𝄞", "text": "", "provenance": {"page": 2},
              "metadata": {"group": "ünï", "score": -0.5, "only_here": "x"}},
             {"id": "n", "kind": "image", "source": None, "metadata": {"group": None, "score": None}}]
    coll.add(extra, vecs[:2])
    wanted = [41, 0, 40, 39, 41, -3, 99]
    snapshot = reader_of(coll).snapshot()
    from_buffers = snapshot.row_dicts(wanted)
    monkeypatch.setattr(JoinCache, "PYTHON_BELOW", 0)
    assert snapshot.row_dicts(wanted) == from_buffers
    monkeypatch.setenv("CASELENS_JOIN_CACHE_BYTES", "0")
    uncached = reader_of(Collection.open("vecs", home)).snapshot()
    assert uncached.data is None and uncached.row_dicts(wanted) == from_buffers
    assert from_buffers[40]["source"] == "Grüße ✓ 𝄞" and from_buffers[40]["text"] == ""
    assert from_buffers[40]["score"] == -0.5 and from_buffers[41]["score"] is None
    assert from_buffers[41]["source"] is None and from_buffers[39]["only_here"] is None
    assert sorted(from_buffers) == [0, 39, 40, 41]


def test_join_on_an_empty_collection_finds_nothing(home: Path) -> None:
    record = {"spec": "test:vectors", "dim": 8, "modalities": ["image"], "fingerprint": "f" * 16, "options": {}}
    coll = Collection.create("empty", record, home)
    snapshot = reader_of(coll).snapshot()
    assert snapshot.row_dicts([0, 3]) == {}
    assert "id" in snapshot.names and snapshot.values([0, 3]) == [None, None]
    assert search_vector(coll, np.ones(8) / np.sqrt(8), k=3).hits == []

"""Index choice by measured recall, IVF/HNSW/PQ builds, GPU code path, mmap, sharded builds,
incremental add/delete and filters on real FAISS indexes and LanceDB tables."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from caselens.indexes import derived, faiss_index, index_choice
from caselens.indexes.collection import Collection
from caselens.indexes.index_choice import ChoiceConfig, IndexBudgetError, choose_and_build, parse_memory
from caselens.retrieval.search import search_vector


def clustered(n: int, dim: int = 32, clusters: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim)).astype(np.float32)
    x = centers[rng.integers(0, clusters, n)] + rng.normal(scale=0.9, size=(n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact(base: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(base @ q.T).T, axis=1)[:, :k]


def make(home: Path, vecs: np.ndarray, name: str = "big") -> Collection:
    record = {"spec": "test:vectors", "dim": vecs.shape[1], "modalities": ["image"], "fingerprint": "c" * 16,
              "options": {}}
    coll = Collection.create(name, record, home)
    coll.add([{"id": f"v{i}", "kind": "image", "source": f"v{i}",
               "metadata": {"bucket": float(i % 1000), "modality": "CT" if i % 3 == 0 else "MR"}}
              for i in range(len(vecs))], vecs)
    return coll


SMALL = ChoiceConfig(exact_below=1000, n_queries=150, target_recall=0.95)


def test_choice_reaches_target_recall_and_tunes_nprobe() -> None:
    both = clustered(6200)
    vecs, queries = both[:6000], both[6000:]
    index, choice = choose_and_build(vecs, np.arange(6000) + 7, SMALL)
    assert choice.factory.startswith("IVF") and "nprobe" in choice.params
    assert choice.recall >= 0.95 and choice.memory_bytes == faiss_index.index_bytes(index)
    # the tuned nprobe is the cheapest reaching target + margin: one step lower falls short
    grid = index_choice.param_grid(index)[1]
    lower = [p for p in grid if p < choice.params["nprobe"]]
    ho = index_choice.held_out(vecs, np.arange(6000) + 7, 10, 150, SMALL.seed)
    if lower:
        assert index_choice.measure(index, ho, np.arange(6000) + 7, {"nprobe": lower[-1]}, 10) < 0.96
    # recall on fresh queries (same distribution, not in the collection) against exact search
    _, found = faiss_index.search_index(index, queries, 10, params=choice.params)
    truth = exact(vecs, queries, 10) + 7
    rec = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)])
    assert rec >= 0.93


def test_memory_budget_excludes_large_types_and_is_met() -> None:
    vecs = clustered(3000)
    budget = 3000 * 30  # 30 bytes a vector: rules out Flat (136 B) and SQ8 (40 B), leaves PQ (16 B)
    cfg = ChoiceConfig(exact_below=100, max_memory=budget, n_queries=100, target_recall=0.3,
                       factories=("IVF16,Flat", "IVF16,SQ8", "IVF16,PQ8x4"))
    assert index_choice.candidate_factories(3000, 32, cfg) == ["IVF16,PQ8x4"]
    index, choice = choose_and_build(vecs, np.arange(3000), cfg)
    assert choice.factory == "IVF16,PQ8x4" and choice.memory_bytes <= budget
    # the automatic list under a budget: only quantised types remain
    auto = index_choice.candidate_factories(200_000, 64, ChoiceConfig(max_memory=200_000 * 40))
    assert auto and all("PQ" in f for f in auto)
    with pytest.raises(IndexBudgetError, match="raise --max-memory"):
        index_choice.candidate_factories(200_000, 64, ChoiceConfig(max_memory=1000))


def test_unreachable_target_keeps_best_candidate_and_says_so() -> None:
    vecs = clustered(2000)
    cfg = ChoiceConfig(exact_below=100, n_queries=60, target_recall=0.999, margin=0.0,
                       factories=("IVF8,PQ2x4", "IVF8,PQ8x4"))
    _, choice = choose_and_build(vecs, np.arange(2000), cfg)
    assert "no candidate reached" in choice.reason and choice.factory == "IVF8,PQ8x4"
    assert choice.tried and choice.tried[0]["factory"] == "IVF8,PQ2x4" and choice.tried[0]["rejected_for"] == "recall"


@pytest.mark.parametrize("factory", ["HNSW16", "IVF32,Flat", "IVF32,SQ8",
                                     pytest.param("OPQ8_32,IVF32,PQ8x4", marks=pytest.mark.slow)])
def test_every_index_type_searches_with_params_and_filters(factory: str) -> None:
    vecs = clustered(4000)
    ids = np.arange(4000) * 3  # ids are not positions
    index, _ = faiss_index.build_index(vecs, ids, factory)
    params = {"efSearch": 64} if factory.startswith("HNSW") else {"nprobe": 8}
    _, found = faiss_index.search_index(index, vecs[:20], 1, params=params)
    assert np.mean(found[:, 0] == ids[:20]) >= 0.9
    allowed = ids[ids % 2 == 0]
    _, found = faiss_index.search_index(index, vecs[:20], 10, allowed_ids=allowed, params=params)
    assert set(found[found >= 0].tolist()) <= set(allowed.tolist())
    assert sorted(faiss_index.index_ids(index).tolist()) == sorted(ids.tolist())


def test_gpu_path_without_gpu_runs_on_cpu() -> None:
    """faiss-cpu here: the GPU branch must fall back to the CPU and give the same index."""
    assert faiss_index.gpu_count() == 0
    vecs = clustered(3000)
    same, on_gpu = faiss_index.to_device(faiss_index.empty_index("IVF16,Flat", 32))
    assert on_gpu is False and isinstance(same, faiss.Index)
    a, _ = faiss_index.build_index(vecs, np.arange(3000), "IVF16,Flat")
    b, _ = faiss_index.build_index(vecs, np.arange(3000), "IVF16,Flat")
    assert np.array_equal(faiss_index.search_index(a, vecs[:10], 5, params={"nprobe": 4})[1],
                          faiss_index.search_index(b, vecs[:10], 5, params={"nprobe": 4})[1])


def test_gpu_branch_trains_on_the_device_copy_and_returns_a_cpu_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU branch (clone to device, train and add there, copy back) with the device replaced
    by a CPU clone, since no CUDA device exists on this machine."""
    calls: list[str] = []
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)

    def to_gpu(index: faiss.Index) -> faiss.Index:
        calls.append("to_gpu")
        return faiss.clone_index(index)

    def to_cpu(index: faiss.Index) -> faiss.Index:
        calls.append("to_cpu")
        return faiss.clone_index(index)

    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_gpu, raising=False)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", to_cpu, raising=False)
    vecs = clustered(3000)
    index, _ = faiss_index.build_index(vecs, np.arange(3000), "IVF16,Flat")
    assert calls == ["to_gpu", "to_cpu"] and index.is_trained and index.ntotal == 3000
    monkeypatch.undo()
    cpu, _ = faiss_index.build_index(vecs, np.arange(3000), "IVF16,Flat")
    got = faiss_index.search_index(index, vecs[:50], 10, params={"nprobe": 16})[1]
    want = faiss_index.search_index(cpu, vecs[:50], 10, params={"nprobe": 16})[1]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)]) >= 0.99


@pytest.mark.gpu
def test_gpu_build_matches_cpu_within_ann_tolerance() -> None:  # pragma: no cover - needs CUDA
    vecs = clustered(20000, dim=64)
    gpu, _ = faiss_index.build_index(vecs, np.arange(20000), "IVF64,SQ8")
    assert faiss_index.gpu_count() > 0
    q = clustered(200, dim=64, seed=3)
    truth = exact(vecs, q, 10)
    got = faiss_index.search_index(gpu, q, 10, params={"nprobe": 16})[1]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth)]) >= 0.9


def test_mmap_load_and_sharded_on_disk_merge(tmp_path: Path) -> None:
    vecs = clustered(6000)
    ids = np.arange(6000) + 100
    trained = faiss_index.empty_index("IVF32,Flat", 32)
    trained.train(vecs[:3000])
    shards = [(vecs[i:i + 2000], ids[i:i + 2000]) for i in range(0, 6000, 2000)]
    merged = faiss_index.build_sharded_ivf(trained, shards, tmp_path / "sharded")
    assert merged.ntotal == 6000 and (tmp_path / "sharded" / "index.faiss.ivfdata").exists()
    assert not list((tmp_path / "sharded").glob("shard_*"))
    served = faiss.read_index(str(tmp_path / "sharded" / faiss_index.INDEX_FILE))
    _, found = faiss_index.search_index(served, vecs[:30], 1, params={"nprobe": 32})
    assert list(found[:, 0]) == list(ids[:30])
    # an ordinary index written with its stamp, loaded memory-mapped: same answers
    single, _ = faiss_index.build_index(vecs, ids, "IVF32,Flat")
    faiss_index.write_index(single, tmp_path / "mm", table_version=1, encoder_fingerprint="f", factory="IVF32,Flat")
    mapped, stamp = faiss_index.load_index(tmp_path / "mm", "f", mmap=True, cached=False)
    assert stamp.ntotal == 6000
    assert np.array_equal(faiss_index.search_index(mapped, vecs[:30], 5, params={"nprobe": 8})[1],
                          faiss_index.search_index(single, vecs[:30], 5, params={"nprobe": 8})[1])


def test_collection_auto_index_add_delete_without_rebuild(home: Path) -> None:
    both = clustered(4050)
    vecs, new = both[:4000], both[4000:]
    coll = make(home, vecs)
    stamp = derived.refresh(coll, config=SMALL)
    assert stamp.factory.startswith("IVF") and stamp.choice["recall"] >= 0.95
    assert stamp.choice["config"]["exact_below"] == 1000
    coll.add([{"id": f"n{i}", "kind": "image", "source": "n", "metadata": {}} for i in range(50)], new)
    assert search_vector(coll, new[3], k=1).hits[0].id == "n3"  # searchable at once (ranked exactly)
    derived.refresh(coll)  # the writer's refresh adds them to the index
    after = faiss_index.read_stamp(coll.layout.faiss_dir)
    assert after.trained_on == stamp.trained_on == 4000 and after.added_since_build == 50  # no retraining
    assert after.choice["total_seconds"] == stamp.choice["total_seconds"]
    assert derived.delete(coll, ["v5", "v6", "nope"]) == ["v5", "v6"]
    assert "v5" not in {h.id for h in search_vector(coll, vecs[5], k=10).hits}
    after = faiss_index.read_stamp(coll.layout.faiss_dir)
    assert after.removed_since_build == 2 and after.live == 4048 and after.table_version == coll.version
    assert {e["item_id"] for e in coll.ledger() if e["status"] == "deleted"} == {"v5", "v6"}


def test_hnsw_deletes_are_tombstoned_and_optimize_compacts_them(home: Path) -> None:
    vecs = clustered(3000)
    coll = make(home, vecs)
    derived.refresh(coll, config=ChoiceConfig(factories=("HNSW16",), n_queries=100, exact_below=100))
    derived.delete(coll, [f"v{i}" for i in range(0, 900)])
    stamp = faiss_index.read_stamp(coll.layout.faiss_dir)
    assert len(stamp.deleted) == 900 and stamp.live == 2100
    hits = search_vector(coll, vecs[10], k=10).hits
    assert hits and all(int(h.id[1:]) >= 900 for h in hits)
    report = derived.optimize(coll)
    assert report.rebuilt and "tombstones" in report.reason
    stamp = faiss_index.read_stamp(coll.layout.faiss_dir)
    assert stamp.deleted == [] and stamp.ntotal == 2100


def test_optimize_retrains_when_recall_drifts_below_target(home: Path) -> None:
    vecs = clustered(3000, seed=1)
    coll = make(home, vecs)
    derived.refresh(coll, config=ChoiceConfig(exact_below=100, n_queries=100, factories=("IVF16,Flat",)))
    # new data from elsewhere: the old centroids no longer fit; nprobe stays at its old value
    drift = clustered(6000, seed=42, clusters=200)
    coll.add([{"id": f"d{i}", "kind": "image", "source": "d", "metadata": {}} for i in range(6000)], drift)
    derived.refresh(coll)
    stamp = faiss_index.read_stamp(coll.layout.faiss_dir)
    assert stamp.added_since_build == 6000 and stamp.trained_on == 3000
    report = derived.optimize(coll)
    assert report.rebuilt and ("grew" in report.reason or "recall" in report.reason)
    after = faiss_index.read_stamp(coll.layout.faiss_dir)
    assert after.trained_on == 9000 and after.added_since_build == 0 and after.choice["recall"] >= 0.95
    # a second optimize with nothing changed leaves the index alone
    assert not derived.optimize(coll).rebuilt


@pytest.mark.parametrize("where, frac", [("bucket < 1", 0.001), ("bucket < 10", 0.01), ("bucket < 100", 0.1),
                                         ("bucket < 500", 0.5), ("modality = 'CT' AND bucket > 600", 0.13)])
def test_filters_are_applied_before_ranking_at_any_selectivity(home: Path, where: str, frac: float) -> None:
    both = clustered(5030)
    vecs, queries = both[:5000], both[5000:]
    coll = make(home, vecs, "filt")
    derived.refresh(coll, config=SMALL)
    buckets = np.arange(5000) % 1000
    ct = np.arange(5000) % 3 == 0
    mask = {"bucket < 1": buckets < 1, "bucket < 10": buckets < 10, "bucket < 100": buckets < 100,
            "bucket < 500": buckets < 500, "modality = 'CT' AND bucket > 600": ct & (buckets > 600)}[where]
    allowed = np.flatnonzero(mask)
    recalls = []
    for q in queries:
        hits = search_vector(coll, q, k=10, where=where).hits
        got = [int(h.id[1:]) for h in hits]
        assert set(got) <= set(allowed.tolist())
        truth = allowed[np.argsort(-(vecs[allowed] @ q))[:10]]
        assert len(got) == min(10, len(allowed))
        recalls.append(len(set(got) & set(truth.tolist())) / len(truth))
    assert np.mean(recalls) >= 0.95


def test_parse_memory_units() -> None:
    assert parse_memory("4GB") == 4 * 10**9 and parse_memory("512MiB") == 512 * 2**20 and parse_memory("2e9") == 2 * 10**9
    with pytest.raises(ValueError, match="not understood"):
        parse_memory("lots")


def test_compaction_moves_the_stamp_without_rewriting_the_index(home: Path) -> None:
    vecs = clustered(1200)
    coll = make(home, vecs[:1000], "compact")
    for start in range(1000, 1200, 50):  # several small writes leave fragments to compact
        coll.add([{"id": f"v{i}", "kind": "image", "source": "v", "metadata": {}} for i in range(start, start + 50)],
                 vecs[start:start + 50])
    derived.refresh(coll)
    path = coll.layout.faiss_dir / faiss_index.INDEX_FILE
    before, mtime = faiss_index.read_stamp(coll.layout.faiss_dir), path.stat().st_mtime_ns
    coll.compact()
    assert coll.version > before.table_version
    stamp = derived.refresh(coll)
    assert stamp.table_version == coll.version and stamp.checksum == before.checksum
    assert path.stat().st_mtime_ns == mtime
    assert search_vector(coll, vecs[1111], k=1).hits[0].id == "v1111"

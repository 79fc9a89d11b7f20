"""Distributed IVF builds on a local Ray cluster: trained once, shards added by Ray tasks from the
table's Lance fragments, lists merged on disk, stamped like any derived index; served by
``derived.load_for_read`` with the recall of an index built in one process; brought up to date by
adding again with the kept quantiser, never in place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from caselens.indexes import derived, faiss_index
from caselens.indexes.collection import Collection

ray_index = pytest.importorskip("caselens.indexes.ray_index")


def _clustered(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(40, dim))
    x = centers[rng.integers(0, 40, n)] + rng.normal(scale=0.9, size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _fill(col: Collection, vectors: np.ndarray, first: int, step: int = 1500) -> None:
    for i in range(0, len(vectors), step):  # several adds: several Lance fragments
        part = vectors[i:i + step]
        col.add([{"id": f"v{first + i + j}", "kind": "image", "source": "", "provenance": {}, "metadata": {}}
                 for j in range(len(part))], part)


def _recall(index, stamp, base: np.ndarray, rows: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    _, found = faiss_index.search_index(index, queries, k, params=stamp.params)
    truth = rows[np.argsort(-(queries @ base.T), axis=1)[:, :k]]
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)]))


def test_sharded_build_is_stamped_served_and_updated_by_adding_again(ray_cluster, home: Path) -> None:
    vectors = _clustered(6000)
    col = Collection.create("big", {"spec": "test:vectors", "dim": 32, "modalities": ["image"],
                                    "fingerprint": "d" * 16, "options": {}}, home)
    _fill(col, vectors, 0)
    stamp = ray_index.build(col, ray_index.RayIndexConfig(factory="IVF64,Flat", shards=3, nprobe=16))
    assert stamp.table_version == col.version and stamp.ntotal == 6000 and stamp.encoder_fingerprint == "d" * 16
    assert stamp.choice["method"] == "ray-sharded" and stamp.choice["shards"] == 3
    assert faiss_index.verify_lists(col.layout.faiss_dir, stamp)
    assert not list(col.layout.faiss_dir.glob(".shards-*")), "shard files left behind"
    index, served = derived.load_for_read(col)  # what searches use: loaded through the stamp and checksum
    assert served == stamp
    rows = np.sort(col.row_ids())
    local, _ = faiss_index.build_index(vectors, rows, "IVF64,Flat")
    assert _recall(index, served, vectors, rows, vectors[:100]) >= _recall(local, served, vectors, rows,
                                                                          vectors[:100]) - 0.02
    first_lists = stamp.choice["ivfdata"]

    more = _clustered(900, seed=1)
    _fill(col, more, 6000)
    again = ray_index.build(col, ray_index.RayIndexConfig(factory="IVF64,Flat", shards=2, nprobe=16), retrain=False)
    assert again.ntotal == 6900 and again.table_version == col.version
    assert again.choice["trained"] == stamp.choice["trained"], "the quantiser is reused"
    assert again.choice["ivfdata"] != first_lists and not (col.layout.faiss_dir / first_lists).exists()
    index, served = derived.load_for_read(col)
    _, found = faiss_index.search_index(index, more[:20], 1, params=served.params)
    assert set(found[:, 0]) <= set(col.row_ids().tolist()) and served.ntotal == 6900
    # a damaged lists file is caught by the stamp's size and checksum
    path = col.layout.faiss_dir / again.choice["ivfdata"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not faiss_index.verify_lists(col.layout.faiss_dir, again)


def test_shard_plan_covers_every_row_once() -> None:
    plan = ray_index.plan_shards([(0, 5), (1, 0), (2, 12), (3, 3)], 3)
    assert len(plan) == 3
    covered = [(fid, off + i) for g in plan for fid, off, n in g for i in range(n)]
    assert sorted(covered) == [(0, i) for i in range(5)] + [(2, i) for i in range(12)] + [(3, i) for i in range(3)]
    assert ray_index.default_factory(10_000) == "IVF512,SQ8" and ray_index.default_factory(10**9) == "IVF4096,SQ8"
    with pytest.raises(ValueError, match="IVF"):
        ray_index.RayIndexConfig(factory="HNSW32")

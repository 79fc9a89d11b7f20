"""OpenMP threads per query shape in ``faiss_index.search_index``: one thread for a single query on
a flat index, the default for batches and other index types; the count is restored and stays
per calling thread, so concurrent searches do not change each other's."""

from __future__ import annotations

import threading

import faiss
import numpy as np
import pytest

from caselens.indexes import faiss_index


def _unit(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def flat() -> tuple[faiss.Index, np.ndarray]:
    vecs = _unit(3000, 32, 0)
    index, factory = faiss_index.build_index(vecs, np.arange(3000) * 7, "Flat")
    assert factory == "Flat"
    return index, vecs


def test_thread_choice_by_query_shape(flat) -> None:
    index, vecs = flat
    hnsw, _ = faiss_index.build_index(vecs, np.arange(3000), "HNSW16")
    ivf, _ = faiss_index.build_index(vecs, np.arange(3000), "IVF16,Flat")
    assert faiss_index.is_flat(index) and faiss_index.is_flat(faiss.IndexFlatIP(8))
    assert not faiss_index.is_flat(hnsw) and not faiss_index.is_flat(ivf)
    assert faiss_index.search_threads(index, 1) == 1
    assert faiss_index.search_threads(index, 64) is None
    assert faiss_index.search_threads(hnsw, 1) is None and faiss_index.search_threads(ivf, 1) is None


def test_single_query_uses_one_thread_and_restores_the_count(flat, monkeypatch) -> None:
    index, vecs = flat
    default = faiss.omp_get_max_threads()
    seen: list[int] = []
    real = faiss_index._search
    monkeypatch.setattr(faiss_index, "_search", lambda *a: seen.append(faiss.omp_get_max_threads()) or real(*a))
    faiss_index.search_index(index, vecs[5], 3)
    faiss_index.search_index(index, vecs[:8], 3)
    assert seen == [1, default]
    assert faiss.omp_get_max_threads() == default
    monkeypatch.setattr(faiss_index, "_search", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        faiss_index.search_index(index, vecs[5], 3)
    assert faiss.omp_get_max_threads() == default  # restored after an error too


def test_results_do_not_depend_on_the_thread_count(flat) -> None:
    index, vecs = flat
    queries = _unit(20, 32, 1)
    one_by_one = [faiss_index.search_index(index, q, 10) for q in queries]
    scores, ids = faiss_index.search_index(index, queries, 10)
    assert np.array_equal(np.concatenate([i for _, i in one_by_one]), ids)
    np.testing.assert_allclose(np.concatenate([s for s, _ in one_by_one]), scores, rtol=1e-5, atol=1e-6)
    exact = np.argsort(-(queries @ vecs.T), axis=1)[:, :10] * 7
    assert np.array_equal(ids, exact)
    allowed = np.arange(0, 3000, 3) * 7  # filtered single query: same rows as brute force
    _, got = faiss_index.search_index(index, queries[0], 5, allowed_ids=allowed)
    sims = queries[0] @ vecs[::3].T
    assert np.array_equal(got[0], np.argsort(-sims)[:5] * 3 * 7)


def test_concurrent_searches_keep_their_own_thread_counts(flat) -> None:
    index, vecs = flat
    default = faiss.omp_get_max_threads()
    inside, release = threading.Event(), threading.Event()
    seen: dict[str, int] = {}

    def hold() -> None:
        with faiss_index.omp_threads(1):
            seen["holder"] = faiss.omp_get_max_threads()
            inside.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    inside.wait(10)
    seen["other"] = faiss.omp_get_max_threads()  # this thread is not affected by the holder
    errors: list[BaseException] = []

    def many() -> None:
        try:
            for i in range(30):
                _, ids = faiss_index.search_index(index, vecs[i], 1)
                assert ids[0, 0] == i * 7
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    workers = [threading.Thread(target=many) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    release.set()
    holder.join()
    assert not errors
    assert seen == {"holder": 1, "other": default}
    assert faiss.omp_get_max_threads() == default

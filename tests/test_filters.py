"""Filters evaluated in memory give exactly the rows the Lance scan gives, or decline."""

from __future__ import annotations

from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest

from caselens.errors import QueryError
from caselens.indexes import derived
from caselens.indexes.collection import Collection, lance_filter
from caselens.indexes.filters import Unsupported, conjuncts, parse
from caselens.indexes.join_cache import JoinCache
from caselens.indexes.reader import reader_of
from caselens.retrieval.search import search_vector

STRINGS = ["a", "b%", "it's", None, "A", "ab_c", "a\\b", "abc", "ünï", "", "a", "zz", None, "b", "ab", "B%x"]
NUMBERS = [1.0, 2.5, None, -3.0, 1e3, 0.0, 7.0, float("nan"), -0.0, 2.5, float("inf"), None, 5.0, -1.5, 0.5, 3.0]

# Every predicate here is read by the evaluator; each must select exactly what the Lance scan selects.
CORPUS = [
    "s = 'a'", "s <> 'a'", "s != 'a'", "s < 'b'", "s >= 'ab'", "'b' > s", "s = 'it''s'", "s = ''",
    "s IN ('a', 'b%')", "s IN ('a', NULL)", "s NOT IN ('a', 'zz')", "s NOT IN ('a', NULL)", "s IN ('none')",
    "s IS NULL", "s IS NOT NULL", "NOT s IS NULL", "s LIKE 'a%'", "s LIKE 'b\\%'", "s LIKE 'ab\\_c'",
    "s like 'a_c'", "s NOT LIKE 'a%'", "s LIKE '%'", "s LIKE ''", "s ILIKE 'a%'", "s ILIKE 'B%'",
    "s LIKE '%\\\\%'", "s = 'ünï'", "s > 'z'",
    "x > 1", "x >= 2.5", "x < 0", "x <= -0.0", "x = 0", "x = -0.0", "x <> 0", "x = 2.5", "x <> 2.5", "x > 1e3",
    "x >= 7", "x < 7", "x > -1", "x = 1e3", "x > 0.5e1", "x BETWEEN 0 AND 2.5", "x NOT BETWEEN 0 AND 2.5",
    "x IN (1, 2.5)", "x NOT IN (1, 2.5)", "x IN (1, NULL)", "x NOT IN (0)", "x IN (-0.0)", "x IS NULL",
    "x IS NOT NULL", "NOT (x > 1)", "1 < x", "x = -3",
    "i > 3", "i = 4", "i IN (1, 2, 3)", "i NOT IN (5)", "i BETWEEN 2 AND 5", "i <> 0", "i IS NULL",
    "g = 'g1'", "\"group\" = 'g1'", "`group` = 'g2'", "\"group\" IN ('g1', 'g3') AND x > 0",
    "g = 'g1' OR x > 5", "g = 'g1' AND NOT (s = 'a' OR x IS NULL)", "(g = 'g2' OR g = 'g3') AND (s IS NULL OR s <> 'b')",
    "NOT (g = 'g1' AND x < 3)", "s IS NULL OR s <> 'a'", "x > 1 OR s = 'a'", "NOT s = 'a'", "NOT NOT x > 1",
    "(x > 1 OR s IS NULL) AND NOT g IN ('g3')", "true", "false", "TRUE AND x > 1", "x > 1 AND (true)",
    "_row > 5", "_row IN (1, 3, 99)", "G = 'g1'", "S = 'a' AND x > 0", "b = true", "b IS NULL", "NOT b",
    "b = false OR b IS NULL", "u > 1", "d > 1", "d IS NULL",
]

# Predicates the evaluator declines: the Lance scan answers (or reports the error).
DECLINED = ["x + 1 > 2", "abs(x) > 1", "s = x", "x = '1'", "s = 1", "i > 2.5", "CAST(x AS INT) = 1",
            "s LIKE 'a%' ESCAPE '!'", "x > (1)", "no_such = 1", "regexp_match(s, 'a')", "x = NULL", "x > +1"]


def _table() -> pa.Table:
    n = len(STRINGS)
    return pa.table({
        "_row": pa.array(range(n), pa.int64()),
        "s": pa.array(STRINGS, pa.string()),
        "x": pa.array(NUMBERS, pa.float64()),
        "i": pa.array([None if k % 5 == 0 else k for k in range(n)], pa.int64()),
        "g": pa.array([f"g{k % 3 + 1}" if k % 7 else None for k in range(n)], pa.string()),
        "group": pa.array([f"g{k % 3 + 1}" for k in range(n)], pa.string()),
        "b": pa.array([None if k % 4 == 0 else k % 2 == 0 for k in range(n)], pa.bool_()),
        "u": pa.array([k % 4 for k in range(n)], pa.uint32()),
        "d": pa.array([None] * n, pa.float64()),
    })


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> lance.LanceDataset:
    table = _table()
    big = pa.concat_tables([table] * 40)  # enough rows for the dictionary encoding of strings to kick in
    big = big.set_column(0, "_row", pa.array(range(big.num_rows), pa.int64()))
    return lance.write_dataset(big, str(tmp_path_factory.mktemp("filters") / "t.lance"))


def _scan(dataset: lance.LanceDataset, predicate: str) -> list[int]:
    return sorted(dataset.to_table(columns=["_row"], filter=lance_filter(predicate)).column("_row").to_pylist())


@pytest.mark.parametrize("encoded, lookup", [(True, False), (True, True), (False, False)])
def test_the_evaluator_selects_what_the_lance_scan_selects(dataset: lance.LanceDataset, encoded: bool, lookup: bool,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from caselens.indexes import filters

    if lookup:  # dictionary values found by lookup, not compared (as for long dictionaries)
        monkeypatch.setattr(filters, "LOOKUP_ABOVE", 0)
    table = dataset.to_table()
    if not encoded:  # a handful of rows: strings stay plain (nothing is dictionary-encoded)
        table = table.slice(0, len(STRINGS))
    cache = JoinCache.build(table)
    assert any(pa.types.is_dictionary(t) for t in cache.segments[0].data.schema.types) == encoded
    rows = set(table.column("_row").to_pylist())
    for predicate in CORPUS:
        want = [r for r in _scan(dataset, predicate) if r in rows]
        got = cache.select(conjuncts(parse(predicate))).tolist()
        assert got == want, predicate


def test_the_evaluator_declines_what_it_does_not_read(dataset: lance.LanceDataset) -> None:
    cache = JoinCache.build(dataset.to_table())
    for predicate in DECLINED:
        with pytest.raises(Unsupported):
            cache.select(conjuncts(parse(predicate)))


def _collection(home: Path, n: int = 300, dim: int = 8) -> tuple[Collection, np.ndarray]:
    rng = np.random.default_rng(3)
    vecs = rng.normal(size=(n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    record = {"spec": "test:vectors", "dim": dim, "modalities": ["image"], "fingerprint": "f" * 16, "options": {}}
    coll = Collection.create("flt", record, home)
    coll.add([{"id": f"v{i}", "kind": "image", "source": f"s'{i}", "metadata": {
        "group": f"g{i % 5}", "bucket": float(i % 100), "patient_id": f"p{i // 3}",
        "site": None if i % 11 == 0 else ("north" if i % 2 else "south")}} for i in range(n)], vecs)
    return coll, vecs


SNAPSHOT_FILTERS = ["bucket < 10", "\"group\" = 'g1'", "\"group\" IN ('g1', 'g2') AND bucket >= 50",
                    "site IS NULL OR site <> 'north'", "source LIKE 's''1%'", "id NOT IN ('v1', 'v2')",
                    "(bucket < 10) AND (patient_id IS NULL OR patient_id <> 'p1') AND id NOT IN ('v0')",
                    "bucket < 10 AND abs(bucket) < 5", "label IS NULL AND bucket > 97"]


def test_snapshot_filters_match_the_scan_through_appends_and_deletes(home: Path) -> None:
    coll, vecs = _collection(home)
    reader = reader_of(coll)
    for step in range(4):
        snapshot = reader.snapshot()
        for predicate in SNAPSHOT_FILTERS:
            selection = snapshot.selection(predicate)
            assert selection.rows.tolist() == snapshot.scan(predicate).tolist(), (step, predicate)
            assert selection.evaluated == ("scan" if "abs(" in predicate else "memory")
            assert snapshot.selection(predicate) is selection  # kept for the next search
        base = 300 + 10 * step
        coll.add([{"id": f"n{base + i}", "kind": "image", "source": f"s'{base + i}",
                   "metadata": {"group": "g1", "bucket": float(i), "site": "north"}} for i in range(10)], vecs[:10])
        coll.delete([f"v{3 * step + 1}", f"n{base - 5}"])
    assert len(reader.snapshot().join_cache.segments) >= 1


def test_bad_filters_still_name_the_filter(home: Path) -> None:
    coll, vecs = _collection(home, n=20)
    for bad in ("no_such_column = 1", "bucket = 'x'", "bucket <"):
        with pytest.raises(QueryError, match="could not be applied"):
            search_vector(coll, vecs[0], k=3, where=bad)


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "HNSW16", "IVF4,SQ8"])
def test_filtered_search_is_the_exact_filtered_answer(home: Path, factory: str) -> None:
    """Small filtered sets are ranked whole: exactly where the index keeps the vectors as they
    are (flat, IVF-flat, HNSW-flat), by their quantised codes otherwise (every hit allowed)."""
    from caselens.indexes.index_choice import ChoiceConfig

    coll, vecs = _collection(home, n=400, dim=16)
    derived.refresh(coll, config=ChoiceConfig(factories=(factory,), exact_below=0, target_recall=0.0,
                                              n_queries=50))
    coll.add([{"id": f"late{i}", "kind": "image", "source": "late", "metadata": {"group": "g3", "bucket": 1.0}}
              for i in range(4)], vecs[:4] * -1)  # committed after the index: ranked exactly beside it
    vecs = np.concatenate([vecs, -vecs[:4]])
    rows = {r["id"]: r for r in coll.rows(columns=["id", "_row", "bucket", "group"]).to_pylist()}
    rng = np.random.default_rng(5)
    exact = "SQ8" not in factory
    for where, keep, small in (("bucket < 2", lambda r: r["bucket"] < 2, True),
                               ("\"group\" = 'g3' AND bucket < 30", lambda r: r["group"] == "g3" and r["bucket"] < 30, True),
                               ("bucket < 60", lambda r: r["bucket"] < 60, False)):
        allowed = sorted(r["_row"] for r in rows.values() if keep(r))
        ids = {r["_row"]: i for i, r in rows.items()}
        for q in rng.normal(size=(5, 16)).astype(np.float32):
            q /= np.linalg.norm(q)
            scores = vecs[allowed] @ q
            want = [ids[allowed[i]] for i in np.argsort(-scores, kind="stable")[:5]]
            got = search_vector(coll, q, k=5, where=where)
            assert got.candidates == len(allowed)
            if exact and (small or factory != "IVF4,Flat"):  # (a large set: IVF probes some lists)
                assert [h.id for h in got.hits] == want, (factory, where)
                assert np.allclose([h.score for h in got.hits], np.sort(scores)[::-1][:5], atol=1e-5)
            else:
                assert {h.id for h in got.hits} <= {ids[r] for r in allowed}
                assert len({h.id for h in got.hits} & set(want)) >= (4 if small else 3), (factory, where)


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "HNSW16"])
def test_per_query_exclusions_ride_on_the_filter_and_stay_exact(home: Path, factory: str) -> None:
    from caselens.indexes.index_choice import ChoiceConfig

    coll, vecs = _collection(home, n=600, dim=16)
    derived.refresh(coll, config=ChoiceConfig(factories=(factory,), exact_below=0, target_recall=0.0,
                                              n_queries=50))
    rows = coll.rows(columns=["_row", "bucket", "patient_id"]).to_pylist()
    rng = np.random.default_rng(7)
    for where in ("bucket < 5", None):
        for i in rng.choice(600, 4, replace=False):
            patient = f"p{i // 3}"
            allowed = sorted(r["_row"] for r in rows if (where is None or r["bucket"] < 5) and r["patient_id"] != patient)
            q = vecs[i] + rng.normal(scale=0.1, size=16).astype(np.float32)
            q /= np.linalg.norm(q)
            scores = vecs[allowed] @ q
            want = [f"v{allowed[j]}" for j in np.argsort(-scores, kind="stable")[:5]]
            got = search_vector(coll, q, k=5, where=where, exclude={"patient_id": patient})
            if where is None and factory.startswith("IVF"):  # the whole index, probed as unfiltered
                assert {h.id for h in got.hits} <= {f"v{r}" for r in allowed} and len(got.hits) == 5
            else:
                assert [h.id for h in got.hits] == want, (factory, where, patient)
            selection = reader_of(coll).snapshot().selection(
                " AND ".join(([f"({where})"] if where else []) + [f"(patient_id IS NULL OR patient_id <> '{patient}')"]))
            of_patient = {r["_row"] for r in rows if r["patient_id"] == patient and (where is None or r["bucket"] < 5)}
            assert selection.removed is not None and set(selection.removed.tolist()) == of_patient
            assert (selection.base is None) == (where is None)


def test_an_index_of_a_filters_rows_scores_them_as_the_index_does() -> None:
    import faiss

    from caselens.indexes import faiss_index, subset_index

    rng = np.random.default_rng(4)
    vecs = rng.normal(size=(3000, 32)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    for factory in ("IVF16,Flat", "IVF16,SQ8"):
        index, _ = faiss_index.build_index(vecs, np.arange(3000) * 2 + 1, factory)
        assert subset_index.supports(index)
        ids = np.sort(rng.choice(3000, 300, replace=False)) * 2 + 1
        sub = subset_index.subset_index(index, ids)
        selector, bits = faiss_index.bitmap_selector(ids)
        want = faiss_index.search_index(index, vecs[:20], 7, params={"nprobe": 16}, selector=(selector, len(ids)))
        del index  # the subset keeps what it shares alive
        got = faiss_index.search_index(sub, vecs[:20], 7, params={"nprobe": 16}, selector=(None, len(ids)))
        assert np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0])
    hnsw, _ = faiss_index.build_index(vecs, np.arange(3000), "HNSW16")
    assert not subset_index.supports(hnsw) and not subset_index.supports(faiss.IndexFlatIP(32))


def test_a_filter_far_from_the_query_is_searched_until_its_rows_are_reached(home: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Through a bitmap (the filter searched once, no index of its own), IVF probes the lists
    nearest the query until they hold enough allowed rows: a filter whose rows all lie away
    from the query (another modality) still gets its true nearest rows."""
    from caselens.indexes import reader
    from caselens.indexes.index_choice import ChoiceConfig

    monkeypatch.setattr(reader, "SUBSET_AT_ONCE", 0)
    rng = np.random.default_rng(11)
    dim, n = 16, 800
    centers = np.eye(dim, dtype=np.float32)[[0, 1]]
    side = rng.integers(0, 2, n)
    vecs = centers[side] + rng.normal(scale=0.35, size=(n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    record = {"spec": "test:vectors", "dim": dim, "modalities": ["image"], "fingerprint": "f" * 16, "options": {}}
    coll = Collection.create("far", record, home)
    coll.add([{"id": f"v{i}", "kind": "image", "source": "s", "metadata": {"modality": "CT" if side[i] else "DX"}}
              for i in range(n)], vecs)
    derived.refresh(coll, config=ChoiceConfig(factories=("IVF16,Flat",), exact_below=0, target_recall=0.0,
                                              n_queries=50))
    ct = np.flatnonzero(side == 1)
    for q in vecs[side == 0][:5]:
        want = [f"v{ct[j]}" for j in np.argsort(-(vecs[ct] @ q), kind="stable")[:5]]
        got = search_vector(coll, q, k=5, where="modality = 'CT'")
        assert [h.id for h in got.hits] == want

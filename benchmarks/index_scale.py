"""The index layer at scale: automatic index choice, caselens overhead, filters, updates, peers.

What it measures
----------------
On ``--n`` synthetic *clustered* unit vectors (a Gaussian mixture of ``--clusters`` components
with unequal sizes and spreads, float32, fixed seed) and on real image embeddings of the shared
images (``classic`` encoder over ``../shared/data/images/*``), all in one run:

1. **build**: the vectors go into a caselens collection (LanceDB table, a numeric ``bucket``
   column 0…999 for filters), then ``Collection.build_index(config=ChoiceConfig(...))`` chooses
   and builds the index by measured recall (``--target-recall``, ``--max-memory``). Reported:
   the choice, its recall on the held-out sample, build time, bytes per vector, index size.
2. **caselens vs raw FAISS**, same index file and parameters, ``--queries`` held-out queries
   (fresh draws from the mixture, not in the collection): batch QPS (caselens: ``Collection.index``
   + ``search_index`` + one metadata join for all hits; raw: ``index.search``) and single-query
   p50/p99 (caselens: ``search_vector``, i.e. freshness check, search, id and metadata join;
   raw: ``index.search`` of one vector; same k, parameters and FAISS threads, interleaved, each
   query searched once per way), overhead in percent, recall@10 against exact search, and where
   the extra time of a caselens query goes.
3. **filtered search** at selectivities 0.1 %, 1 %, 10 %, 50 % (``bucket < t``): recall@10
   against exact search over the filtered set, p50/p99 latency (``search_vector(where=...)``).
4. **updates**: add ``--updates`` new items and delete as many (timed, including the index
   update), check that no rebuild happened (same training), recall after, added items find
   themselves, deleted ones never come back.
5. **peers** on the same vectors and queries: LanceDB's IVF_PQ index (``nprobes`` and
   ``refine_factor`` raised until recall@10 >= the target or the grid ends) and LangChain's FAISS
   vector store (``langchain-community``; exact ``IndexFlatIP``): build time, recall@10, p50/p99.

Results go to ``benchmarks/results/index_scale.json`` (``--out``), with machine info.

Rerun
-----
From the repository root (langchain-community and langchain-core installed into the venv for
the peer only; they are not caselens dependencies)::

    .venv/bin/python benchmarks/index_scale.py --n 20000 --queries 200            # minutes
    .venv/bin/python benchmarks/index_scale.py --n 1000000 --dim 512              # the full run
    .venv/bin/python benchmarks/index_scale.py --n 1000000 --skip real langchain  # parts only
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

os.environ.setdefault("LANCE_LOG", "error")
ROOT = Path(__file__).resolve().parents[1]
SELECTIVITIES = (0.001, 0.01, 0.1, 0.5)
_PARTIAL: dict[str, Any] = {}  # the result so far, written after every stage


def save() -> None:
    """Write the result so far (a long run that is stopped still leaves its numbers)."""
    if _PARTIAL.get("out"):
        Path(_PARTIAL["out"]).parent.mkdir(parents=True, exist_ok=True)
        Path(_PARTIAL["out"]).write_text(json.dumps(_PARTIAL["result"], indent=2, default=str))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -------------------------------------------------------------------- data
def mixture(n: int, dim: int, clusters: int, seed: int, centers: np.ndarray | None = None,
            spreads: np.ndarray | None = None, weights: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``n`` unit vectors from a Gaussian mixture (unequal cluster sizes and spreads)."""
    rng = np.random.default_rng(seed)
    if centers is None:
        crng = np.random.default_rng(12345)
        centers = crng.standard_normal((clusters, dim), dtype=np.float32)
        centers /= np.linalg.norm(centers, axis=1, keepdims=True)
        spreads = crng.uniform(0.6, 1.2, clusters).astype(np.float32) / np.sqrt(dim)
        weights = crng.pareto(1.5, clusters) + 1
        weights /= weights.sum()
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        lab = rng.choice(len(centers), m, p=weights)
        block = rng.standard_normal((m, dim), dtype=np.float32)
        block *= spreads[lab, None]
        block += centers[lab]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:start + m] = block
    return out, centers, spreads, weights


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int, ids: np.ndarray | None = None) -> np.ndarray:
    import faiss

    if len(base) == 0:
        return np.full((len(queries), k), -1, np.int64)
    _, found = faiss.knn(np.ascontiguousarray(queries), np.ascontiguousarray(base), min(k, len(base)),
                         metric=faiss.METRIC_INNER_PRODUCT)
    return found if ids is None else np.where(found >= 0, ids[np.maximum(found, 0)], -1)


def recall(found: list[list[int]] | np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    vals = []
    for got, want in zip(found, truth):
        want = {int(x) for x in want[:k] if x >= 0}
        if want:
            vals.append(len(want.intersection(int(x) for x in list(got)[:k])) / len(want))
    return float(np.mean(vals)) if vals else 1.0


def timed(fn: Callable[[Any], Any], items: Any) -> tuple[list[Any], float, float]:
    out, times = [], []
    for it in items:
        t = time.perf_counter()
        out.append(fn(it))
        times.append((time.perf_counter() - t) * 1000)
    return out, float(np.percentile(times, 50)), float(np.percentile(times, 99))


# ---------------------------------------------------------------- caselens
def make_collection(home: Path, name: str, vectors: np.ndarray, bucket: np.ndarray):
    from caselens.indexes.collection import Collection

    record = {"spec": "bench:vectors", "dim": int(vectors.shape[1]), "modalities": ["image"],
              "fingerprint": "b" * 16, "options": {}}
    coll = Collection.create(name, record, home)
    batch = 100_000
    for start in range(0, len(vectors), batch):
        stop = min(len(vectors), start + batch)
        coll.add([{"id": f"x{i}", "kind": "image", "source": f"s{i}", "metadata": {"bucket": float(bucket[i])}}
                  for i in range(start, stop)], vectors[start:stop])
        log(f"  table: {stop:,}/{len(vectors):,} rows")
    coll.compact()
    return coll


def caselens_suite(coll, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray, bucket: np.ndarray,
                   args: argparse.Namespace, k: int = 10) -> dict[str, Any]:
    import faiss

    from caselens.indexes import faiss_index
    from caselens.indexes.index_choice import ChoiceConfig, parse_memory
    from caselens.retrieval.search import search_vector

    out: dict[str, Any] = {}
    config = ChoiceConfig(target_recall=args.target_recall,
                          max_memory=parse_memory(args.max_memory) if args.max_memory else None)
    t = time.perf_counter()
    stamp = faiss_index.read_stamp(coll.index_dir)
    if stamp is None or stamp.table_version != coll.version or stamp.choice.get("config") != config.to_dict():
        stamp = coll.build_index(config=config, progress=False)
        build = time.perf_counter() - t
    else:
        log("  reusing the index in --work")
        build = float(stamp.choice.get("total_seconds", 0))
    size = (coll.index_dir / faiss_index.INDEX_FILE).stat().st_size
    out["index"] = {"factory": stamp.factory, "params": stamp.params, "choice": stamp.choice,
                    "build_seconds_total": round(build, 2), "index_file_bytes": size,
                    "bytes_per_vector": round(size / len(vectors), 1),
                    "max_memory_bytes": config.max_memory,
                    "within_budget": config.max_memory is None or size <= config.max_memory}
    log(f"  chose {stamp.factory} {stamp.params}: recall {stamp.choice.get('recall')} in {build:.0f} s, "
        f"{size / len(vectors):.0f} B/vector")

    # caselens vs raw FAISS on the same index file and parameters
    index, stamp = coll.index()
    # Raw FAISS searches the very index object caselens serves (read from the same file): a second
    # copy would sit elsewhere in memory and compete for the same caches, which shifts p50 by as
    # much as the overhead being measured.
    raw = index
    raw_params = faiss_index.search_params(raw, stamp.params, None)  # made once, as a raw user would
    nq = len(queries)
    raw.search(queries, k, params=raw_params) if raw_params else raw.search(queries, k)  # warm, like caselens' 2nd run
    t = time.perf_counter()
    _, raw_ids = raw.search(queries, k, params=raw_params) if raw_params else raw.search(queries, k)
    raw_batch = time.perf_counter() - t
    def caselens_batch() -> tuple[list[list[str]], np.ndarray]:
        idx, st = coll.index()
        _, rows = faiss_index.search_index(idx, queries, k, params=st.params, deleted=st.deleted)
        meta = coll.rows_by_row_ids(np.unique(rows[rows >= 0]).tolist())
        return [[meta[r]["id"] for r in row if r in meta] for row in rows], rows

    t = time.perf_counter()
    cl_batch_ids, _ = caselens_batch()  # cold: loads the join cache of this table version
    cl_cold = time.perf_counter() - t
    t = time.perf_counter()
    cl_batch_ids, _ = caselens_batch()
    cl_batch = time.perf_counter() - t
    n_single = min(args.single, nq)
    # One query at a time, the three ways interleaved so that load from other processes on the
    # machine hits all three alike. Each way searches every one of the n_single queries once, at
    # offsets of n_single/3, and the order of the ways rotates: no way searches lists that
    # another way just brought into the CPU caches for the same query.
    t_raw, t_idx, t_cl, results = [], [], [0.0] * n_single, [None] * n_single
    shift = max(1, n_single // 3)

    def one_raw(i: int) -> None:
        q = queries[i]
        t = time.perf_counter()
        raw.search(q[None], k, params=raw_params) if raw_params else raw.search(q[None], k)
        t_raw.append((time.perf_counter() - t) * 1000)

    def one_idx(i: int) -> None:
        q = queries[(i + shift) % n_single]
        t = time.perf_counter()
        faiss_index.search_index(index, q[None], k, params=stamp.params)
        t_idx.append((time.perf_counter() - t) * 1000)

    def one_cl(i: int) -> None:
        j = (i + 2 * shift) % n_single
        t = time.perf_counter()
        results[j] = search_vector(coll, queries[j], k)
        t_cl[j] = (time.perf_counter() - t) * 1000

    ways = [one_raw, one_idx, one_cl]
    for i in range(n_single):
        for w in range(3):
            ways[(i + w) % 3](i)
    pct = lambda xs, p: float(np.percentile(xs, p))  # noqa: E731
    raw_p50, raw_p99, raw_ids_p50, raw_ids_p99 = pct(t_raw, 50), pct(t_raw, 99), pct(t_idx, 50), pct(t_idx, 99)
    cl_p50, cl_p99 = pct(t_cl, 50), pct(t_cl, 99)
    found = [[int(h.id[1:]) for h in r.hits] for r in results]
    out["search"] = {
        "queries": nq, "single_queries": n_single, "k": k, "params": stamp.params,
        "faiss_omp_threads": faiss.omp_get_max_threads(),
        "raw_faiss": {"batch_qps": round(nq / raw_batch, 1), "p50_ms": round(raw_p50, 3), "p99_ms": round(raw_p99, 3),
                      "recall@10": round(recall(raw_ids, truth), 4),
                      "note": "index.search on the same loaded index, same k, nprobe/efSearch and FAISS threads"},
        "caselens_index_only": {"p50_ms": round(raw_ids_p50, 3), "p99_ms": round(raw_ids_p99, 3),
                                "note": "faiss_index.search_index on the loaded index, no freshness check, no join"},
        "caselens": {"batch_qps": round(nq / cl_batch, 1), "batch_qps_cold": round(nq / cl_cold, 1), "p50_ms": round(cl_p50, 3), "p99_ms": round(cl_p99, 3),
                     "recall@10": round(recall(found, truth[:n_single]), 4),
                     "batch_recall@10": round(recall([[int(i[1:]) for i in r] for r in cl_batch_ids], truth), 4),
                     "note": "search_vector: freshness check, index search, ids and metadata joined from the table"},
    }
    s = out["search"]
    s["overhead_batch_qps_pct"] = round(100 * (1 - s["caselens"]["batch_qps"] / s["raw_faiss"]["batch_qps"]), 1)
    s["overhead_p50_pct"] = round(100 * (s["caselens"]["p50_ms"] / s["raw_faiss"]["p50_ms"] - 1), 1)
    log(f"  search: raw {s['raw_faiss']}, caselens {s['caselens']}")

    # Where the single-query time goes: search_vector's steps (without its argument checks and
    # result object) timed one by one, each query right after a raw FAISS search of another
    # query, so that they run with caches as cold as in a real search (timed in a tight loop of
    # its own, a step looks cheaper than it is in a search).
    from caselens.retrieval.search import hits_for_rows

    steps: dict[str, list[float]] = {"freshness_check_ms": [], "index_search_ms": [], "join_ms": [],
                                     "steps_total_ms": [], "lancedb_version_call_ms": []}
    for i in range(n_single):
        other = queries[(i + 1) % n_single]
        raw.search(other[None], k, params=raw_params) if raw_params else raw.search(other[None], k)
        t0 = time.perf_counter()
        idx, st = coll.index()  # table version (file-system probe) + the served index
        t1 = time.perf_counter()
        scores, ids = faiss_index.search_index(idx, queries[i][None], k, params=st.params, deleted=st.deleted)
        t2 = time.perf_counter()
        hits_for_rows(coll, [(sc, r) for sc, r in zip(scores[0].tolist(), ids[0].tolist()) if r >= 0])
        t3 = time.perf_counter()
        for name, dt in zip(list(steps)[:4], (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
            steps[name].append(dt * 1000)
        raw.search(other[None], k, params=raw_params) if raw_params else raw.search(other[None], k)
        t0 = time.perf_counter()
        _ = coll.version  # what the freshness check avoids: LanceDB checkout + version
        steps["lancedb_version_call_ms"].append((time.perf_counter() - t0) * 1000)
    coll.index()
    s["breakdown_p50"] = {name: round(pct(v, 50), 3) for name, v in steps.items()}
    s["breakdown_p50"]["note"] = (
        "search_vector's steps, each query timed right after a FAISS search of another query: freshness "
        "check (table version from a stat() of the next Lance manifest, LanceDB asked only when it exists; "
        "served index), FAISS search, join (ids, metadata and provenance from the in-memory table copy "
        "into Hits). lancedb_version_call_ms: the LanceDB round trip the freshness check avoids")

    # filtered search
    filt = {}
    for sel in (() if "filters" in args.skip else SELECTIVITIES):
        thr = int(round(sel * 1000))
        mask = bucket < thr
        allowed = np.flatnonzero(mask)
        ftruth = exact_topk(vectors[allowed], queries[:args.filter_queries], k, allowed)
        res, p50, p99 = timed(lambda q: search_vector(coll, q, k, where=f"bucket < {thr}"), queries[:args.filter_queries])
        got = [[int(h.id[1:]) for h in r.hits] for r in res]
        ok = all(bucket[i] < thr for row in got for i in row)
        filt[f"{sel:.1%}"] = {"where": f"bucket < {thr}", "candidates": int(mask.sum()),
                              "recall@10": round(recall(got, ftruth), 4), "p50_ms": round(p50, 2),
                              "p99_ms": round(p99, 2), "all_hits_match_filter": ok}
        log(f"  filter {sel:.1%}: {filt[f'{sel:.1%}']}")
    out["filtered"] = filt
    return out


def updates_suite(coll, vectors: np.ndarray, queries: np.ndarray, mix: tuple, args: argparse.Namespace,
                  k: int = 10) -> dict[str, Any]:
    from caselens.indexes import faiss_index
    from caselens.retrieval.search import search_vector

    from caselens.indexes.collection import Collection

    n_up = min(args.updates, len(vectors) // 10)
    copy = coll.root.parent / f"{coll.name}-updates"  # the original stays as built, for --work reruns
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(coll.root, copy)
    coll = Collection.open(copy.name, copy.parent)
    before = faiss_index.read_stamp(coll.index_dir)
    new, *_ = mixture(n_up, vectors.shape[1], 0, args.seed + 99, *mix)
    base = len(vectors)
    t = time.perf_counter()
    coll.add([{"id": f"x{base + i}", "kind": "image", "source": "added", "metadata": {"bucket": 1000.0}}
              for i in range(n_up)], new)
    t_table = time.perf_counter() - t
    stamp = coll.update_index()
    t_add = time.perf_counter() - t
    rng = np.random.default_rng(args.seed + 5)
    gone = rng.choice(base, n_up, replace=False)
    t = time.perf_counter()
    coll.delete([f"x{i}" for i in gone])
    t_del = time.perf_counter() - t
    stamp = faiss_index.read_stamp(coll.index_dir)
    alive = np.ones(base + n_up, bool)
    alive[gone] = False
    allv = np.concatenate([vectors, new])
    ids = np.flatnonzero(alive)
    nq = min(len(queries), args.filter_queries)
    truth = exact_topk(allv[alive], queries[:nq], k, ids)
    res, p50, p99 = timed(lambda q: search_vector(coll, q, k), queries[:nq])
    got = [[int(h.id[1:]) for h in r.hits] for r in res]
    dead = set(gone.tolist())
    resurfaced = sum(1 for row in got for i in row if i in dead)
    self_found = sum(1 for i in range(min(100, n_up))
                     if search_vector(coll, new[i], 1).hits[0].id == f"x{base + i}")
    out = {"added": n_up, "deleted": n_up, "add_seconds_total": round(t_add, 2),
           "add_seconds_table": round(t_table, 2), "delete_seconds_total": round(t_del, 2),
           "rebuilt": stamp.trained_on != before.trained_on or stamp.choice.get("total_seconds") != before.choice.get("total_seconds"),
           "added_since_build": stamp.added_since_build, "removed_since_build": stamp.removed_since_build,
           "tombstones": len(stamp.deleted), "recall@10_after": round(recall(got, truth), 4),
           "p50_ms_after": round(p50, 3), "p99_ms_after": round(p99, 3),
           "deleted_in_results": resurfaced, "added_find_themselves": f"{self_found}/{min(100, n_up)}"}
    log(f"  updates: {out}")
    return out


# ------------------------------------------------------------------- peers
def lancedb_suite(work: Path, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray,
                  args: argparse.Namespace, lists: int, k: int = 10) -> dict[str, Any]:
    import lancedb
    import pyarrow as pa

    db = lancedb.connect(str(work / "lancedb-peer"))
    dim = vectors.shape[1]
    t = time.perf_counter()
    first = True
    for start in range(0, len(vectors), 200_000):
        part = vectors[start:start + 200_000]
        tbl = pa.table({"id": pa.array(np.arange(start, start + len(part))),
                        "vector": pa.FixedSizeListArray.from_arrays(pa.array(part.reshape(-1)), dim)})
        if first:
            table = db.create_table("vectors", tbl, mode="overwrite")
            first = False
        else:
            table.add(tbl)
    t_write = time.perf_counter() - t
    t = time.perf_counter()
    table.create_index(metric="dot", index_type="IVF_PQ", vector_column_name="vector")  # LanceDB's defaults
    t_index = time.perf_counter() - t
    out: dict[str, Any] = {"write_seconds": round(t_write, 2), "index_seconds": round(t_index, 2),
                           "index": "IVF_PQ, LanceDB default partitions and sub-vectors", "settings": []}
    lists = 10_000
    nq = min(len(queries), args.single)

    def run(nprobes: int, refine: int | None) -> tuple[float, float, float]:
        def one(q: np.ndarray) -> list[int]:
            query = table.search(q, vector_column_name="vector").metric("dot").nprobes(nprobes).limit(k).select(["id", "_distance"])
            if refine:
                query = query.refine_factor(refine)
            return query.to_arrow().column("id").to_pylist()
        got, p50, p99 = timed(one, queries[:nq])
        return recall(got, truth[:nq]), p50, p99

    chosen = None
    for nprobes, refine in ((20, None), (20, 10), (50, 10), (50, 30), (100, 50), (100, 100), (200, 200)):
        r, p50, p99 = run(min(nprobes, lists), refine)
        row = {"nprobes": min(nprobes, lists), "refine_factor": refine, "recall@10": round(r, 4),
               "p50_ms": round(p50, 2), "p99_ms": round(p99, 2)}
        out["settings"].append(row)
        log(f"  lancedb {row}")
        if r >= args.target_recall:
            chosen = row
            break
    out["at_target"] = chosen
    del table, db
    shutil.rmtree(work / "lancedb-peer", ignore_errors=True)
    return out


def langchain_suite(vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray, args: argparse.Namespace,
                    k: int = 10) -> dict[str, Any]:
    try:
        from langchain_community.vectorstores import FAISS
        from langchain_community.vectorstores.utils import DistanceStrategy
        from langchain_core.embeddings import Embeddings
    except ImportError as exc:
        return {"skipped": f"langchain-community not installed ({exc})"}

    class Fixed(Embeddings):  # queries arrive as vectors; nothing is embedded here
        def embed_documents(self, texts: list[str]) -> list[list[float]]:
            raise NotImplementedError

        def embed_query(self, text: str) -> list[float]:
            raise NotImplementedError

    t = time.perf_counter()
    store = FAISS.from_embeddings(((f"x{i}", vectors[i]) for i in range(len(vectors))), Fixed(),
                                  metadatas=[{"bucket": 0} for _ in range(len(vectors))],
                                  ids=[f"x{i}" for i in range(len(vectors))],
                                  distance_strategy=DistanceStrategy.MAX_INNER_PRODUCT)
    build = time.perf_counter() - t
    nq = min(len(queries), args.peer_queries)
    got, p50, p99 = timed(lambda q: [int(d.page_content[1:]) for d, _ in
                                     store.similarity_search_with_score_by_vector(q.tolist(), k=k)], queries[:nq])
    out = {"build_seconds": round(build, 2), "index": type(store.index).__name__, "queries": nq,
           "recall@10": round(recall(got, truth[:nq]), 4), "p50_ms": round(p50, 2), "p99_ms": round(p99, 2),
           "note": "LangChain's FAISS store builds an exact flat index; it offers no ANN index choice"}
    log(f"  langchain {out}")
    del store
    gc.collect()
    return out


# -------------------------------------------------------------------- runs
def synthetic(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from caselens.indexes import faiss_index

    k = 10
    log(f"synthetic: {args.n:,} x {args.dim} from a {args.clusters}-component Gaussian mixture")
    vectors, *mix = mixture(args.n, args.dim, args.clusters, args.seed)
    queries, *_ = mixture(args.queries, args.dim, 0, args.seed + 1, *mix)
    bucket = np.random.default_rng(args.seed + 2).integers(0, 1000, args.n)
    t = time.perf_counter()
    truth = exact_topk(vectors, queries, k)
    log(f"  exact ground truth in {time.perf_counter() - t:.0f} s")
    out: dict[str, Any] = {"n": args.n, "dim": args.dim, "clusters": args.clusters, "queries": args.queries}
    _PARTIAL["result"]["synthetic"] = out
    if "caselens" not in args.skip:
        from caselens.indexes.collection import Collection

        t = time.perf_counter()
        if Collection.exists("synthetic", work / "home"):  # a --work folder from an earlier run
            coll = Collection.open("synthetic", work / "home")
            if coll.count() != args.n:
                raise SystemExit(f"{work} holds another collection ({coll.count()} rows); use a new --work")
            log("  reusing the table in --work")
        else:
            coll = make_collection(work / "home", "synthetic", vectors, bucket)
        out["table_write_seconds"] = round(time.perf_counter() - t, 2)
        out["caselens"] = caselens_suite(coll, vectors, queries, truth, bucket, args)
        save()
        if "updates" not in args.skip:
            out["updates"] = updates_suite(coll, vectors, queries, tuple(mix), args)
            save()
        lists = faiss_index.factory_lists(out["caselens"]["index"]["factory"]) or 256
        del coll
        faiss_index._CACHE.drop(work / "home" / "synthetic" / "faiss")
        gc.collect()
    else:
        from caselens.indexes.index_choice import default_lists
        lists = default_lists(args.n)
    if "lancedb" not in args.skip:
        out["lancedb_ivf_pq"] = lancedb_suite(work, vectors, queries, truth, args, lists)
        save()
    if "langchain" not in args.skip:
        out["langchain_faiss"] = langchain_suite(vectors, queries, truth, args)
    return out


def real(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from caselens.indexes.collection import Collection
    from caselens.ingest.pipeline import IngestConfig, ingest
    from caselens.ingest.sources import ImageSource
    from caselens.ingest.encoders import load_encoder

    root = Path(args.data_root) / "images"
    if not root.is_dir():
        return {"skipped": f"{root} is absent"}
    enc = load_encoder("classic")
    coll = Collection.create("real", enc.info.to_record(), work / "home")
    t = time.perf_counter()
    sets = []
    for manifest in sorted(root.glob("*/manifest.csv")):
        ingest(ImageSource(manifest=manifest, secret=coll.secret()), coll, enc, IngestConfig(build_index=False, progress=False))
        sets.append(manifest.parent.name)
    log(f"real: ingested {coll.count()} images of {sets} in {time.perf_counter() - t:.0f} s")
    rows, vectors = coll.vectors()
    order = np.argsort(rows)
    rows, vectors = rows[order], vectors[order]
    id_to_row = {r["id"]: r["_row"] for r in coll.rows(columns=["_row", "id"]).to_pylist()}
    rng = np.random.default_rng(args.seed)
    qpos = rng.choice(len(rows), min(500, len(rows)), replace=False)
    queries = vectors[qpos]
    full = exact_topk(vectors, queries, 11, rows)
    truth = np.array([[r for r in row if r != rows[p]][:10] for row, p in zip(full, qpos)])
    stamp = coll.build_index(rebuild=True)
    from caselens.retrieval.search import search_vector

    res, p50, p99 = timed(lambda q: search_vector(coll, q, 11), queries)
    got = [[id_to_row[h.id] for h in x.hits if id_to_row[h.id] != rows[p]][:10] for x, p in zip(res, qpos)]
    out = {"sets": sets, "n": int(len(rows)), "dim": int(coll.dim), "encoder": enc.info.spec,
           "index": {"factory": stamp.factory, "params": stamp.params, "choice_recall": stamp.choice.get("recall"),
                     "bytes_per_vector": stamp.choice.get("bytes_per_vector")},
           "caselens": {"recall@10": round(recall(got, truth), 4), "p50_ms": round(p50, 3), "p99_ms": round(p99, 3)}}
    log(f"  real caselens: {out['caselens']} ({stamp.factory})")
    # peers on the same vectors: leave-one-out truth is in _row space; map positions
    pos_truth = np.searchsorted(rows, truth)
    if "lancedb" not in args.skip:
        from caselens.indexes.index_choice import default_lists

        lists = max(8, default_lists(len(rows)) // 4)
        res_l = lancedb_suite(work, vectors, queries, _with_self(pos_truth, qpos), args, lists, k=11)
        out["lancedb_ivf_pq"] = res_l
    if "langchain" not in args.skip:
        out["langchain_faiss"] = langchain_suite(vectors, queries, _with_self(pos_truth, qpos), args, k=11)
    return out


def _with_self(truth: np.ndarray, qpos: np.ndarray) -> np.ndarray:
    """Truth lists with the query's own position first (peers return it; recall over k=11)."""
    return np.concatenate([qpos[:, None], truth], axis=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="synthetic vectors (default 1,000,000)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=2000, help="mixture components")
    p.add_argument("--queries", type=int, default=1000, help="held-out queries for recall and batch QPS")
    p.add_argument("--single", type=int, default=500, help="queries timed one by one")
    p.add_argument("--filter-queries", type=int, default=200, help="queries per filter selectivity")
    p.add_argument("--peer-queries", type=int, default=100, help="queries for the LangChain flat store")
    p.add_argument("--updates", type=int, default=10_000, help="items added and deleted after the build")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--max-memory", default="1GB", help="memory budget of the index (default 1GB)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", nargs="*", default=[], choices=["synthetic", "real", "caselens", "filters", "updates",
                                                             "lancedb", "langchain"])
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--work", help="scratch folder (default: a temporary one, removed afterwards)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "index_scale.json"))
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format="[%(asctime)s] %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("caselens.indexes.index_choice").setLevel(logging.INFO)  # candidates tried, and why
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="caselens-index-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    import faiss

    result: dict[str, Any] = {
        "benchmark": "index_scale", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, "benchmarks/index_scale.py", *(argv or sys.argv[1:])]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "faiss": faiss.__version__, "gpus": faiss.get_num_gpus()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("work", "out")},
    }
    _PARTIAL.update(out=args.out, result=result)
    try:
        if "synthetic" not in args.skip:
            result["synthetic"] = synthetic(args, work)
        if "real" not in args.skip:
            result["real"] = real(args, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

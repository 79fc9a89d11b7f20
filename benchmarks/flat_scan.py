"""Exact (flat) search: single queries with one OpenMP thread against FAISS's default, as a share
of the machine's measured memory read bandwidth.

What it measures
----------------
For each size in ``--sizes`` (default 100k, 300k and 1M vectors of ``--dim`` 512, random unit
vectors in an ``IndexIDMap2(IndexFlatIP)``, the index caselens builds for exact search):

* **read bandwidth**: numpy summing the index's own vector memory (a view, no copy), one
  thread, and two halves summed by two threads at once (numpy releases the GIL), best of
  ``--repeats``, in GB/s;
* **single queries** (k=10): ``faiss_index.search_index`` (caselens' thread choice: one thread
  for a single query on a flat index) and ``index.search`` with 1 thread and with FAISS's default
  (all cores), the three alternated query by query so that load changes hit all of them alike;
  p50/p90/mean ms, and the scan's rate (vector bytes / p50 time) as a share of the one-thread
  and all-thread read bandwidth;
* **batches** of ``--batch`` queries: the same three ways (a batch keeps all threads).

Timings on a shared machine vary with other work: the load average is recorded at start and
end, and the ratios (threads vs threads, scan vs bandwidth) are measured in the same run.

Rerun
-----
    nice -n 10 .venv/bin/python benchmarks/flat_scan.py            # ~3 min, ~2.5 GB of memory at 1M
    .venv/bin/python benchmarks/flat_scan.py --sizes 20000 --queries 20   # a quick look

Writes ``benchmarks/results/flat_scan.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from caselens.indexes import faiss_index

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "flat_scan.json"


def flat_index(n: int, dim: int, seed: int = 0) -> faiss.Index:
    """``n`` random unit vectors in the index type caselens uses for exact search (added in blocks)."""
    rng = np.random.default_rng(seed)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    for start in range(0, n, 65_536):
        m = min(65_536, n - start)
        block = rng.standard_normal((m, dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        index.add_with_ids(block, np.arange(start, start + m, dtype=np.int64))
    return index


def vector_memory(index: faiss.Index) -> np.ndarray:
    """The flat index's vectors as a numpy view (no copy)."""
    flat = faiss.downcast_index(index.index)
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d)


def read_bandwidth(data: np.ndarray, repeats: int) -> dict[str, float]:
    """GB/s reading ``data``: one thread summing it, and two threads summing a half each."""
    one, two = [], []
    halves = np.array_split(data, 2)
    with ThreadPoolExecutor(2) as pool:
        for _ in range(repeats):
            t = time.perf_counter()
            float(data.sum(dtype=np.float32))
            one.append(time.perf_counter() - t)
            t = time.perf_counter()
            list(pool.map(lambda h: float(h.sum(dtype=np.float32)), halves))
            two.append(time.perf_counter() - t)
    gb = data.nbytes / 1e9
    return {"one_thread_gb_s": round(gb / min(one), 2), "two_threads_gb_s": round(gb / min(two), 2),
            "bytes": int(data.nbytes), "repeats": repeats}


def _stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p90_ms": round(float(np.percentile(a, 90)), 3),
            "mean_ms": round(float(a.mean()), 3), "n": len(ms)}


def time_ways(index: faiss.Index, queries: np.ndarray, k: int, batch: int) -> dict[str, dict[str, float]]:
    """ms per call for caselens' choice, 1 thread and the default, alternated call by call."""
    default = faiss.omp_get_max_threads()

    def raw(threads: int):
        def run(q: np.ndarray) -> None:
            with faiss_index.omp_threads(threads):
                index.search(q, k)
        return run

    ways = {"caselens": lambda q: faiss_index.search_index(index, q, k), "one_thread": raw(1),
            f"default_{default}_threads": raw(default)}
    calls = [queries[i:i + 1] for i in range(len(queries))] if batch == 1 else \
        [queries[i:i + batch] for i in range(0, len(queries) - batch + 1, batch)]
    for run in ways.values():  # warm-up: pages touched, thread pools started
        run(calls[0])
    ms: dict[str, list[float]] = {name: [] for name in ways}
    for q in calls:
        for name, run in ways.items():
            t = time.perf_counter()
            run(q)
            ms[name].append((time.perf_counter() - t) * 1000)
    return {name: _stats(v) for name, v in ms.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="100000,300000,1000000")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=40, help="single queries per size")
    p.add_argument("--batch", type=int, default=64, help="queries per batch (batches: 4 per size)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5, help="bandwidth measurements (best kept)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    result: dict[str, Any] = {
        "benchmark": "flat_scan", "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "cpus": os.cpu_count(),
                    "faiss": faiss.__version__, "faiss_default_threads": faiss.omp_get_max_threads(),
                    "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
        "dim": args.dim, "k": args.k, "sizes": {}}
    rng = np.random.default_rng(1)
    for n in [int(x) for x in args.sizes.split(",")]:
        index = flat_index(n, args.dim)
        bandwidth = read_bandwidth(vector_memory(index), args.repeats)
        queries = rng.standard_normal((max(args.queries, 4 * args.batch), args.dim), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        single = time_ways(index, queries[:args.queries], args.k, 1)
        batched = time_ways(index, queries[:4 * args.batch], args.k, args.batch)
        scanned = n * args.dim * 4 / 1e9  # GB read by one exact query
        share = {name: {"scan_gb_s": round(scanned / (s["p50_ms"] / 1000), 2),
                        "share_of_one_thread_bandwidth": round(scanned / (s["p50_ms"] / 1000) / bandwidth["one_thread_gb_s"], 3),
                        "share_of_two_thread_bandwidth": round(scanned / (s["p50_ms"] / 1000) / bandwidth["two_threads_gb_s"], 3)}
                 for name, s in single.items()}
        default_name = next(name for name in single if name.startswith("default"))
        result["sizes"][str(n)] = {
            "read_bandwidth": bandwidth, "single_query": single, "single_query_bandwidth": share,
            "single_query_speedup_caselens_vs_default": round(single[default_name]["p50_ms"] / single["caselens"]["p50_ms"], 2),
            f"batch_{args.batch}": batched,
            "batch_ms_per_query_caselens": round(batched["caselens"]["p50_ms"] / args.batch, 3)}
        print(json.dumps({"n": n, "bandwidth": bandwidth, "single_p50_ms": {k: v["p50_ms"] for k, v in single.items()},
                          "share": {k: v["share_of_one_thread_bandwidth"] for k, v in share.items()},
                          "batch_p50_ms": {k: v["p50_ms"] for k, v in batched.items()}}), flush=True)
        del index
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

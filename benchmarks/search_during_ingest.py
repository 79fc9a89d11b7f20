"""Search latency while an ingest runs in another process: readers never wait for writers.

Builds a collection of ``--n`` synthetic images (classic encoder), measures search p50/p99 idle,
then starts ``caselens ingest`` of ``--n`` more images in a second process and searches without
pause until it finishes. Each search during the ingest also checks freshness: every row
committed before the search began must be searchable (the snapshot's version is at least the
table version read just before the search). Target (issue 9): p99 during the ingest <= 3x idle,
and no search slower than 1 s.

Each search's CPU time (its thread's) is recorded beside its wall time: on a machine whose cores
the ingest keeps busy, a search can wait for a core without waiting for anything of caselens';
the CPU time shows the work a search does. ``--ingest-nice`` runs the ingest at a lower priority
(as a bulk job beside a search service would run), ``--rate`` paces the searches (queries per
second; 0: back to back, which keeps one core busy with searching alone).

    python benchmarks/search_during_ingest.py --work /tmp/sdi --n 4000
    python benchmarks/search_during_ingest.py --work /tmp/sdi --n 4000 --ingest-nice 10 --rate 100
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from harness import log, percentiles, write_result

import caselens


def make_images(folder: Path, n: int, seed: int) -> Path:
    """``n`` varied 64x64 images in 8 classes with a manifest (label, patient_id)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = ["path,label,patient_id"]
    yy, xx = np.mgrid[:64, :64]
    for i in range(n):
        c = int(rng.integers(8))
        freq = 2 + c + rng.random()
        base = np.sin(xx / freq + rng.random() * 6) * np.cos(yy / (9 - c) + rng.random() * 6)
        img = ((base + 1) * 100 + rng.normal(0, 12 + 3 * c, (64, 64))).clip(0, 255).astype(np.uint8)
        name = f"img_{seed}_{i:05d}.png"
        Image.fromarray(img, "L").save(folder / name)
        rows.append(f"{name},class{c},P{seed}_{i // 4}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


def run_searches(col: caselens.Collection, queries: np.ndarray, until=None, n: int | None = None,
                 check_fresh: bool = False, rate: float = 0.0,
                 cpu: list[float] | None = None) -> tuple[list[float], list[int], int]:
    """Search without pause (``n`` queries, or until ``until()`` is true); returns latencies (ms),
    the table versions searched, and how many searches missed a row committed before they began.
    A search that meets a new table version builds its snapshot (the rows added since are read)."""
    times, versions, stale = [], [], 0
    i = 0
    next_at = time.perf_counter()
    while (n is not None and i < n) or (until is not None and not until()):
        if rate > 0:
            next_at += 1.0 / rate
            time.sleep(max(0.0, next_at - time.perf_counter()))
        q = queries[i % len(queries)]
        before = col.storage.version if check_fresh else 0
        c0, t0 = time.thread_time(), time.perf_counter()
        result = col.search(vector=q, k=10)
        times.append((time.perf_counter() - t0) * 1000)
        if cpu is not None:
            cpu.append((time.thread_time() - c0) * 1000)
        versions.append(result.table_version)
        if check_fresh and result.table_version < before:
            stale += 1
        i += 1
    return times, versions, stale


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/caselens-sdi", help="scratch folder (images, home)")
    p.add_argument("--n", type=int, default=4000, help="images in the collection, and again in the ingest")
    p.add_argument("--idle-queries", type=int, default=500)
    p.add_argument("--ingest-nice", type=int, default=0, help="run the ingest at this lower priority (nice)")
    p.add_argument("--rate", type=float, default=0.0, help="searches per second (0: back to back)")
    p.add_argument("--out", default="search_during_ingest.json")
    args = p.parse_args()
    work = Path(args.work)
    shutil.rmtree(work / "home", ignore_errors=True)
    first = work / "first" / "manifest.csv"
    second = work / "second" / "manifest.csv"
    if not first.exists():
        log(f"making {args.n} images twice under {work}")
        make_images(first.parent, args.n, seed=1)
        make_images(second.parent, args.n, seed=2)
    col = caselens.open("sdi", work / "home", create=True)
    t0 = time.perf_counter()
    col.ingest(manifest=first, progress=False)
    build_s = time.perf_counter() - t0
    log(f"collection of {len(col)} images in {build_s:.1f}s")
    _, vectors = col.storage.vectors()
    rng = np.random.default_rng(0)
    queries = vectors[rng.choice(len(vectors), 200, replace=False)]
    run_searches(col, queries, n=50)  # warm: index loaded, snapshot built
    idle_cpu: list[float] = []
    idle, _, _ = run_searches(col, queries, n=args.idle_queries, rate=args.rate, cpu=idle_cpu)
    log(f"idle: {percentiles(idle)}")

    cmd = [sys.executable, "-m", "caselens.cli", "--home", str(work / "home"), "ingest", "sdi",
           "--manifest", str(second), "-q", "--write-items", "256"]
    start_versions = col.storage.version
    t0 = time.perf_counter()
    nice = args.ingest_nice
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
    writer = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    during_cpu: list[float] = []
    during, versions, stale = run_searches(col, queries, until=lambda: writer.poll() is not None, check_fresh=True,
                                           rate=args.rate, cpu=during_cpu)
    ingest_s = time.perf_counter() - t0
    output = writer.communicate()[0]
    if writer.returncode != 0:
        raise SystemExit(f"the ingest failed:\n{output}")
    after, _, _ = run_searches(col, queries, n=100)
    d, i = percentiles(during), percentiles(idle)
    first_of_version = [t for t, v, w in zip(during, versions, [None, *versions[:-1]]) if v != w]
    result = {
        "collection_items": {"before": args.n, "after": len(col)},
        "build_seconds": round(build_s, 1), "ingest_seconds": round(ingest_s, 1),
        "ingest_nice": nice, "searches_per_second": args.rate or "back to back",
        "idle_ms": i, "during_ingest_ms": d, "after_ingest_ms": percentiles(after),
        "idle_cpu_ms": percentiles(idle_cpu), "during_ingest_cpu_ms": percentiles(during_cpu),
        "p99_ratio_during_vs_idle": round(d["p99"] / i["p99"], 2) if d["n"] else None,
        "max_during_ms": d["max"], "searches_during_ingest": d["n"],
        "first_search_of_each_new_version_ms": percentiles(first_of_version),
        "table_versions_seen_during_ingest": len(set(versions)),
        "first_and_last_version_seen": [min(versions, default=start_versions), max(versions, default=start_versions)],
        "searches_missing_committed_rows": stale,
        "targets": {"p99_during_le_3x_idle": bool(d["n"] and d["p99"] <= 3 * i["p99"]),
                    "no_search_over_1s": bool(d["n"] and d["max"] < 1000)},
    }
    log(f"during ingest: {d}; p99 ratio {result['p99_ratio_during_vs_idle']}; stale {stale}")
    write_result(args.out, result)


if __name__ == "__main__":
    main()

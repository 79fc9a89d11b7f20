"""Choose a FAISS index for a collection by measuring it, not by rule of thumb.

Given the collection's vectors, a memory budget and a recall target, :func:`choose_and_build`
lists the index types that fit the budget (exact ``Flat`` for small collections; then IVF with
scalar quantisation, IVF-Flat, HNSW, OPQ+IVF-PQ and IVF-PQ), builds the cheapest one, and tunes
its search parameter (``nprobe`` for IVF, ``efSearch`` for HNSW) to the smallest value whose
recall@k against exact search, on a held-out sample of the collection's own vectors, reaches the
target. A type that cannot reach the target (or the latency limit) is recorded with its best
recall and the next one is tried. The choice, its measured recall, latency and memory are
returned as :class:`IndexChoice` and written into the index stamp.

Recall is measured leave-one-out: each sampled vector queries the index and the exact index,
and its own id is dropped from both result lists before comparing the top ``k``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import faiss
import numpy as np

from caselens.errors import CaselensError, ConfigError
from caselens.indexes import faiss_index

log = logging.getLogger(__name__)


class IndexBudgetError(CaselensError, ValueError):
    """No index type fits the memory budget given."""


@dataclass
class ChoiceConfig:
    """What the automatic index choice must achieve."""

    target_recall: float = 0.95  # recall@k against exact search the index must reach on held-out vectors
    max_memory: int | None = None  # bytes the index may take (on disk and loaded); None: no limit
    k: int = 10  # the k of recall@k
    n_queries: int = 400  # held-out collection vectors that measure recall
    max_latency_ms: float = 10.0  # single-query p99 an index may take at its tuned parameter
    exact_below: int = 50_000  # collections up to this size get the exact Flat index
    margin: float = 0.02  # tune to target_recall + margin, so fresh queries still reach the target
    factories: tuple[str, ...] | None = None  # index types to try instead of the automatic list
    seed: int = 0  # sampling seed (held-out queries, training sample)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class IndexChoice:
    """The index chosen and what was measured on it."""

    factory: str  # FAISS factory string of the chosen index
    params: dict[str, int]  # tuned search parameters ({"nprobe": 32} or {"efSearch": 64})
    recall: float  # recall@k against exact search on the held-out vectors, at ``params``
    k: int  # the k of recall@k
    p50_ms: float  # single-query latency, median, at ``params``
    p99_ms: float  # single-query latency, 99th percentile
    memory_bytes: int  # size of the index
    bytes_per_vector: float  # memory_bytes / vectors
    build_seconds: float  # train + add time of the chosen index
    target_recall: float  # what was asked
    max_memory: int | None  # budget given, bytes
    n_queries: int  # held-out vectors used for recall
    reason: str  # one line: why this one
    tried: list[dict[str, Any]] = field(default_factory=list)  # candidates measured and rejected

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_memory(text: str) -> int:
    """``"4GB"``, ``"512MiB"``, ``"2e9"`` -> bytes (decimal and binary units)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}
    raw = text.strip().upper().replace(" ", "")
    num = raw.rstrip("KMGTIB")
    try:
        value = float(num)
        scale = units[raw[len(num):]]
    except (ValueError, KeyError):
        raise ConfigError(f"memory size {text!r} not understood; write e.g. 4GB, 512MiB or 2000000000") from None
    if value <= 0:
        raise ConfigError(f"memory size {text!r} must be positive")
    return int(value * scale)


def default_lists(n: int) -> int:
    """IVF lists for ``n`` vectors: about 2·sqrt(n), a power of two, 64 … 65536."""
    return int(min(65536, max(64, 2 ** round(math.log2(max(1.0, 2 * math.sqrt(n)))))))


def _pq_m(dim: int, bytes_per_vector: int) -> int:
    """Largest PQ sub-quantiser count <= bytes_per_vector that divides ``dim``."""
    for m in range(min(bytes_per_vector, dim), 0, -1):
        if dim % m == 0:
            return m
    return 1


def estimate_bytes(factory: str, n: int, dim: int) -> int:
    """Memory of ``factory`` over ``n`` vectors of ``dim`` (codes + ids + coarse quantiser)."""
    lists = faiss_index.factory_lists(factory)
    ids = 8 * n
    if factory == "Flat":
        return n * 4 * dim + ids
    if factory.startswith("HNSW"):
        m = int(factory[4:] or 32)
        return n * (4 * dim + 2 * m * 4 + 8) + ids
    codes = 4 * dim
    last = factory.split(",")[-1]
    if last.startswith("SQ8"):
        codes = dim
    elif last.startswith("SQ4"):
        codes = (dim + 1) // 2
    elif last.startswith("SQfp16"):
        codes = 2 * dim
    elif last.startswith("PQ"):
        m, _, bits = last[2:].partition("x")
        codes = (int("".join(ch for ch in m if ch.isdigit())) * int("".join(ch for ch in bits if ch.isdigit()) or 8) + 7) // 8
    extra = lists * 4 * dim
    if factory.startswith("OPQ"):
        extra += 4 * dim * dim
    return n * (codes + 8) + extra + ids // 8


def candidate_factories(n: int, dim: int, config: ChoiceConfig) -> list[str]:
    """Index types to try for ``n`` vectors, fastest-at-equal-recall first, within the budget."""
    if config.factories:
        out = list(config.factories)
    elif n <= config.exact_below:
        out = ["Flat"]
    else:
        lists = default_lists(n)
        out = [f"IVF{lists},SQ8", f"IVF{lists},Flat", "HNSW32"]
        for m in (dim // 2, dim // 4, dim // 8, dim // 16):
            m = _pq_m(dim, max(4, m))
            out.append(f"OPQ{m}_{dim if m * 4 <= dim else m * 4},IVF{lists},PQ{m}")
        out.append(f"IVF{lists},PQ{_pq_m(dim, max(4, dim // 16))}")
        out = list(dict.fromkeys(out))
    if config.max_memory is not None:
        out = [f for f in out if estimate_bytes(f, n, dim) <= config.max_memory]
        if not out:
            smallest = estimate_bytes(f"IVF{default_lists(n)},PQ{_pq_m(dim, 4)}", n, dim)
            raise IndexBudgetError(f"no index type fits {config.max_memory:,} bytes for {n:,} vectors of "
                                   f"dimension {dim}; the smallest needs about {smallest:,} bytes: raise "
                                   "--max-memory")
    return out


# --------------------------------------------------------------- measuring
@dataclass
class HeldOut:
    """Held-out query vectors with their exact neighbours (own id removed)."""

    positions: np.ndarray  # positions of the query vectors in the collection arrays
    queries: np.ndarray  # the query vectors
    truth: np.ndarray  # (n_queries, k) exact neighbour ids, own id removed


def held_out(vectors: np.ndarray, ids: np.ndarray, k: int, n_queries: int, seed: int = 0) -> HeldOut:
    """Sample ``n_queries`` vectors and find their exact top-``k`` neighbours among all vectors."""
    n = len(vectors)
    rng = np.random.default_rng(seed + 1)
    positions = np.sort(rng.choice(n, min(n, n_queries), replace=False))
    queries = np.ascontiguousarray(vectors[positions], dtype=np.float32)
    _, found = faiss.knn(queries, np.ascontiguousarray(vectors, dtype=np.float32), min(n, k + 1),
                         metric=faiss.METRIC_INNER_PRODUCT)
    truth = np.full((len(positions), k), -1, np.int64)
    for i, row in enumerate(found):
        keep = [ids[p] for p in row if p >= 0 and p != positions[i]][:k]
        truth[i, :len(keep)] = keep
    return HeldOut(positions, queries, truth)


def recall_at_k(found: np.ndarray, truth: np.ndarray, own: np.ndarray | None = None) -> float:
    """Mean fraction of each query's true neighbours among its found ones (own id ignored)."""
    k = truth.shape[1]
    total = 0.0
    for i in range(len(truth)):
        got = [x for x in found[i] if x >= 0 and (own is None or x != own[i])][:k]
        want = set(int(x) for x in truth[i] if x >= 0)
        total += len(want.intersection(int(x) for x in got)) / max(1, len(want))
    return total / max(1, len(truth))


def measure(index: faiss.Index, ho: HeldOut, ids: np.ndarray, params: dict[str, int], k: int,
            deleted: list[int] | None = None) -> float:
    """Recall@k of ``index`` at ``params`` on the held-out queries."""
    _, found = faiss_index.search_index(index, ho.queries, k + 1, params=params, deleted=deleted)
    return recall_at_k(found, ho.truth, ids[ho.positions])


def latency(index: faiss.Index, queries: np.ndarray, params: dict[str, int], k: int,
            n: int = 200) -> tuple[float, float]:
    """(p50, p99) milliseconds of one-query searches at ``params``."""
    times = []
    for q in queries[:n]:
        t = time.perf_counter()
        faiss_index.search_index(index, q[None], k, params=params)
        times.append((time.perf_counter() - t) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def param_grid(index: faiss.Index) -> tuple[str, list[int]]:
    """The tunable search parameter of ``index`` and the values to try, cheapest first."""
    ivf = faiss_index.ivf_of(index)
    if ivf is not None:
        return "nprobe", [p for p in (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512,
                                      1024, 2048, 4096) if p <= ivf.nlist] or [ivf.nlist]
    if faiss_index.hnsw_of(index) is not None:
        return "efSearch", [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048]
    return "", [0]


def tune(index: faiss.Index, ho: HeldOut, ids: np.ndarray, config: ChoiceConfig,
         deleted: list[int] | None = None) -> tuple[dict[str, int], float]:
    """The cheapest search parameter reaching ``target_recall + margin`` (or the best one seen),
    with its recall. Binary search over :func:`param_grid` (recall grows with the parameter)."""
    name, grid = param_grid(index)
    if not name:
        return {}, measure(index, ho, ids, {}, config.k, deleted)
    want = min(1.0, config.target_recall + config.margin)
    lo, hi = 0, len(grid) - 1
    seen: dict[int, float] = {}

    def rec(i: int) -> float:
        if i not in seen:
            seen[i] = measure(index, ho, ids, {name: grid[i]}, config.k, deleted)
        return seen[i]

    if rec(hi) < want:
        best = max(seen, key=lambda i: (seen[i], -i))
        return {name: grid[best]}, seen[best]
    while lo < hi:
        mid = (lo + hi) // 2
        if rec(mid) >= want:
            hi = mid
        else:
            lo = mid + 1
    return {name: grid[hi]}, rec(hi)


def evaluate(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, config: ChoiceConfig,
             params: dict[str, int], deleted: list[int] | None = None) -> float:
    """Recall@k of an existing index at ``params`` on fresh held-out vectors (drift check)."""
    ho = held_out(vectors, ids, config.k, config.n_queries, config.seed + 7)
    return measure(index, ho, ids, params, config.k, deleted)


def choose_and_build(vectors: np.ndarray, ids: np.ndarray, config: ChoiceConfig | None = None,
                     progress: Callable[[str, int], None] | None = None) -> tuple[faiss.Index, IndexChoice]:
    """Build the first candidate index (see :func:`candidate_factories`) that reaches the recall
    target within the latency limit, tuned; when none does, the one with the best recall.

    ``progress(stage, count)`` is called with ``("add", vectors added)`` during builds and
    ``("candidate", i)`` when candidate ``i`` starts.
    """
    config = config or ChoiceConfig()
    vectors = np.asarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    n, dim = vectors.shape
    candidates = candidate_factories(n, dim, config)
    exact_only = candidates == ["Flat"] and not config.factories
    ho = None if exact_only or n < 2 else held_out(vectors, ids, config.k, config.n_queries, config.seed)
    tried: list[dict[str, Any]] = []
    best: tuple[float, faiss.Index, IndexChoice] | None = None
    for i, factory in enumerate(candidates):
        if progress:
            progress("candidate", i)
        start = time.perf_counter()
        try:
            index, _ = faiss_index.build_index(vectors, ids, factory, seed=config.seed,
                                               exclude_from_training=None if ho is None else ho.positions,
                                               progress=(lambda c: progress("add", c)) if progress else None)
        except (ValueError, RuntimeError) as exc:
            tried.append({"factory": factory, "error": str(exc).splitlines()[0]})
            continue
        built = time.perf_counter() - start
        size = faiss_index.index_bytes(index)
        if ho is None:
            params, recall, p50, p99 = {}, 1.0, 0.0, 0.0
        else:
            params, recall = tune(index, ho, ids, config)
            p50, p99 = latency(index, ho.queries, params, config.k)
            for _ in range(2):  # a busy machine can push one run over the limit: best of three
                if p99 <= config.max_latency_ms:
                    break
                p50, p99 = min((p50, p99), latency(index, ho.queries, params, config.k), key=lambda t: t[1])
        within_memory = config.max_memory is None or size <= config.max_memory
        ok = recall >= config.target_recall and p99 <= config.max_latency_ms and within_memory
        choice = IndexChoice(
            factory=factory, params=params, recall=round(recall, 4), k=config.k, p50_ms=round(p50, 3),
            p99_ms=round(p99, 3), memory_bytes=size, bytes_per_vector=round(size / max(1, n), 1),
            build_seconds=round(built, 2), target_recall=config.target_recall, max_memory=config.max_memory,
            n_queries=0 if ho is None else len(ho.positions), reason="", tried=tried)
        if ok:
            choice.reason = ("exact search (collection of %d vectors)" % n if exact_only else
                             f"first candidate reaching recall@{config.k} >= {config.target_recall} with "
                             f"p99 <= {config.max_latency_ms} ms within the memory budget")
            log.info("index choice: %s %s recall %.3f p99 %.2f ms", factory, params, recall, p99)
            return index, choice
        why = ("recall" if recall < config.target_recall else "latency" if p99 > config.max_latency_ms else "memory")
        tried.append({"factory": factory, "params": params, "recall": round(recall, 4), "p99_ms": round(p99, 3),
                      "memory_bytes": size, "rejected_for": why})
        log.info("index candidate %s rejected (%s): recall %.3f p99 %.2f ms %d bytes", factory, why, recall, p99, size)
        if within_memory and (best is None or recall > best[0]):
            best = (recall, index, choice)
        else:
            del index
    if best is None:
        raise IndexBudgetError(f"no candidate index could be built within the budget ({tried}); raise "
                               "--max-memory or give --factory")
    recall, index, choice = best
    choice.tried = [t for t in tried if t.get("factory") != choice.factory]
    choice.reason = (f"no candidate reached recall@{config.k} >= {config.target_recall} within the limits; "
                     "this one had the best recall")
    log.warning("index choice: %s", choice.reason)
    return index, choice

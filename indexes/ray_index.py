"""FAISS IVF index builds on a Ray cluster, for collections too large to build in one process.

1. **train** once, on a sample (:func:`caselens.indexes.faiss_index.train_sample`), in one Ray task
   (on a GPU when ``gpus_per_task`` asks for one);
2. **add** in parallel: each Ray task reads a slice of the table's Lance fragments at the build's
   table version (:func:`caselens.indexes.fragments.read_vectors`), adds it to a copy of the
   trained index and writes that shard next to the index (the collection folder is shared by
   every node);
3. **merge** on the driver: the shards' inverted lists become one on-disk file
   ``index-v<version>-<tag>.ivfdata`` (a new name each build: the index being served keeps its
   own file until the new stamp is in place), then the index header and its stamp are written like
   any derived index (:func:`caselens.indexes.faiss_index.write_index`: table version, encoder
   fingerprint, checksum), and files of earlier builds are removed.

The stamp's ``choice`` says how it was built (``method: ray-sharded``, shards, the ``ivfdata``
file with its size and sha256): the header's checksum covers the header, and the lists file is
checked against these. The lists file is recorded in the header by its absolute path: keep the
collection where it was built (a moved collection finds its index unreadable and rebuilds it).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from caselens.cluster import connect, ray_module
from caselens.files import atomic_write_bytes, sha256_file
from caselens.indexes import faiss_index, fragments

log = logging.getLogger(__name__)

DISTRIBUTE_ABOVE = 2_000_000  # vectors above which an index build is worth a Ray cluster
MAX_LISTS = 4096  # inverted lists at most: the training sample (faiss_index.MAX_TRAIN) needs ~50 per list


def default_factory(n: int) -> str:
    """IVF with scalar-quantised codes (1 byte per dimension) and about 4 sqrt(n) lists (a power
    of two, 64 to :data:`MAX_LISTS`)."""
    lists = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(max(1, n)))))
    return f"IVF{min(MAX_LISTS, max(64, lists))},SQ8"


@dataclass
class RayIndexConfig:
    """How a distributed index build runs."""

    factory: str | None = None  # an IVF factory ("IVF4096,SQ8", "IVF1024,PQ64"...); default: default_factory(n)
    shards: int | None = None  # add tasks (default: the cluster's CPUs, at most one per 50,000 vectors)
    nprobe: int | None = None  # lists searched per query, stamped (default: lists / 32, at least 8)
    gpus_per_task: float = 0.0  # GPUs for the training task and each add task
    cpus_per_task: float = 1.0  # CPUs for each task
    address: str | None = None  # Ray cluster to join when this process is not connected yet
    seed: int = 0  # training sample

    def __post_init__(self) -> None:
        if self.factory is not None and faiss_index.factory_lists(self.factory) <= 0:
            raise ValueError(f"distributed builds make IVF indexes; {self.factory!r} is not one "
                             "(use e.g. 'IVF4096,SQ8' or 'IVF1024,PQ64')")
        if self.shards is not None and self.shards < 1:
            raise ValueError(f"shards must be at least 1, not {self.shards}")
        if self.nprobe is not None and self.nprobe < 1:
            raise ValueError(f"nprobe must be at least 1, not {self.nprobe}")
        if self.gpus_per_task < 0 or self.cpus_per_task <= 0:
            raise ValueError("gpus_per_task must be 0 or more and cpus_per_task more than 0")


def _train(sample: np.ndarray, factory: str) -> np.ndarray:
    index = faiss_index.empty_index(factory, sample.shape[1])
    device, on_gpu = faiss_index.to_device(index)
    device.train(np.ascontiguousarray(sample, np.float32))
    return faiss.serialize_index(faiss_index.to_host(device, on_gpu))


def _add_shard(uri: str, version: int, pieces: list[tuple[int, int, int]], trained: np.ndarray,
               path: str) -> tuple[str, int]:
    rows, vectors = fragments.read_vectors(uri, version, pieces)
    faiss_index.write_ivf_shard(faiss.deserialize_index(trained), vectors, rows, Path(path))
    return path, len(rows)


def plan_shards(counts: list[tuple[int, int]], shards: int) -> list[list[tuple[int, int, int]]]:
    """``counts`` (fragment id, rows) cut into ``shards`` groups of about equal rows, as pieces
    (fragment id, first row, rows); a large fragment is split between groups."""
    total = sum(n for _, n in counts)
    per = max(1, math.ceil(total / max(1, shards)))
    groups: list[list[tuple[int, int, int]]] = [[]]
    room = per
    for fid, n in counts:
        offset = 0
        while offset < n:
            take = min(room, n - offset)
            groups[-1].append((fid, offset, take))
            offset += take
            room -= take
            if room == 0:
                groups.append([])
                room = per
    return [g for g in groups if g]


def build(collection: Any, config: RayIndexConfig | None = None, *, retrain: bool = True) -> faiss_index.IndexStamp:
    """Build ``collection``'s FAISS index on Ray (train once, add shards in parallel, merge the
    lists on disk) from its current table version, write it with its stamp and return the stamp.

    With ``retrain=False`` and an index of the same type built here before, its trained quantiser
    (kept beside it) is reused and only the adding runs again: how an index of this kind is
    brought up to date (never in place: its lists file stays as the stamp describes it).

    ``collection`` is a :class:`caselens.indexes.collection.Collection`; its write lock is held
    throughout (as by ``derived.refresh``). Every node must reach the collection's folder
    at the same path.
    """
    config = config or RayIndexConfig()
    ray = ray_module()
    connect(config.address)
    start = time.perf_counter()
    with collection.lock.hold():
        version = collection.version
        uri = str(collection.items_path)
        counts = [(fid, n) for fid, n in fragments.fragment_rows_at(uri, version) if n]
        total = sum(n for _, n in counts)
        factory = config.factory or default_factory(total)
        lists = faiss_index.factory_lists(factory)
        folder = collection.layout.faiss_dir
        folder.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:8]
        options = {"num_cpus": config.cpus_per_task, "num_gpus": config.gpus_per_task or None}
        previous = faiss_index.read_stamp(folder)
        kept = (previous.choice or {}).get("trained") if previous is not None else None
        if not retrain and kept and previous.factory == factory and (folder / kept).exists():
            trained_bytes = np.fromfile(folder / kept, np.uint8)
            trained_name = kept
        else:
            positions = faiss_index.train_sample(total, factory, config.seed)
            if len(positions) < lists:
                raise ValueError(f"{factory} needs at least {lists} vectors to train; the collection has {total}")
            _, sample = collection.vectors_for_rows(np.sort(collection.row_ids())[positions])
            trained_bytes = ray.get(ray.remote(_train).options(**options).remote(sample, factory))
            trained_name = f"trained-v{version}-{tag}.faiss"
            atomic_write_bytes(folder / trained_name, trained_bytes)
        trained_at = time.perf_counter()
        trained_ref = ray.put(trained_bytes)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        n_shards = config.shards or max(1, min(cpus, total // 50_000 or 1))
        work = folder / f".shards-{tag}"
        work.mkdir()
        try:
            task = ray.remote(_add_shard).options(**options)
            groups = plan_shards(counts, n_shards)
            done = ray.get([task.remote(uri, version, g, trained_ref, str(work / f"shard_{i:05d}.faiss"))
                            for i, g in enumerate(groups)])
            added_at = time.perf_counter()
            trained = faiss.deserialize_index(trained_bytes)
            ivfdata = (folder / f"index-v{version}-{tag}.ivfdata").resolve()
            merged = faiss_index.merge_ivf_shards(trained, [Path(p) for p, _ in done], ivfdata)
            merged_at = time.perf_counter()
        finally:
            shutil.rmtree(work, ignore_errors=True)
        nprobe = config.nprobe or max(8, lists // 32)
        choice = {"method": "ray-sharded", "shards": len(groups), "trained": trained_name, "ivfdata": ivfdata.name,
                  "ivfdata_bytes": ivfdata.stat().st_size, "ivfdata_sha256": sha256_file(ivfdata),
                  "train_seconds": round(trained_at - start, 2), "add_seconds": round(added_at - trained_at, 2),
                  "merge_seconds": round(merged_at - added_at, 2), "total_seconds": round(time.perf_counter() - start, 2)}
        stamp = faiss_index.write_index(merged, folder, table_version=version,
                                        encoder_fingerprint=collection.encoder["fingerprint"], factory=factory,
                                        params={"nprobe": nprobe}, choice=choice, trained_on=total)
        for old in [*folder.glob("index-v*.ivfdata"), *folder.glob("trained-v*.faiss")]:
            if old.name not in (ivfdata.name, trained_name):  # files of earlier builds: no stamp names them now
                old.unlink(missing_ok=True)
    log.info("built %s over %d vectors of %s on Ray (%d shards) in %.1fs", factory, total, collection.name,
             len(groups), time.perf_counter() - start)
    return stamp

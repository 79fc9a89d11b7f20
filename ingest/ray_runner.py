"""Ingest on a Ray cluster: the stages of :mod:`caselens.ingest.pipeline` as Ray Data operators,
rows written by the workers as Lance fragments and committed by the driver.

Stages (same outcomes as the local pipeline, input by input)::

    list    driver    source.parts(): the inputs, in order, in groups ("parts")
    read    tasks     reader.read_part(part): decoded items, rejections, duplicates of stored ids
    encode  actors    the collection's encoder, loaded once per actor (CPU or GPU)
    write   tasks     metadata coerced to the table's columns; one Lance fragment per batch
    commit  driver    in input order: one Lance ``Append`` per group of fragments, then their
                      ledger rows (``Collection.record``)

Guarantees kept from the local pipeline:

* ids are the sources' own (content hashes, SOP Instance UID hashes, corpus ids); every input ends
  in the ledger as accepted, duplicate or rejected with a reason;
* a crash anywhere leaves whole commits or nothing: fragments nobody committed are unreferenced
  files; a commit made before its ledger rows leaves rows that a re-run records as duplicates
  (as the local pipeline does), so a re-run adds the rest exactly once;
* duplicates within a run are settled by the driver in input order (the first input wins, as
  locally); row numbers (``_row``) come from one counter the driver starts, under the
  collection's write lock, at one past the largest stored, and hands out per written batch;
* metadata columns are created as the local pipeline creates them: a batch whose metadata needs
  a column the table lacks is not written by its worker but by the driver, item by item in input
  order (``Collection.coerce_metadata`` then ``Collection.add_metadata_columns``); later batches
  see the new columns;
* the collection's secret reaches the workers as a Ray object (``ray.put`` by the driver, read by
  each worker process once): never an argument, an environment variable or a log line, so it
  does not show in task or actor descriptions, the dashboard or the logs (the runtime
  environment, where environment variables would live, is shown there).

Ray Data fuses the read stage into the encoder actors when both ask for the same resources (CPU
only, equal CPUs): each actor then reads and encodes, as the local pipeline does in one process;
with GPUs, reading runs in CPU tasks beside the GPU actors.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from tqdm.auto import tqdm

from caselens.cluster import connect, ray_module
from caselens.errors import CaselensError
from caselens.indexes import fragments
from caselens.indexes.collection import Collection, LedgerEntry
from caselens.indexes.rows import MetadataTypeError, arrow_rows, table_row
from caselens.ingest.encoders.base import Encoder
from caselens.ingest.items import Source
from caselens.ingest.pipeline import (ID_SET_MAX, IngestConfig, IngestReport, check_run, finish_run,
                                      name_inputs, record_inputs)
from caselens.ingest.ray_stages import (DUPLICATE_REASON, EncodeActor, RowCounter, SecretRef, fault, read_headers,
                                        read_parts, write_batch)

ray = ray_module()  # RunnerError (how to install it) when Ray is missing

log = logging.getLogger(__name__)


@dataclass
class RayConfig:
    """Where and how wide a Ray ingest runs."""

    address: str | None = None  # None: start a local Ray; "auto": join the running cluster; "ray://host:port"
    encoder_workers: int = 1  # encoder actors (each holds one copy of the model)
    gpus_per_worker: float = 0.0  # GPUs per encoder actor (0: encode on CPUs)
    cpus_per_worker: float = 1.0  # CPUs per encoder actor
    read_cpus: float = 1.0  # CPUs per read task
    write_cpus: float = 0.5  # CPUs per fragment-writing task
    part_inputs: int = 64  # inputs per read task
    fragment_rows: int | None = None  # rows per written fragment (default: IngestConfig.write_items)
    runtime_env: dict[str, Any] | None = None  # Ray runtime environment, when this run starts or joins Ray

    def __post_init__(self) -> None:
        if self.encoder_workers < 1:
            raise ValueError(f"encoder_workers must be at least 1, not {self.encoder_workers}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker < 0 or self.read_cpus <= 0 or self.write_cpus <= 0:
            raise ValueError("gpus_per_worker and cpus_per_worker must be 0 or more, read_cpus and write_cpus "
                             "more than 0")
        if self.part_inputs < 1:
            raise ValueError(f"part_inputs must be at least 1, not {self.part_inputs}")
        if self.fragment_rows is not None and self.fragment_rows < 1:
            raise ValueError(f"fragment_rows must be at least 1, not {self.fragment_rows}")
        if self.address is not None and not (self.address == "auto" or self.address.startswith("ray://")
                                             or ":" in self.address):
            raise ValueError(f"address {self.address!r}: use 'auto', 'ray://host:port' or 'host:port'")


# ------------------------------------------------------------------ driver
class _Committer:
    """The driver's end: fragments in input order, duplicates within the run settled, one Lance
    commit per group of fragments followed by the group's ledger rows."""

    def __init__(self, collection: Collection, report: IngestReport, counter: Any, config: IngestConfig):
        self.collection, self.report, self.counter = collection, report, counter
        self.uri = str(collection.items_path)
        self.items, self.seconds = max(1, config.write_items), config.write_seconds
        self.seen: set[str] = set()
        self.fragments: list[str] = []
        self.entries: list[LedgerEntry] = []
        self.rows = 0
        self.last = time.monotonic()

    def put(self, out: dict[str, Any]) -> int:
        """Take one written batch; returns how many ledger rows it brings."""
        outcomes = json.loads(out["outcomes"])
        frags = json.loads(out["fragments"])
        deferred = json.loads(out["deferred"])
        if deferred:
            frags = self._write_deferred(outcomes, deferred, out["vectors"])
        else:
            drop = []
            for o in outcomes:  # the first input of an id wins, as in the local pipeline
                if o["status"] == "accepted" and o["row"] >= 0:
                    if o["id"] in self.seen:
                        drop.append(o["row"])
                        o.update(status="duplicate", code="already_present", reason=DUPLICATE_REASON, row=-1)
                    else:
                        self.seen.add(o["id"])
            if drop and frags:
                if len(frags) != 1:
                    raise RuntimeError(f"a written batch came back as {len(frags)} fragments; expected one")
                frags = fragments.without_rows(self.uri, frags[0], drop)
        entries = []
        for o in outcomes:
            self._count(o)
            entries.extend(LedgerEntry(name, o["status"], o["id"], o["code"], o["reason"]) for name in o["inputs"])
        self.fragments.extend(frags)
        self.rows += sum(fragments.fragment_rows(f) for f in frags)
        self.entries.extend(entries)
        if self.rows >= self.items or time.monotonic() - self.last >= self.seconds:
            self.flush()
        return len(entries)

    def _count(self, o: dict[str, Any]) -> None:
        if o["status"] == "accepted":
            self.report.accepted += 1
            if o["code"]:
                self.report.warnings[o["code"]] += 1
        elif o["status"] == "duplicate":
            self.report.duplicates += 1
        else:
            self.report.rejected[o["code"]] += 1

    def _write_deferred(self, outcomes: list[dict], records: list[dict], vectors: bytes) -> list[str]:
        """A batch whose metadata needs new columns: coerced and columns made item by item, as the
        local pipeline does, then written here."""
        col = self.collection
        vecs = np.frombuffer(vectors, np.float32).reshape(len(records), -1) if records else None
        by_row = {o["row"]: o for o in outcomes if o["status"] == "accepted" and o["row"] >= 0}
        kept, metas = [], []
        for pos, record in enumerate(records):
            o = by_row[pos]
            if o["id"] in self.seen:  # a duplicate within the run: never coerced (as locally)
                o.update(status="duplicate", code="already_present", reason=DUPLICATE_REASON)
                continue
            try:
                meta = col.coerce_metadata(record.get("metadata", {}))
            except MetadataTypeError as exc:
                o.update(status="rejected", code="bad_metadata", reason=str(exc))
                continue
            col.add_metadata_columns(meta)
            self.seen.add(o["id"])
            kept.append(pos)
            metas.append(meta)
        for o in by_row.values():
            o["row"] = kept.index(o["row"]) if o["row"] in kept else -1
        if not kept:
            return []
        start = ray.get(self.counter.take.remote(len(kept)))
        table = fragments.open_table(self.uri)
        data = arrow_rows([table_row(records[p], start + n, metas[n]) for n, p in enumerate(kept)], vecs[kept],
                          table.schema)
        return fragments.write_fragment(self.uri, data, table)

    def flush(self) -> None:
        frags, entries = self.fragments, self.entries
        self.fragments, self.entries, self.rows = [], [], 0
        self.last = time.monotonic()
        if frags:
            fragments.commit_fragments(self.uri, frags, self.collection.version)
            fault("commit")
        self.collection.record(self.report.run_id, entries)  # after the rows: a kill in between leaves
        # rows without ledger rows, which a re-run records as duplicates


def _chunking(source: Source) -> dict[str, int] | None:
    chunker = getattr(source, "chunker", None)
    return None if chunker is None else {"max_tokens": chunker.config.max_tokens, "overlap": chunker.config.overlap}


def _parts(source: Source, config: RayConfig, secret: SecretRef) -> list[Any]:
    """List the inputs in groups; series and study units of a DICOM export first need every
    file's header, read by Ray tasks in groups."""
    from caselens.ingest.sources.dicom_source import DicomSource

    if isinstance(source, DicomSource) and source.config.unit != "instance":
        files = source.dicom_files()
        step = config.part_inputs * 4
        reader = ray.put(source.part_reader())
        task = ray.remote(read_headers).options(num_cpus=config.read_cpus)
        got = ray.get([task.remote(reader, secret, files[i:i + step]) for i in range(0, len(files), step)])
        return source.parts(config.part_inputs, headers=[h for part in got for h in part])
    return source.parts(config.part_inputs)


def ingest(source: Source, collection: Collection, encoder: Encoder, config: IngestConfig | None = None,
           ray_config: RayConfig | None = None) -> IngestReport:
    """Read ``source``, embed its items with ``encoder`` and store them in ``collection``, on Ray.

    Same arguments, outcomes and report as :func:`caselens.ingest.pipeline.ingest`; ``ray_config``
    says where (a local Ray started here, or a cluster) and how wide. The collection's folder and
    the inputs must be readable and writable at the same paths on every node (a shared file
    system), and every node needs caselens and the encoder's weights.
    """
    config = config or IngestConfig()
    rc = ray_config or RayConfig()
    check_run(source, collection, encoder, config)
    for method in ("parts", "read_part", "part_reader"):
        if not callable(getattr(source, method, None)):
            raise TypeError(f"{type(source).__name__} cannot be read in parts (no {method}()); ingest it "
                            "with the local runner")
    name_inputs(source, collection)  # the same path naming as the local runner (ingest.source_paths)
    connect(rc.address, rc.runtime_env)
    report = IngestReport(run_id=uuid.uuid4().hex[:12], collection=collection.name, root=collection.root)
    start_time = time.perf_counter()
    record = encoder.info.to_record()
    chunking = _chunking(source)
    bar = tqdm(total=source.estimate() if chunking is None else None, unit="input",
               desc=f"ingest {collection.name} (ray)", disable=not config.progress)
    with collection.lock.hold():
        if config.record_inputs:
            record_inputs(source, collection, report.run_id)
        secret = SecretRef(ray.put(collection.secret()))
        rows = collection.row_ids()
        counter = RowCounter.remote(collection.next_row())  # numbers are never reused (Collection keeps a mark)
        stored: Any = None if len(rows) > ID_SET_MAX else \
            ray.put(frozenset(collection.existing_ids()) if len(rows) else frozenset())
        parts = _parts(source, rc, secret)
        committer = _Committer(collection, report, counter, config)
        uri = str(collection.items_path)
        ctx = ray.data.DataContext.get_current()
        saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars,
                 ctx.enable_fallback_to_arrow_object_ext_type)
        try:
            ctx.execution_options.preserve_order = True  # duplicates settle, columns appear in input order
            ctx.enable_progress_bars = False  # ours counts inputs
            ctx.enable_fallback_to_arrow_object_ext_type = True  # items (images) travel as Python objects
            ds = ray.data.from_items([{"part": p} for p in parts], override_num_blocks=max(1, len(parts)))
            ds = ds.map_batches(read_parts, batch_size=1, batch_format="numpy", num_cpus=rc.read_cpus,
                                fn_kwargs={"reader": source.part_reader(), "secret": secret, "chunking": chunking,
                                           "record": record, "stored": stored, "uri": uri})
            ds = ds.map_batches(EncodeActor, batch_size=config.batch_size, batch_format="numpy",
                                compute=ray.data.ActorPoolStrategy(size=rc.encoder_workers),
                                fn_constructor_kwargs={"record": record, "dim": collection.dim,
                                                       "on_bad_vectors": config.on_bad_vectors,
                                                       "token_limit": source.kind == "text"},
                                num_cpus=rc.cpus_per_worker, num_gpus=rc.gpus_per_worker or None)
            ds = ds.map_batches(write_batch, batch_size=rc.fragment_rows or config.write_items,
                                batch_format="numpy", num_cpus=rc.write_cpus, fn_kwargs={"uri": uri, "counter": counter})
            for out in _rows(ds):
                bar.update(committer.put(out))
        except BaseException:
            try:  # keep what finished before the error (a kill cannot; a re-run redoes it)
                committer.flush()
            except Exception:  # the original error is the one to see
                log.exception("ingest run %s: committing the finished batches failed", report.run_id)
            raise
        finally:
            (ctx.execution_options.preserve_order, ctx.enable_progress_bars,
             ctx.enable_fallback_to_arrow_object_ext_type) = saved
            ray.kill(counter)
        committer.flush()
        if report.accepted:
            collection.compact()
    bar.close()
    return finish_run(report, collection, config, start_time)


def _rows(ds: ray.data.Dataset) -> Iterator[dict[str, Any]]:
    """The written batches, in input order; a caselens error raised in a worker (e.g.
    :class:`BadVectorError` with ``on_bad_vectors="error"``) is raised here as itself, not
    wrapped in Ray's task errors."""
    try:
        yield from ds.iter_rows()
    except ray.exceptions.RayError as exc:
        err: BaseException | None = exc
        for _ in range(8):  # Ray wraps: RayTaskError -> UserCodeException -> the error raised
            if err is None or isinstance(err, CaselensError):
                break
            err = err.__cause__ or getattr(err, "cause", None)
        if isinstance(err, CaselensError):
            raise err from None
        raise


__all__ = ["RayConfig", "ingest"]

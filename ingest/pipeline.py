"""The ingest runner: reader -> batcher -> encoder -> writer, with a ledger of every input.

Each input ends in the ledger as ``accepted`` (stored now), ``duplicate`` (its id was already
stored; nothing added) or ``rejected`` (with a reason code and a reason). Items are encoded a
batch at a time and written in larger groups (:attr:`IngestConfig.write_items` items or
:attr:`IngestConfig.write_seconds` seconds, whichever comes first: one LanceDB table version per
group, not per batch); a group's ledger rows are written after its items. So a run killed
midway loses at most the group not yet written, and a re-run continues by skipping what is
stored (items written without their ledger rows get them then: ``accepted``, ``recovered``; see
:mod:`caselens.indexes.ledger`). An error raised in
the run writes the groups finished before it first.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from tqdm.auto import tqdm

from caselens.errors import BadVectorError, ConfigError, DiskFullError, UnsupportedModalityError
from caselens.files import disk_full
from caselens.indexes import derived
from caselens.indexes.collection import Collection, LedgerEntry, MetadataTypeError
from caselens.indexes.faiss_index import IndexStamp
from caselens.ingest.embed import encode_items
from caselens.ingest.encoders.base import Encoder
from caselens.ingest.items import Item, Rejection, Source
from caselens.ingest.source_paths import apply_source_paths

log = logging.getLogger(__name__)


@dataclass
class IngestConfig:
    """How an ingest run behaves."""

    batch_size: int = 32  # items encoded together
    write_items: int = 1024  # items buffered before they are written (one table version per write)
    write_seconds: float = 5.0  # ... or this long after the previous write, whichever comes first
    on_bad_vectors: str = "reject"  # "reject": record the item as rejected; "error": stop the run
    build_index: bool = True  # refresh the derived indexes (FAISS, BM25) after writing
    refresh_every: int = 50_000  # ... and during the run, each time this many items were written since
    progress: bool = True  # show a progress bar
    record_inputs: bool = True  # note the run's absolute input root in <collection>/inputs.json (see ingest.inputs)
    on_progress: Callable[[int, int | None], None] | None = None  # called with (inputs done, inputs expected)


@dataclass
class IngestReport:
    """What one ingest run did."""

    run_id: str  # id of the run in the ledger
    collection: str  # collection name
    root: Path  # collection folder
    accepted: int = 0  # items stored by this run
    duplicates: int = 0  # inputs whose item was already stored
    rejected: Counter = field(default_factory=Counter)  # reason_code -> count
    warnings: Counter = field(default_factory=Counter)  # accepted with a note (e.g. truncated text)
    table_version: int = 0  # items table version after the run
    total_items: int = 0  # items in the collection after the run
    index: IndexStamp | None = None  # FAISS index stamp after the run
    seconds: float = 0.0  # wall time
    notes: list[str] = field(default_factory=list)  # what the user should know (collection created, chunking, ...)

    @property
    def ledger_path(self) -> Path:
        return self.root / "lance" / "ledger.lance"

    def summary(self) -> str:
        lines = [*self.notes, f"ingest run {self.run_id} into '{self.collection}': {self.accepted} accepted, "
                 f"{self.duplicates} already present, {sum(self.rejected.values())} rejected "
                 f"in {self.seconds:.1f}s"]
        for code, n in sorted(self.rejected.items()):
            lines.append(f"  rejected {n:>6} x {code}")
        for code, n in sorted(self.warnings.items()):
            lines.append(f"  accepted {n:>6} x with note: {code}")
        lines.append(f"collection: {self.root} ({self.total_items} items, table version {self.table_version})")
        lines.append(f"ledger: {self.ledger_path} (see `caselens ledger {self.collection} --run {self.run_id}`)")
        if self.index is not None:
            lines.append(f"FAISS index: {self.root / 'faiss'} ({self.index.factory}, {self.index.ntotal} vectors)")
        return "\n".join(lines)


def _batches(items: Iterable[Item | Rejection], size: int) -> Iterable[list[Item | Rejection]]:
    batch: list[Item | Rejection] = []
    for it in items:
        batch.append(it)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def ledger_entries(it: Item, status: str, code: str = "", reason: str = "") -> list[LedgerEntry]:
    """Ledger rows of one item: one per input it was built from (a series lists its files)."""
    return [LedgerEntry(name, status, it.id, code, reason) for name in (it.members or [it.input])]


def _inputs_done(batch: list[Item | Rejection], last_input: str | None) -> tuple[int, str | None]:
    """How many inputs ``batch`` finishes (for the progress bar, whose total counts inputs): a series
    item counts its member files, the chunks of one row (consecutive, same ``input``) count once."""
    done = 0
    for it in batch:
        if isinstance(it, Item) and it.members:
            done, last_input = done + len(it.members), None
        elif it.input != last_input:
            done, last_input = done + 1, it.input
    return done, last_input


def record_inputs(source: Source, collection: Collection, run_id: str) -> None:
    """Note where this run reads its files (before the first batch, so that a run killed midway has
    its stored items covered). A local file of the collection, never an index column: see
    :mod:`caselens.ingest.inputs`. A failure to write it costs only the images of this run's
    items for vision-language generators, so it is logged, not raised."""
    from caselens.ingest.inputs import input_record, record_run

    record = input_record(source)
    if record is None:
        return
    try:
        record_run(collection.root, run_id, record)
    except OSError as exc:
        log.warning("input root of run %s not recorded (%s); its images cannot be shown to a "
                    "vision-language generator", run_id, exc.strerror or exc)


# Stored ids are read once at the start of a run (one scan of the id column) when the collection
# holds at most this many items; above, each batch asks for its own ids (a filtered scan).
ID_SET_MAX = 1_000_000


class _Writer:
    """Accepted rows and ledger rows of finished batches, written in groups: the rows of a group
    (one ``Collection.add``), then its ledger rows (one ``Collection.record``)."""

    def __init__(self, collection: Collection, run_id: str, items: int, seconds: float):
        self.collection, self.run_id = collection, run_id
        self.written = 0  # items written by this writer
        self.items, self.seconds = max(1, items), seconds
        self.records: list[dict] = []
        self.vectors: list[np.ndarray] = []
        self.entries: list[LedgerEntry] = []
        self.last = time.monotonic()

    def put(self, records: list[dict], vectors: np.ndarray, entries: list[LedgerEntry]) -> None:
        if records:
            self.records.extend(records)
            self.vectors.append(vectors)
        self.entries.extend(entries)
        if len(self.records) >= self.items or time.monotonic() - self.last >= self.seconds:
            self.flush()

    def flush(self) -> None:
        records, vectors, entries = self.records, self.vectors, self.entries
        self.records, self.vectors, self.entries = [], [], []  # a failed write is not retried
        self.last = time.monotonic()
        if records:
            self.collection.add(records, np.concatenate(vectors))
            self.written += len(records)
        self.collection.record(self.run_id, entries)  # after the rows: a kill in between leaves
        # rows without ledger rows, which a re-run records as duplicates


def check_run(source: Source, collection: Collection, encoder: Encoder, config: IngestConfig) -> None:
    """Refuse a run before it starts: a bad setting, an encoder other than the collection's, an
    encoder that cannot embed the source's items."""
    if config.on_bad_vectors not in ("reject", "error"):
        raise ConfigError(f"on_bad_vectors must be 'reject' or 'error', not {config.on_bad_vectors!r}")
    collection.check_encoder(encoder.info.to_record())
    if source.kind not in encoder.info.modalities:
        raise UnsupportedModalityError(
            f"encoder {encoder.info.spec} embeds {', '.join(encoder.info.modalities)}, but this source holds "
            f"{source.kind} items; choose an encoder for {source.kind}")


def name_inputs(source: Source, collection: Collection) -> None:
    """Give a source with input files the collection's way of naming them (relative, hashed or
    none: :mod:`caselens.ingest.source_paths`); the first ingest fixes the collection's setting."""
    if hasattr(source, "paths"):
        apply_source_paths(source, collection)


def full_disk(exc: BaseException, collection: Collection) -> DiskFullError | None:
    """The :class:`DiskFullError` naming ``collection`` that ``exc`` amounts to, or None when it
    is no full disk."""
    if isinstance(exc, DiskFullError):
        return DiskFullError(f"collection {collection.name!r} ({collection.root}): {exc}")
    if disk_full(exc):
        return DiskFullError(f"collection {collection.name!r} ({collection.root}): no space left on the device "
                             "while writing; what was stored before is intact: free space and run the same ingest "
                             "again (it continues where this one stopped)")
    return None


def ingest(source: Source, collection: Collection, encoder: Encoder, config: IngestConfig | None = None) -> IngestReport:
    """Read ``source``, embed its items with ``encoder`` and store them in ``collection``.

    A full disk raises :class:`DiskFullError` naming the collection: what earlier groups stored
    is kept, and the same call with space continues where this one stopped."""
    try:
        return _ingest(source, collection, encoder, config)
    except Exception as exc:
        full = full_disk(exc, collection)
        if full is not None:
            raise full from None
        raise


def _ingest(source: Source, collection: Collection, encoder: Encoder, config: IngestConfig | None) -> IngestReport:
    config = config or IngestConfig()
    check_run(source, collection, encoder, config)
    name_inputs(source, collection)
    report = IngestReport(run_id=uuid.uuid4().hex[:12], collection=collection.name, root=collection.root)
    start = time.perf_counter()
    limit = encoder.max_tokens() if source.kind == "text" else None
    seen: set[str] = set()
    last_input: str | None = None  # the input of the batch's last item: chunks of one row may span batches
    expected = source.estimate()
    inputs_done = 0
    bar = tqdm(total=expected, unit="input", desc=f"ingest {collection.name}", disable=not config.progress)
    refreshed_at = 0  # items written when the derived indexes were last refreshed
    with collection.lock.hold():
        if config.record_inputs:
            record_inputs(source, collection, report.run_id)
        writer = _Writer(collection, report.run_id, config.write_items, config.write_seconds)
        # the write lock is held until the end: nobody else adds items meanwhile, so the ids
        # stored at the start plus those accepted since (``seen``) are all that is stored
        n_stored = collection.count()
        stored_at_start = set() if n_stored == 0 else collection.existing_ids() if n_stored <= ID_SET_MAX else None
        try:
            for batch in _batches(source, config.batch_size):
                entries: list[LedgerEntry] = []
                fresh: list[Item] = []
                stored = stored_at_start if stored_at_start is not None else \
                    collection.existing_ids(it.id for it in batch if isinstance(it, Item))
                for it in batch:
                    if isinstance(it, Rejection):
                        entries.append(LedgerEntry(it.input, "rejected", "", it.reason_code, it.reason))
                        report.rejected[it.reason_code] += 1
                    elif it.id in stored or it.id in seen:
                        entries.extend(ledger_entries(it, "duplicate", "already_present",
                                                "an item with this id is already stored; nothing added"))
                        report.duplicates += 1
                    else:
                        try:
                            it.metadata = collection.coerce_metadata(it.metadata)
                        except MetadataTypeError as exc:
                            entries.extend(ledger_entries(it, "rejected", "bad_metadata", str(exc)))
                            report.rejected["bad_metadata"] += 1
                            continue
                        # new columns now, not when the group is written: the next item's
                        # metadata is coerced to them (as if each item were written at once)
                        collection.add_metadata_columns(it.metadata)
                        seen.add(it.id)
                        fresh.append(it)
                records, keep = [], []
                vectors = None
                if fresh:
                    vectors = encode_items(encoder, fresh)
                    good = np.isfinite(vectors).all(axis=1) & (vectors.shape[1] == collection.dim)
                    if not good.all() and config.on_bad_vectors == "error":
                        bad = [fresh[i].input for i in np.flatnonzero(~good)]
                        raise BadVectorError(f"encoder returned non-finite vectors for {bad}; nothing of this batch stored")
                    for i, it in enumerate(fresh):
                        if not good[i]:
                            entries.extend(ledger_entries(it, "rejected", "bad_vector",
                                                    "encoder returned a non-finite vector or one of the wrong size"))
                            report.rejected["bad_vector"] += 1
                            seen.discard(it.id)
                            continue
                        note_code, note = "", ""
                        if limit and it.text is not None:
                            n_tokens = encoder.count_tokens(it.text)
                            if n_tokens and n_tokens > limit:
                                it.provenance["truncated_from_tokens"] = n_tokens
                                note_code, note = "truncated", f"text has {n_tokens} tokens; the encoder read the first {limit}"
                                report.warnings["truncated"] += 1
                        records.append({"id": it.id, "kind": it.kind, "source": it.source, "text": it.text,
                                        "provenance": it.provenance, "metadata": it.metadata})
                        keep.append(i)
                        entries.extend(ledger_entries(it, "accepted", note_code, note))
                writer.put(records, vectors[keep] if records else None, entries)
                if config.build_index and writer.written - refreshed_at >= config.refresh_every:
                    derived.refresh(collection)  # readers rank rows newer than the index exactly: keep them few
                    refreshed_at = writer.written
                report.accepted += len(records)
                done, last_input = _inputs_done(batch, last_input)
                bar.update(done)
                inputs_done += done
                if config.on_progress is not None:
                    config.on_progress(inputs_done, expected)
        except BaseException:
            try:  # keep what finished before the error (a kill cannot, a re-run redoes it)
                writer.flush()
            except Exception as exc:  # the original error is the one to see
                log.error("ingest run %s: writing the finished batches failed too (%s)", report.run_id,
                          str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__,
                          exc_info=log.isEnabledFor(logging.DEBUG))
            raise
        writer.flush()
        if report.accepted:
            collection.compact()
    bar.close()
    return finish_run(report, collection, config, start)


def finish_run(report: IngestReport, collection: Collection, config: IngestConfig, start: float) -> IngestReport:
    """After the writes: bring the derived indexes (FAISS, BM25) up to date when asked (the
    writer's job, holding the write lock), then the report's totals and time (``start``:
    ``time.perf_counter()`` when the run began)."""
    if config.build_index:
        report.index, _ = derived.refresh_all(collection, progress=config.progress)
    report.table_version = collection.version
    report.total_items = collection.count()
    report.seconds = time.perf_counter() - start
    log.info(report.summary())
    return report

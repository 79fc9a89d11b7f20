"""The public Python API: what ``import caselens`` gives.

    import caselens

    col = caselens.open("cxr", home="caselens-data", create=True)
    col.ingest(manifest="data/cxr/manifest.csv", label_column="finding")
    hits = col.search(image="query.png", k=10, where="modality = 'DX'", exclude_same="patient_id")
    hits.to_pandas(); hits.to_arrow(); hits.show()          # a grid of thumbnails in a notebook
    kb = caselens.open("kb")
    answer = kb.ask("What distinguishes pneumonia from pneumonitis?", generator="extractive")
    col.evaluate(label_column="finding", exclude_same="patient_id")
    col.export_vectors("cxr.parquet")

The command line, the HTTP service, the notebooks and the LangChain retriever are shells over
these calls. Every call reads the latest committed snapshot of the collection without waiting
for writers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caselens.errors import CollectionNotFoundError, QueryError
from caselens.indexes.collection import Collection as Storage
from caselens.indexes.collection import default_home, list_collections
from caselens.indexes.reader import reader_of
from caselens.retrieval.search import ImageQuery, SearchResult, search

if TYPE_CHECKING:  # (what only some calls need is imported by them: a search starts sooner)
    import numpy as np

    from caselens.indexes.index_choice import ChoiceConfig
    from caselens.ingest.pipeline import IngestReport
    from caselens.retrieval.diagnosis import Diagnosis
    from caselens.retrieval.eval.adaptation_eval import AdaptedRetrievalEval
    from caselens.retrieval.eval.diagnosis_eval import DiagnosisEval
    from caselens.retrieval.eval.retrieval_eval import RetrievalEval
    from caselens.retrieval.rag import Answer

__all__ = ["Collection", "open", "collections"]


def collections(home: Path | str | None = None) -> list[str]:
    """Names of the collections under ``home`` (default ``$CASELENS_HOME`` or ``./caselens-data``)."""
    return list_collections(Path(home).expanduser() if home is not None else None)


def open(name: str, home: Path | str | None = None, *, create: bool = False) -> "Collection":  # noqa: A001
    """The collection ``name`` under ``home``. With ``create``, a collection that does not exist yet
    is created by its first :meth:`Collection.ingest` (which picks its encoder); otherwise
    :class:`~caselens.errors.CollectionNotFoundError` names the collections that exist."""
    home = Path(home).expanduser() if home is not None else default_home()
    Storage.validate_name(name)
    if not create and not Storage.exists(name, home):
        Storage.open(name, home)  # raises CollectionNotFoundError naming what exists
    return Collection(name, home)


class Collection:
    """A handle on one collection: ingest, search, ask, evaluate, export, maintain.

    Cheap to make and safe to keep: it holds the opened LanceDB table, the loaded index and
    encoder between calls, and every read sees the latest committed version."""

    def __init__(self, name: str, home: Path):
        self.name = name
        self.home = Path(home)
        self._storage: Storage | None = None

    def __repr__(self) -> str:
        return f"caselens.Collection({self.name!r}, home={str(self.home)!r})"

    # ------------------------------------------------------------------ facts
    @property
    def exists(self) -> bool:
        return Storage.exists(self.name, self.home)

    @property
    def storage(self) -> Storage:
        """The :class:`caselens.indexes.collection.Collection` underneath (table, ledger, key)."""
        if self._storage is None:
            if not self.exists:
                raise CollectionNotFoundError(f"collection {self.name!r} does not exist under {self.home} yet; "
                                              "ingest something into it first")
            self._storage = Storage.open(self.name, self.home)
        return self._storage

    @property
    def path(self) -> Path:
        return self.home / self.name

    def __len__(self) -> int:
        return len(reader_of(self.storage).snapshot())

    def info(self) -> dict[str, Any]:
        """Encoder, item count, table version, columns and the derived indexes' stamps."""
        from caselens.indexes import bm25_index, faiss_index
        from caselens.indexes.space import space_of
        from caselens.ingest.chunking import stored_chunking

        storage = self.storage
        version = storage.version
        stamp = faiss_index.read_stamp(storage.layout.faiss_dir)
        bm25 = bm25_index.read_stamp(storage.layout.bm25_dir)
        count = storage.count()
        return {"collection": storage.name, "path": str(storage.root), "items": count,
                "table_version": version, "encoder": storage.encoder, "columns": storage.columns(),
                "faiss_index": None if stamp is None else {**stamp.summary(), "fresh": stamp.table_version == version},
                "bm25_index": None if bm25 is None else {"table_version": bm25.table_version, "n_docs": bm25.n_docs,
                                                         "fresh": bm25.table_version == version},
                "chunking": stored_chunking(storage) if count else None, "space": space_of(storage).describe()}

    def ledger(self, run: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        """Every input and its fate (accepted, duplicate, rejected with a reason, deleted)."""
        rows = self.storage.ledger(run)
        return [r for r in rows if status is None or r["status"] == status]

    # ----------------------------------------------------------------- ingest
    def ingest(self, *, images: Path | str | None = None, manifest: Path | str | None = None,
               dicom: Path | str | Sequence[Path | str] | None = None, text: Path | str | None = None,
               pdf: Path | str | None = None, encoder: str | None = None, **options: Any) -> IngestReport:
        """Ingest one kind of source (see :class:`caselens.ingest.runner.IngestRequest` for every
        option: ``label_column``, ``unit``, ``window``, ``chunk_tokens``, ``encoder_options``, …).
        The first ingest creates the collection. Returns the run's report (counts, reasons)."""
        from caselens.ingest.runner import IngestRequest, run_ingest

        request = IngestRequest(images=images, manifest=manifest, dicom=dicom, text=text, pdf=pdf, encoder=encoder,
                                **options)
        report = run_ingest(self.name, request, self.home)
        self._storage = None  # created now, or its schema grew: open it again
        return report

    # ----------------------------------------------------------------- search
    def search(self, image: ImageQuery | None = None, *, text: str | None = None, vector: np.ndarray | None = None,
               id: str | None = None, k: int = 10, where: str | None = None,  # noqa: A002
               exclude_same: str | None = None, query_patient: str | None = None,
               mode: str = "dense") -> SearchResult:
        """The ``k`` most similar items to one query: an ``image`` (path, bytes of a file, or PIL
        image), a ``text``, a ``vector`` or a stored item's ``id`` (itself left out). ``where`` is
        an SQL filter on metadata columns; ``exclude_same="patient_id"`` leaves out the query's
        own patient (``query_patient`` names it for an outside query). ``mode`` ranks texts by
        "dense" vectors, "bm25" keywords or "hybrid" fusion. The result has ``to_pandas()``,
        ``to_arrow()`` and ``show()``."""
        return search(self.storage, image=image, text=text, vector=vector, item_id=id, k=k, where=where,
                      exclude_same=exclude_same, query_patient=query_patient, mode=mode)

    # -------------------------------------------------------------------- ask
    def ask(self, question: str, *, generator: str | Any = "extractive", also: Sequence["Collection"] = (),
            cases: "Collection | None" = None, image: ImageQuery | None = None, **config: Any) -> Answer:
        """Answer ``question`` from this knowledge collection (and ``also`` others), with typed
        citations checked against what was retrieved; with ``cases`` and ``image``, similar cases
        join the context. ``config``: :class:`caselens.retrieval.rag.AskConfig` fields (``k``,
        ``task``, ``options``, ``min_score``, …). The default generator is extractive (it quotes
        the sources, so it is always grounded); name ``gemma``, ``hf:<folder>`` or
        ``openai:<url>`` for a model."""
        from caselens.retrieval.rag import AskConfig, ask

        knowledge = [self.storage, *(c.storage for c in also)]
        return ask(knowledge, question, generator=generator, cases=cases.storage if cases is not None else None,
                   image=image, config=AskConfig(**config))

    # --------------------------------------------------------------- evaluate
    def evaluate(self, label_column: str = "label", k: int = 10, exclude_same: str | None = None,
                 folds: int | None = None, method: str = "auto",
                 progress: Callable[[str], None] | None = None) -> "RetrievalEval | AdaptedRetrievalEval":
        """Image retrieval quality of the raw vectors, leave-one-out: P@1, P@k, mAP@k and kNN
        accuracy, per class.

        With ``folds`` (e.g. 5): raw vs adapted P@k without leakage instead: for each fold, an
        adapter (``method``) is fitted on the other folds only (the archive), the fold's items
        query the archive, and the queries' patients are kept out of both the fit and the ranking."""
        if folds is not None:
            from caselens.retrieval.eval.adaptation_eval import evaluate_adapted_retrieval

            return evaluate_adapted_retrieval(self.storage, label_column, folds, method=method, k=k, progress=progress)
        from caselens.retrieval.eval.retrieval_eval import evaluate_retrieval

        return evaluate_retrieval(self.storage, label_column, k, exclude_same)

    def evaluate_diagnosis(self, label_column: str = "label", folds: int = 5, *, method: str = "auto",
                           out_dir: Path | str | None = None,
                           progress: Callable[[str], None] | None = None) -> DiagnosisEval:
        """Diagnosis by similar cases, cross-validated without leakage (adapter and diagnosis model
        fitted on each fold's archive only): accuracy, balanced accuracy, macro AUC, calibration
        error before/after calibration, coverage at the target precision, per class and per
        subgroup. With ``out_dir``: the JSON and ROC / reliability plots written there."""
        from caselens.retrieval.eval.diagnosis_eval import evaluate_diagnosis

        return evaluate_diagnosis(self.storage, label_column, folds, method=method, out_dir=out_dir, progress=progress)

    # ------------------------------------------------------------ adaptation
    def adapt(self, label_column: str = "label", method: str = "auto", folds: int = 5, *,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Fit an adapter (a projection of the vectors chosen by patient-disjoint cross-validation
        on the labelled items; ``auto`` keeps the raw vectors when nothing beats them) and the
        diagnosis model (k, temperature and calibration chosen the same way), store both in the
        collection, and rebuild the FAISS index in the adapted space. Every search after this
        passes through the adapter; unlabelled items stay searchable. Returns what was chosen and
        why, with the cross-validated P@10 raw and adapted."""
        from caselens.indexes import derived
        from caselens.retrieval.diagnosis import fit_collection_diagnosis, save_collection_diagnosis

        storage = self.storage
        # fitted without the lock (ingests go on; the adapter applies to rows added meanwhile too)
        adapter, model, report = fit_collection_diagnosis(storage, label_column, method, folds, progress=progress)
        with storage.lock.hold():  # stored and built into the index by one writer
            save_collection_diagnosis(storage, adapter, model)
            if progress:
                progress("building the index in the adapted space")
            stamp = derived.refresh(storage)
        reader_of(storage).invalidate()
        return {"collection": self.name, "label_column": label_column, "adapter": adapter.method,
                "adapter_fingerprint": adapter.fingerprint, "dim": adapter.out_dim, **report.to_dict(),
                "diagnosis": {"k": model.k, "temperature": model.temperature, "calibrator": model.calibrator.kind,
                              "threshold": model.threshold, "classes": model.classes},
                "index": stamp.summary()}

    def remove_adapter(self) -> bool:
        """Remove the collection's adapter and diagnosis model and rebuild the index on the raw
        vectors; False when there was none."""
        from caselens.indexes import derived
        from caselens.retrieval.adaptation.collection import remove_collection_adapter

        storage = self.storage
        with storage.lock.hold():
            removed = remove_collection_adapter(storage)
            if removed:
                derived.refresh(storage)
        reader_of(storage).invalidate()
        return removed

    def diagnose(self, image: ImageQuery | None = None, *, id: str | None = None,  # noqa: A002
                 vector: np.ndarray | None = None, k: int | None = None, query_patient: str | None = None,
                 knowledge: "Collection | Sequence[Collection]" = (), passages: int = 3,
                 min_confidence: float | None = None) -> Diagnosis:
        """Label probabilities for one query from the collection's similar cases (calibrated
        similarity-weighted voting fitted by :meth:`adapt`): the diagnosis or an abstention with
        its reason, the supporting cases, and with ``knowledge`` guideline passages for the top
        candidates (one or several text collections). The query item and its patient's cases
        never vote. ``min_confidence`` replaces the fitted abstention threshold."""
        from caselens.retrieval.diagnosis import diagnose_collection

        kbs = [knowledge] if isinstance(knowledge, Collection) else list(knowledge or ())
        return diagnose_collection(self.storage, image=image, item_id=id, vector=vector, k=k,
                                   query_patient=query_patient, knowledge=[kb.storage for kb in kbs],
                                   passages=passages, min_confidence=min_confidence)

    # ----------------------------------------------------------------- export
    def export_vectors(self, path: Path | str, columns: Sequence[str] | None = None) -> Path:
        """Write the latest snapshot's ids, vectors and metadata (or only ``columns`` besides ``id``
        and ``vector``) to a Parquet file; returns its path."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        snapshot = reader_of(self.storage).snapshot()
        rows, vectors = snapshot.vectors(snapshot.rows)
        values = snapshot.row_dicts(rows.tolist())
        names = [c for c in snapshot.columns if c not in ("_row", "vector")]
        if columns is not None:
            unknown = sorted(set(columns) - set(names))
            if unknown:
                raise QueryError(f"collection {self.name!r} has no column(s) {unknown}; it has {names}")
            names = ["id", *[c for c in columns if c != "id"]]
        table = pa.table({
            **{c: [values[int(r)].get(c) for r in rows] for c in names},
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), vectors.shape[1]),
        })
        path = Path(path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
        return path

    # ------------------------------------------------------------ maintenance
    def index(self, rebuild: bool = False, config: ChoiceConfig | None = None, progress: bool = False) -> dict[str, Any]:
        """Bring the derived indexes up to date (or rebuild the FAISS index); returns its stamp."""
        from caselens.indexes import derived

        storage = self.storage
        stamp = derived.refresh(storage, rebuild=rebuild, config=config, progress=progress)
        derived.refresh_bm25(storage)
        return stamp.summary()

    def delete(self, ids: Sequence[str]) -> list[str]:
        """Delete items (noted in the ledger) and remove them from the derived indexes."""
        from caselens.indexes import derived

        return derived.delete(self.storage, list(ids))

    def verify(self, repair: bool = False, sample: int | None = None, reingest: bool = False) -> dict[str, Any]:
        """Check the collection: every file of the table and the ledger reads and every row matches
        its checksum, ledger and table agree (nothing missing, duplicated or phantom), the index
        holds the table's rows and vectors and each item finds itself
        (:func:`caselens.indexes.derived.verify`). Works on a damaged collection too.

        ``repair`` makes new versions of a damaged table or ledger from the good copies of their
        rows (nothing is deleted; what had no good copy is listed by run in ``missing_by_run``),
        records phantoms in the ledger and rebuilds a disagreeing index. ``reingest`` then reads
        the recorded input of each run that lost items again (``reingest`` in the result: what
        could be done and why not) and checks once more (``after_reingest``)."""
        from caselens.indexes import derived
        from caselens.ingest import reingest as again

        storage = Storage.open(self.name, self.home, damaged=True)
        report = derived.verify(storage, repair=repair, sample=sample)
        out = asdict(report)
        steps = again.plan(storage, report.missing_by_run) if report.missing_by_run and not report.table_problems \
            else []
        out["reingest"] = [s.to_dict() for s in steps]
        if reingest and any(s.possible for s in steps):
            out["reingested"] = again.reingest(self.name, self.home, steps)
            after = derived.verify(Storage.open(self.name, self.home), sample=sample)
            out["after_reingest"] = {"ok": after.ok, "missing_count": after.missing_count, "missing": after.missing,
                                     "items": after.items, "phantom_count": after.phantom_count}
        self._storage = None  # the table may have a new version and new columns: open it again
        return out

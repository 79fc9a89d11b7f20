"""Diagnosis by similar cases: calibrated label probabilities from the nearest archive cases.

For a query (a vector in the collection's searched space: adapted when the collection has an
adapter), the ``k`` most similar labelled archive cases vote, each with weight
``softmax(similarity / temperature)`` over the ``k``; a little of the archive's class prior is
mixed in (``smoothing``) so no class gets probability 0. ``k`` and ``temperature`` are chosen by
cross-validation on the archive (log-loss of out-of-fold predictions, patient-disjoint folds);
a calibrator (:mod:`caselens.retrieval.calibration`: none, temperature, Platt or isotonic on the
top label) is chosen by cross-validated expected calibration error on the same out-of-fold
predictions, so that a stated confidence of 0.8 is right about 80 % of the time. The answer is
withheld (``abstained``) when the calibrated confidence is below a threshold: by default the
lowest one at which the archive's out-of-fold answers reach ``target_precision``.

Cases of the query's own patient, and the query item itself, are never supporting cases nor
voters. :func:`diagnose` works on a vector and a search callable (:data:`SearchFn`), so it is
the same code for an exact numpy archive (:class:`ArchiveIndex`), a FAISS-backed collection
search, or a test. :func:`guideline_passages` looks up guideline / textbook passages for the
top candidate diagnoses in a knowledge search callable (RAD's idea), with citation keys.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from caselens.errors import AdaptationError, AdapterMismatchError, BadVectorError
from caselens.files import atomic_write_bytes
from caselens.indexes.adapter import Adapter, save_adapter
from caselens.indexes.collection import Collection
from caselens.indexes.reader import reader_of
from caselens.retrieval.adaptation.collection import PATIENT_COLUMN, collection_adapter, fit_collection, read_labelled
from caselens.retrieval.adaptation.fit import AUTO, AdapterReport
from caselens.retrieval.calibration import (Calibrator, choose_calibrator, coverage_curve, expected_calibration_error,
                                            log_loss, threshold_for_precision)
from caselens.retrieval.rag.context import citation_key, item_kind, sanitize
from caselens.retrieval.search import hits_for_rows, predicate, prepare_query, search

VOTE_K = (3, 5, 7, 10, 15, 20, 30, 50, 75, 100)
VOTE_TEMPERATURE = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, math.inf)  # cosine units; inf: equal votes
SMOOTHING = 0.02  # share of the class prior mixed into every vote
TARGET_PRECISION = 0.9
MODEL_FILE = "diagnosis.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Neighbour:
    """One archive case returned by a search, as diagnosis needs it."""

    id: str
    score: float  # similarity in the searched space (cosine of unit vectors)
    label: str | None  # None: unlabelled (does not vote)
    patient: str | None = None  # patient pseudonym, when known
    metadata: dict[str, Any] = field(default_factory=dict)


# search(query unit vector, k, patient to exclude or None) -> neighbours, most similar first
SearchFn = Callable[[np.ndarray, int, "str | None"], Sequence[Neighbour]]


class ArchiveIndex:
    """Exact cosine search over arrays of (already adapted) unit vectors: a :data:`SearchFn`."""

    def __init__(self, vectors: np.ndarray, ids: Sequence[str], labels: Sequence[str | None],
                 patients: Sequence[str | None] | None = None, metadata: Sequence[dict[str, Any]] | None = None):
        self.vectors = np.asarray(vectors, np.float32)
        if self.vectors.ndim != 2 or len(self.vectors) != len(ids) or len(ids) != len(labels):
            raise BadVectorError(f"archive: {len(ids)} ids and {len(labels)} labels for vectors of shape "
                                 f"{self.vectors.shape}")
        self.ids = list(ids)
        self.labels = list(labels)
        self.patients = list(patients) if patients is not None else [None] * len(self.ids)
        self.metadata = list(metadata) if metadata is not None else [{} for _ in self.ids]

    @classmethod
    def from_collection(cls, collection: Collection, label_column: str = "label", adapter: Adapter | None = None,
                        group_column: str | None = PATIENT_COLUMN, metadata_columns: tuple[str, ...] = ()) -> "ArchiveIndex":
        """An exact index of ``collection``'s items in the space ``adapter`` maps to (raw, re-normalised,
        without one): a :data:`SearchFn` that needs no FAISS index."""
        data = read_labelled(collection, label_column, group_column, extra_columns=metadata_columns)
        if adapter is not None:
            adapter.check_encoder(data.encoder_fingerprint)
            vectors = adapter.apply(data.vectors)
        else:
            vectors = data.vectors / np.maximum(np.linalg.norm(data.vectors, axis=1, keepdims=True), 1e-12)
        meta = [{c: data.metadata[c][i] for c in data.metadata} for i in range(len(data.ids))]
        return cls(vectors, data.ids, data.labels, data.groups, meta)

    def __call__(self, vector: np.ndarray, k: int, exclude_patient: str | None = None) -> list[Neighbour]:
        sims = self.vectors @ np.asarray(vector, np.float32).reshape(-1)
        if exclude_patient is not None:
            sims = np.where(np.array([p == exclude_patient for p in self.patients]), -np.inf, sims)
        k = min(k, len(sims))
        top = np.argsort(-sims, kind="stable")[:k]
        return [Neighbour(self.ids[i], float(sims[i]), self.labels[i], self.patients[i], self.metadata[i])
                for i in top if np.isfinite(sims[i])]


def vote(neighbour_classes: np.ndarray, similarities: np.ndarray, n_classes: int, k: int, temperature: float,
         prior: np.ndarray, smoothing: float = SMOOTHING) -> np.ndarray:
    """Class probabilities (items x classes) from each item's neighbours: class indices
    (-1: no neighbour / unlabelled) and similarities, best first; the first ``k`` usable ones vote
    with weights softmax(similarity / temperature) (equal weights when temperature is inf)."""
    cls = np.asarray(neighbour_classes)
    sims = np.asarray(similarities, np.float64)
    n = len(cls)
    out = np.zeros((n, n_classes))
    usable = cls >= 0
    rank = np.cumsum(usable, axis=1)
    use = usable & (rank <= k)
    if math.isinf(temperature):
        w = use.astype(np.float64)
    else:
        z = np.where(use, sims / temperature, -np.inf)
        zmax = np.max(np.where(use, z, -np.inf), axis=1, keepdims=True)
        zmax = np.where(np.isfinite(zmax), zmax, 0.0)
        w = np.where(use, np.exp(z - zmax), 0.0)
    total = w.sum(1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
    rows = np.repeat(np.arange(n), cls.shape[1]).reshape(cls.shape)
    np.add.at(out, (rows[use], cls[use]), w[use])
    empty = total[:, 0] <= 0
    out[empty] = prior
    return (1.0 - smoothing) * out + smoothing * np.asarray(prior)[None, :]


@dataclass
class DiagnosisModel:
    """The settings diagnosis votes and calibrates with, fitted on an archive; JSON-able."""

    classes: list[str]
    k: int
    temperature: float  # math.inf: equal votes
    prior: list[float]  # class shares among the labelled archive items
    calibrator: Calibrator
    threshold: float | None  # abstain below this calibrated confidence (None: no threshold reaches the target)
    target_precision: float
    smoothing: float = SMOOTHING
    label_column: str = "label"
    adapter_fingerprint: str | None = None  # the adapter of the searched space (None: raw vectors)
    encoder_fingerprint: str | None = None
    table_version: int | None = None
    n_labelled: int = 0
    cv: dict[str, Any] = field(default_factory=dict)  # how k, temperature and calibrator were chosen
    fitted: str = ""

    def __post_init__(self) -> None:
        if len(self.classes) < 2 or len(self.prior) != len(self.classes):
            raise AdaptationError("a diagnosis model needs at least two classes and one prior per class")
        if self.k < 1 or not (self.temperature > 0):
            raise AdaptationError(f"diagnosis k must be >= 1 and temperature > 0, got {self.k}, {self.temperature}")

    def class_index(self, labels: Sequence[str | None]) -> np.ndarray:
        where = {c: i for i, c in enumerate(self.classes)}
        return np.array([where.get(v, -1) if v is not None else -1 for v in labels], np.int64)

    def probabilities(self, neighbour_classes: np.ndarray, similarities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(voted, calibrated) probabilities for neighbour class indices and similarities."""
        raw = vote(neighbour_classes, similarities, len(self.classes), self.k, self.temperature,
                   np.asarray(self.prior), self.smoothing)
        return raw, self.calibrator.apply(raw)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["calibrator"] = self.calibrator.to_dict()
        out["temperature"] = None if math.isinf(self.temperature) else self.temperature
        out["format_version"] = FORMAT_VERSION
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DiagnosisModel":
        data = dict(data)
        if data.pop("format_version", None) != FORMAT_VERSION:
            raise AdaptationError(f"diagnosis model is not of format {FORMAT_VERSION}; fit it again")
        data["calibrator"] = Calibrator.from_dict(data.get("calibrator") or {})
        data["temperature"] = math.inf if data.get("temperature") is None else float(data["temperature"])
        return cls(**data)

    def save(self, folder: str | Path) -> Path:
        """Write the model as ``diagnosis.json`` in ``folder`` (atomically)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / MODEL_FILE
        atomic_write_bytes(path, json.dumps(self.to_dict(), indent=2, sort_keys=True).encode())
        return path

    @classmethod
    def load(cls, folder: str | Path) -> "DiagnosisModel | None":
        """The model saved in ``folder``, or None."""
        path = Path(folder) / MODEL_FILE
        if not path.is_file():
            return None
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise AdaptationError(f"diagnosis model {path} cannot be read ({exc}); fit it again") from None


def fit_diagnosis(labels: Sequence[str], neighbours: np.ndarray, similarities: np.ndarray, folds: np.ndarray, *,
                  target_precision: float = TARGET_PRECISION, ks: Sequence[int] = VOTE_K,
                  temperatures: Sequence[float] = VOTE_TEMPERATURE, smoothing: float = SMOOTHING,
                  **provenance: Any) -> tuple[DiagnosisModel, dict[str, np.ndarray]]:
    """Choose k, temperature, calibrator and threshold from out-of-fold neighbours.

    ``labels``: the labelled archive items; ``neighbours``/``similarities``: for each, its nearest
    archive items (indices into ``labels``, -1: none) found among the *other* folds' items, in the
    searched space, best first; ``folds``: the fold of each item (calibrators are chosen by the
    same folds). Returns the model and its out-of-fold predictions ("raw", "calibrated": items x
    classes, calibrated ones by calibrators fitted without the item's fold; "truth")."""
    labels = np.asarray([str(v) for v in labels], dtype=object)
    classes = sorted(set(labels.tolist()))
    if len(classes) < 2:
        raise AdaptationError(f"diagnosis needs labelled cases of at least two classes, found {len(classes)}")
    where = {c: i for i, c in enumerate(classes)}
    truth = np.array([where[v] for v in labels])
    prior = np.bincount(truth, minlength=len(classes)) / len(truth)
    nb = np.asarray(neighbours)
    nb_classes = np.where(nb >= 0, truth[np.maximum(nb, 0)], -1)
    depth = nb.shape[1]
    table: dict[str, float] = {}
    best = None
    for k in [k for k in ks if k <= depth] or [depth]:
        for t in temperatures:
            p = vote(nb_classes, similarities, len(classes), k, t, prior, smoothing)
            loss = log_loss(p, truth)
            table[f"k={k},t={'inf' if math.isinf(t) else t}"] = round(loss, 5)
            if best is None or loss < best[0] - 1e-12:
                best = (loss, k, t, p)
    _, k, t, raw = best
    calibrator, cal_scores, oof = choose_calibrator(raw, truth, folds)
    calibrated = oof[calibrator.kind]
    conf = calibrated.max(1)
    correct = calibrated.argmax(1) == truth
    threshold, coverage = threshold_for_precision(conf, correct, target_precision)
    cv = {"log_loss": table, "chosen": {"k": k, "temperature": None if math.isinf(t) else t},
          "calibrators": cal_scores, "chosen_calibrator": calibrator.kind,
          "ece_before": round(expected_calibration_error(raw, truth), 5),
          "ece_after": round(expected_calibration_error(calibrated, truth), 5),
          "accuracy": round(float((raw.argmax(1) == truth).mean()), 5),
          "coverage_at_threshold": round(coverage, 5),
          "coverage_curve": coverage_curve(conf, correct)}
    model = DiagnosisModel(classes=classes, k=int(k), temperature=float(t), prior=prior.round(6).tolist(),
                           calibrator=calibrator, threshold=threshold, target_precision=target_precision,
                           smoothing=smoothing, n_labelled=len(labels), cv=cv,
                           fitted=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **provenance)
    return model, {"raw": raw, "calibrated": calibrated, "truth": truth}


@dataclass(frozen=True)
class SupportingCase:
    """An archive case behind a diagnosis."""

    key: str  # citation key, "case:<id>"
    id: str
    label: str | None
    similarity: float
    weight: float  # its share of the vote (0 for cases beyond k or unlabelled)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GuidelinePassage:
    """A knowledge passage retrieved for a candidate diagnosis (or the case's report)."""

    key: str  # citation key in the style of caselens.retrieval.rag.context ("page:doc#p3", "doc:…")
    id: str
    text: str  # sanitised
    score: float
    candidates: tuple[str, ...]  # the candidate diagnoses (or "report") it was retrieved for
    source: str | None = None
    collection: str | None = None  # the knowledge collection it came from


@dataclass
class Diagnosis:
    """Calibrated label probabilities for one query, the decision, and what it rests on."""

    label: str | None  # the diagnosis; None when abstained
    top_label: str  # the most probable label (given even when abstaining)
    confidence: float  # calibrated probability of top_label
    abstained: bool
    reason: str  # one sentence on the decision
    probabilities: dict[str, float]  # calibrated, most probable first
    uncalibrated: dict[str, float]  # the vote before calibration
    supporting: list[SupportingCase]
    threshold: float | None
    k: int
    temperature: float | None
    passages: list[GuidelinePassage] = field(default_factory=list)

    def candidates(self, n: int = 3, min_probability: float = 0.05) -> list[str]:
        """The ``n`` most probable labels with at least ``min_probability`` (the top one always)."""
        out = [c for c, p in self.probabilities.items() if p >= min_probability][:n]
        return out or [self.top_label]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def diagnose(query: np.ndarray, search: SearchFn, model: DiagnosisModel, *, query_patient: str | None = None,
             query_id: str | None = None, min_confidence: float | None = None, supporting: int | None = None) -> Diagnosis:
    """Diagnose one query vector (in the searched space: adapted when the archive is) from the
    cases ``search`` returns (see module docstring).

    ``query_patient``: the query's patient pseudonym (its cases are never used); ``query_id``: the
    query's own item id when it is in the archive (never used); ``min_confidence``: the
    abstention threshold instead of the model's; ``supporting``: how many cases to return
    (default: the model's k)."""
    q = np.asarray(query, np.float32).reshape(-1)
    if not np.isfinite(q).all():
        raise BadVectorError("the query vector holds NaN or infinite values")
    want = max(model.k, supporting or model.k)
    found = search(q, 2 * want + 10, query_patient)
    kept = [n for n in found if n.id != query_id and (query_patient is None or n.patient != query_patient)]
    labelled = [n for n in kept if n.label is not None and n.label in model.classes]
    voters = labelled[:model.k]
    cls = model.class_index([n.label for n in voters])[None, :]
    sims = np.array([[n.score for n in voters]], np.float64)
    if not voters:
        cls, sims = np.full((1, 1), -1), np.full((1, 1), -np.inf)
    raw, cal = model.probabilities(cls, sims)
    raw, cal = raw[0], cal[0]
    share = np.zeros(len(voters))  # each voter's share of the vote
    if voters:
        z = sims[0] / model.temperature if not math.isinf(model.temperature) else np.zeros(len(voters))
        share = np.exp(z - z.max())
        share = share / share.sum()
    top = int(np.argmax(cal))
    conf = float(cal[top])
    threshold = min_confidence if min_confidence is not None else model.threshold
    if not voters:
        abstained, reason = True, "no labelled archive case outside the query's patient was found"
    elif threshold is None:
        abstained = True
        reason = (f"no confidence threshold reached {model.target_precision:.0%} precision on the archive; "
                  f"confidence {conf:.2f} is reported but not acted on")
    elif conf < threshold:
        abstained, reason = True, f"confidence {conf:.2f} is below the threshold {threshold:.2f}"
    else:
        abstained, reason = False, f"confidence {conf:.2f} is at or above the threshold {threshold:.2f}"
    n_support = supporting or model.k
    weight_of = {n.id: float(w) for n, w in zip(voters, share)}
    cases = [SupportingCase(key=f"case:{n.id}", id=n.id, label=n.label, similarity=round(float(n.score), 6),
                            weight=round(weight_of.get(n.id, 0.0), 6), metadata=dict(n.metadata))
             for n in kept[:n_support]]
    order = np.argsort(-cal, kind="stable")
    return Diagnosis(label=None if abstained else model.classes[top], top_label=model.classes[top],
                     confidence=round(conf, 6), abstained=abstained, reason=reason,
                     probabilities={model.classes[i]: round(float(cal[i]), 6) for i in order},
                     uncalibrated={model.classes[i]: round(float(raw[i]), 6) for i in np.argsort(-raw, kind="stable")},
                     supporting=cases, threshold=threshold, k=model.k,
                     temperature=None if math.isinf(model.temperature) else model.temperature)


def guideline_passages(candidates: Sequence[str], search_text: Callable[[str, int], Sequence[Any]], *, k: int = 3,
                       report_text: str | None = None, template: str = "{label}") -> list[GuidelinePassage]:
    """Knowledge passages for each candidate diagnosis (and, given, the case's report text).

    ``search_text(query, k)`` returns search hits of a knowledge collection (objects with ``id``,
    ``kind``, ``text``, ``score``, ``source``, ``provenance``, like
    :class:`caselens.retrieval.search.Hit`). Each candidate label (underscores read as spaces) is
    put in ``template`` and looked up; passages found for several candidates are listed once,
    with all of them, best score kept, best first."""
    queries = [(c, template.format(label=str(c).replace("_", " "))) for c in candidates]
    if report_text and report_text.strip():
        queries.append(("report", report_text.strip()))
    found: dict[str, dict[str, Any]] = {}
    for candidate, text in queries:
        for hit in search_text(text, k):
            key = citation_key(item_kind(hit), hit)
            entry = found.setdefault(key, {"key": key, "id": str(hit.id), "text": sanitize(hit.text or ""),
                                           "score": float(hit.score), "candidates": [], "source": hit.source})
            entry["score"] = max(entry["score"], float(hit.score))
            if candidate not in entry["candidates"]:
                entry["candidates"].append(candidate)
    out = [GuidelinePassage(key=e["key"], id=e["id"], text=e["text"], score=round(e["score"], 6),
                            candidates=tuple(e["candidates"]), source=e["source"]) for e in found.values()]
    return sorted(out, key=lambda p: -p.score)


def fit_collection_diagnosis(collection: Collection, label_column: str = "label", method: str = AUTO, folds: int = 5,
                             *, group_column: str | None = PATIENT_COLUMN, seed: int = 0, k: int = 10,
                             target_precision: float = TARGET_PRECISION, depth: int = max(VOTE_K), save: bool = False,
                             progress: Callable[[str], None] | None = None
                             ) -> tuple[Adapter, DiagnosisModel, AdapterReport]:
    """Fit the adapter (as :func:`~caselens.retrieval.adaptation.collection.fit_collection_adapter`)
    and the diagnosis model on its cross-validation's out-of-fold neighbours, in one pass. With
    ``save``: both written to ``<collection>/adapter/`` (``adapter.json`` + arrays, ``diagnosis.json``).
    The model names the adapter it was fitted with; :func:`collection_diagnosis` refuses it with
    another."""
    fit = fit_collection(collection, label_column, method, folds, group_column=group_column, seed=seed, k=k,
                         progress=progress, keep_neighbours=depth)
    nb, sims = fit.neighbours
    model, _ = fit_diagnosis(fit.labels, nb, sims, fit.folds, target_precision=target_precision,
                             label_column=label_column, adapter_fingerprint=fit.adapter.fingerprint,
                             encoder_fingerprint=fit.adapter.encoder_fingerprint,
                             table_version=fit.adapter.provenance.get("table_version"))
    if save:
        save_collection_diagnosis(collection, fit.adapter, model)
    return fit.adapter, model, fit.report


def save_collection_diagnosis(collection: Collection, adapter: Adapter, model: DiagnosisModel) -> Path:
    """Store ``adapter`` and the diagnosis ``model`` fitted with it in the collection's adapter
    folder (the adapter first; each file atomically) and return the folder."""
    folder = collection.layout.adapter_dir
    save_adapter(adapter, folder)
    model.save(folder)
    return folder


def collection_diagnosis(collection: Collection) -> tuple[Adapter | None, DiagnosisModel | None]:
    """The stored adapter and diagnosis model of ``collection`` (None for what is missing);
    :class:`~caselens.errors.AdapterMismatchError` when the model was fitted with another adapter
    (refit both with :func:`fit_collection_diagnosis`)."""
    adapter = collection_adapter(collection)
    model = DiagnosisModel.load(collection.layout.adapter_dir)
    if model is not None and model.adapter_fingerprint != (adapter.fingerprint if adapter else None):
        raise AdapterMismatchError(f"the diagnosis model of {collection.name!r} was fitted with adapter "
                                   f"{model.adapter_fingerprint}, the collection now has {adapter.fingerprint if adapter else 'none'}: "
                                   "fit the diagnosis model again")
    return adapter, model


def _label_of(hit: Any, label_column: str) -> str | None:
    value = hit.label if label_column == "label" else hit.metadata.get(label_column)
    return None if value is None or str(value).strip() == "" else str(value)


def diagnose_collection(collection: Collection, *, image: Any = None, item_id: str | None = None,
                        vector: np.ndarray | None = None, query_patient: str | None = None, k: int | None = None,
                        supporting: int | None = None, min_confidence: float | None = None,
                        knowledge: Sequence[Collection] = (), passages: int = 3) -> Diagnosis:
    """Diagnose one query (an image path, uploaded bytes or PIL image; a stored item's id; or a
    vector of the collection's encoder) from ``collection``'s similar cases, with the diagnosis
    model stored by :func:`fit_collection_diagnosis` (``caselens adapt``).

    The cases are found through the collection's reader (its FAISS index in the adapter's space,
    the rows since ranked exactly; never the write lock). The query's own item and every case of
    its patient (from the stored item, the DICOM file, or ``query_patient``, an unpseudonymised
    patient id) are left out. ``k`` overrides the model's number of voters. With ``knowledge`` (text
    collections), guideline passages for the top candidate labels come with citation keys.
    :class:`~caselens.errors.AdaptationError` when the collection has no diagnosis model."""
    _, model = collection_diagnosis(collection)
    if model is None:
        raise AdaptationError(f"collection {collection.name!r} has no diagnosis model; fit one with "
                              f"`caselens adapt {collection.name} --label-column LABEL` (Collection.adapt)")
    if k is not None:
        if k < 1:
            raise AdaptationError(f"k must be at least 1, got {k}")
        model = replace(model, k=int(k))
    view = reader_of(collection).view()
    snapshot = view.snapshot
    has_patient = PATIENT_COLUMN in snapshot.columns
    query = prepare_query(collection, view, image=image, item_id=item_id, vector=vector,
                          exclude_same=PATIENT_COLUMN if has_patient else None, query_patient=query_patient,
                          exclude_self=True, require_exclusion=False)
    patient = query.exclude.get(PATIENT_COLUMN)
    label_column = model.label_column

    def search_cases(vec: np.ndarray, n: int, exclude_patient: str | None) -> list[Neighbour]:
        exclude = {PATIENT_COLUMN: exclude_patient} if exclude_patient is not None and has_patient else None
        where = predicate(collection, snapshot, None, exclude, query.exclude_ids or None)
        found = view.rank_in_space(vec, n, snapshot.selection(where) if where else None)
        return [Neighbour(h.id, float(h.score), _label_of(h, label_column), h.metadata.get(PATIENT_COLUMN),
                          {**h.metadata, "source": h.source, "kind": h.kind})
                for h in hits_for_rows(snapshot, found)]

    q = view.space.apply(query.vector)[0]
    result = diagnose(q, search_cases, model, query_patient=patient, query_id=query.stored_id,
                      min_confidence=min_confidence, supporting=supporting)
    report = None  # the case's own report text, when the query is a stored item that has one (RAD's idea)
    row = snapshot.row_of(query.stored_id) if query.stored_id else None
    if row is not None:
        report = snapshot.row_dicts([row]).get(row, {}).get("text")
    found: list[GuidelinePassage] = []
    for kb in knowledge if passages > 0 else ():
        found += [replace(p, collection=kb.name) for p in guideline_passages(
            result.candidates(), lambda text, n, kb=kb: search(kb, text=text, k=n, mode="hybrid").hits, k=passages,
            report_text=report)]
    result.passages = sorted(found, key=lambda p: -p.score)
    return result

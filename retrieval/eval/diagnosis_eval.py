"""Diagnosis by similar cases, evaluated without leakage, with calibration and subgroup numbers.

Protocol (:mod:`caselens.retrieval.eval.adaptation_eval`): for each evaluation fold, the adapter
and the diagnosis model (k, temperature, calibrator, abstention threshold) are fitted on the
archive only (the other folds, less the queries' patients), by cross-validation inside it; then
every query of the fold is diagnosed from its nearest archive cases in the adapted space.

Reported over all queries: accuracy and balanced accuracy of the top label, macro one-vs-rest
ROC AUC, expected calibration error (15 bins) before and after calibration, log-loss, coverage
and accuracy at abstention thresholds, coverage at ``target_precision`` (the largest share that
can be answered at that accuracy, and what the archive-chosen thresholds achieved), per class,
and per subgroup (sex, age band, site, view, modality: whichever the collection has). With an
output folder: the JSON, a ROC plot per class and a reliability diagram (PNG).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from caselens.files import atomic_write_bytes
from caselens.indexes.collection import Collection
from caselens.retrieval.adaptation.collection import PATIENT_COLUMN, read_labelled
from caselens.retrieval.adaptation.fit import AUTO
from caselens.retrieval.adaptation.scoring import precision_at_k
from caselens.retrieval.calibration import (coverage_curve, expected_calibration_error, log_loss, macro_auc,
                                            reliability, roc_curve, threshold_for_precision)
from caselens.retrieval.diagnosis import TARGET_PRECISION, VOTE_K, fit_diagnosis
from caselens.retrieval.eval.adaptation_eval import labelled_rows, outer_folds

# Columns read as subgroups when a collection has them (first match per kind).
SUBGROUP_COLUMNS = {
    "sex": ("sex", "gender", "patient_sex"),
    "age_band": ("age_band", "age", "patient_age", "age_approx"),
    "site": ("site", "anatom_site_general", "anatom_site", "body_part", "institution_site"),
    "view": ("view", "view_position", "viewposition", "projection"),
    "modality": ("modality",),
}
AGE_BANDS = ((0, 18, "<18"), (18, 40, "18-39"), (40, 60, "40-59"), (60, 80, "60-79"), (80, 200, "80+"))
MIN_SUBGROUP = 10  # subgroups with fewer queries are listed but left out of the gaps


def age_band(value: object) -> str | None:
    """The band of an age in years ("18-39", ...), None when it is not a number."""
    try:
        age = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None if value in (None, "") else str(value)
    if math.isnan(age):
        return None
    for low, high, name in AGE_BANDS:
        if low <= age < high:
            return name
    return None


def _metrics(probs: np.ndarray, truth: np.ndarray, n_classes: int) -> dict[str, Any]:
    if len(truth) == 0:
        return {"n": 0}
    pred = probs.argmax(1)
    recalls = [float((pred[truth == c] == c).mean()) for c in range(n_classes) if (truth == c).any()]
    auc, _ = macro_auc(probs, truth)
    return {"n": int(len(truth)), "accuracy": round(float((pred == truth).mean()), 4),
            "balanced_accuracy": round(float(np.mean(recalls)), 4),
            "macro_auc": None if auc is None else round(auc, 4),
            "ece": round(expected_calibration_error(probs, truth), 4), "log_loss": round(log_loss(probs, truth), 4)}


@dataclass
class DiagnosisEval:
    """Cross-validated diagnosis quality (see module docstring)."""

    folds: int
    n_queries: int
    classes: list[str]
    target_precision: float
    overall: dict[str, Any]  # accuracy, balanced accuracy, macro AUC, ECE/log-loss before and after, P@k raw/adapted
    coverage: dict[str, Any]  # curves and coverage at the target precision
    per_class: dict[str, dict[str, Any]]
    subgroups: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # kind -> value -> metrics
    subgroup_gaps: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> max-min accuracy / AUC
    per_fold: list[dict[str, Any]] = field(default_factory=list)
    reliability: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    roc: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # class -> fpr, tpr (calibrated)
    files: list[str] = field(default_factory=list)
    collection: str | None = None
    encoder: str | None = None
    label_column: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def evaluate_diagnosis_arrays(vectors: np.ndarray, labels: Sequence[object], groups: Sequence[object] | None = None,
                              subgroups: dict[str, Sequence[object]] | None = None, *, folds: int = 5, seed: int = 0,
                              fold_ids: np.ndarray | None = None, method: str = AUTO, inner_folds: int = 5,
                              k: int = 10, depth: int = max(VOTE_K), target_precision: float = TARGET_PRECISION,
                              progress: Callable[[str], None] | None = None) -> DiagnosisEval:
    """Cross-validated diagnosis on the labelled rows of ``vectors`` (module docstring);
    ``subgroups``: kind -> one value per row (e.g. {"sex": [...]})."""
    x, y, g, given, mask = labelled_rows(vectors, labels, groups, fold_ids)
    classes = sorted(set(y.tolist()))
    where = {c: i for i, c in enumerate(classes)}
    truth = np.array([where[v] for v in y])
    n_cls = len(classes)
    raw_p = np.full((len(y), n_cls), np.nan)
    cal_p = np.full((len(y), n_cls), np.nan)
    answered = np.zeros(len(y), bool)
    p_raw = np.full(len(y), np.nan)
    p_adapted = np.full(len(y), np.nan)
    per_fold = []
    for of in outer_folds(x, y, g, folds=folds, seed=seed, fold_ids=given, method=method, inner_folds=inner_folds,
                          k=k, depth=depth, keep_neighbours=depth, progress=progress):
        fit = of.fit
        nb, sims = fit.neighbours
        model, _ = fit_diagnosis(fit.labels, nb, sims, fit.folds, target_precision=target_precision)
        q = of.queries
        nb_q, sims_q = of.adapted
        cls_q = model.class_index([None if i < 0 else y[i] for i in nb_q.reshape(-1)]).reshape(nb_q.shape)
        # map the model's class order (classes of the archive) onto the evaluation's
        r, c = model.probabilities(cls_q, sims_q)
        for j, name in enumerate(model.classes):
            raw_p[q, where[name]] = r[:, j]
            cal_p[q, where[name]] = c[:, j]
        missing = np.isnan(raw_p[q]).any(0)
        raw_p[np.ix_(q, np.flatnonzero(missing))] = 0.0  # a class absent from this archive: probability 0
        cal_p[np.ix_(q, np.flatnonzero(missing))] = 0.0
        conf = cal_p[q].max(1)
        answered[q] = conf >= model.threshold if model.threshold is not None else False
        p_raw[q] = precision_at_k(y[q], y, of.raw[0][:, :k])
        p_adapted[q] = precision_at_k(y[q], y, of.adapted[0][:, :k])
        per_fold.append({"fold": of.fold, "queries": len(q), "archive": len(of.archive), "adapter": fit.report.chosen,
                         "k": model.k, "temperature": None if math.isinf(model.temperature) else model.temperature,
                         "calibrator": model.calibrator.kind, "threshold": model.threshold,
                         "archive_oof_ece_before": model.cv["ece_before"], "archive_oof_ece_after": model.cv["ece_after"],
                         "accuracy": round(float((cal_p[q].argmax(1) == truth[q]).mean()), 4),
                         "fit_seconds": round(of.seconds, 2)})
    before = _metrics(raw_p, truth, n_cls)
    after = _metrics(cal_p, truth, n_cls)
    conf = cal_p.max(1)
    correct = cal_p.argmax(1) == truth
    best_threshold, best_coverage = threshold_for_precision(conf, correct, target_precision, min_answered=1)
    overall = {"accuracy": after["accuracy"], "balanced_accuracy": after["balanced_accuracy"],
               "macro_auc": after["macro_auc"], "macro_auc_uncalibrated": before["macro_auc"],
               "ece_before": before["ece"], "ece_after": after["ece"],
               "log_loss_before": before["log_loss"], "log_loss_after": after["log_loss"],
               f"p@{k}_raw": round(float(np.nanmean(p_raw)), 4), f"p@{k}_adapted": round(float(np.nanmean(p_adapted)), 4),
               "chance_accuracy": round(float(np.bincount(truth).max() / len(truth)), 4)}
    coverage = {"curve": coverage_curve(conf, correct),
                f"coverage_at_{target_precision:g}_precision": round(best_coverage, 4) if best_threshold is not None else None,
                "threshold_for_it": best_threshold,
                "archive_thresholds": {"answered": round(float(answered.mean()), 4),
                                       "accuracy_on_answered": round(float(correct[answered].mean()), 4) if answered.any() else None}}
    _, auc_per = macro_auc(cal_p, truth)
    per_class = {}
    for i, c in enumerate(classes):
        sel = truth == i
        pred_c = cal_p.argmax(1) == i
        per_class[c] = {"n": int(sel.sum()), "recall": round(float(pred_c[sel].mean()), 4),
                        "precision": round(float(sel[pred_c].mean()), 4) if pred_c.any() else None,
                        "auc": None if auc_per[i] is None else round(auc_per[i], 4),
                        f"p@{k}_raw": round(float(np.nanmean(p_raw[sel])), 4),
                        f"p@{k}_adapted": round(float(np.nanmean(p_adapted[sel])), 4)}
    sub_out: dict[str, dict[str, dict[str, Any]]] = {}
    gaps: dict[str, dict[str, float]] = {}
    for kind, values in (subgroups or {}).items():
        vals = np.asarray(values, dtype=object)[mask]
        vals = np.array([age_band(v) if kind == "age_band" else (None if v in (None, "") else str(v)) for v in vals],
                        dtype=object)
        table = {}
        for value in sorted({v for v in vals if v is not None}):
            sel = vals == value
            m = _metrics(cal_p[sel], truth[sel], n_cls)
            m[f"p@{k}_adapted"] = round(float(np.nanmean(p_adapted[sel])), 4)
            table[value] = m
        if table:
            sub_out[kind] = table
            big = [m for m in table.values() if m["n"] >= MIN_SUBGROUP]
            if len(big) >= 2:
                gaps[kind] = {"accuracy": round(max(m["accuracy"] for m in big) - min(m["accuracy"] for m in big), 4)}
                aucs = [m["macro_auc"] for m in big if m.get("macro_auc") is not None]
                if len(aucs) >= 2:
                    gaps[kind]["macro_auc"] = round(max(aucs) - min(aucs), 4)
    roc = {}
    for i, c in enumerate(classes):
        if 0 < (truth == i).sum() < len(truth):
            fpr, tpr = roc_curve(cal_p[:, i], truth == i)
            roc[c] = {"fpr": fpr.round(4).tolist(), "tpr": tpr.round(4).tolist()}
    return DiagnosisEval(folds=len(per_fold), n_queries=len(y), classes=classes, target_precision=target_precision,
                         overall=overall, coverage=coverage, per_class=per_class, subgroups=sub_out,
                         subgroup_gaps=gaps, per_fold=per_fold,
                         reliability={"before": reliability(raw_p, truth), "after": reliability(cal_p, truth)}, roc=roc)


def subgroup_columns(columns: Sequence[str]) -> dict[str, str]:
    """kind -> the collection column read for it (first of :data:`SUBGROUP_COLUMNS` present)."""
    out = {}
    for kind, names in SUBGROUP_COLUMNS.items():
        for name in names:
            if name in columns:
                out[kind] = name
                break
    return out


def evaluate_diagnosis(collection: Collection, label_column: str = "label", folds: int = 5, *,
                       method: str = AUTO, group_column: str | None = PATIENT_COLUMN,
                       subgroups: dict[str, str] | None = None, seed: int = 0, inner_folds: int = 5, k: int = 10,
                       target_precision: float = TARGET_PRECISION, out_dir: str | Path | None = None,
                       progress: Callable[[str], None] | None = None) -> DiagnosisEval:
    """:func:`evaluate_diagnosis_arrays` on ``collection`` (what ``caselens eval diagnosis
    COLLECTION --label-column L --folds 5`` reports). ``subgroups``: kind -> column (default:
    :func:`subgroup_columns` of the collection's columns). With ``out_dir``: writes
    ``diagnosis_eval.json``, ``diagnosis_eval_roc.png`` and ``diagnosis_eval_reliability.png`` there."""
    columns = collection.rows(limit=1).column_names
    chosen = subgroups if subgroups is not None else subgroup_columns(
        [c for c in columns if c not in (label_column, group_column)])
    data = read_labelled(collection, label_column, group_column, extra_columns=tuple(chosen.values()))
    result = evaluate_diagnosis_arrays(
        data.vectors, data.labels, data.groups,
        {kind: data.metadata[col] for kind, col in chosen.items() if col in data.metadata},
        folds=folds, seed=seed, method=method, inner_folds=inner_folds, k=k, target_precision=target_precision,
        progress=progress)
    result.collection = collection.name
    result.encoder = str(collection.encoder.get("spec"))
    result.label_column = label_column
    if out_dir is not None:
        write_report(result, out_dir)
    return result


def write_report(result: DiagnosisEval, out_dir: str | Path, stem: str = "diagnosis_eval") -> list[Path]:
    """Write ``<stem>.json``, ``<stem>_roc.png`` (ROC per class) and ``<stem>_reliability.png``
    (reliability diagram before/after calibration) into ``out_dir``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    roc_path, rel_path, json_path = out / f"{stem}_roc.png", out / f"{stem}_reliability.png", out / f"{stem}.json"
    title = " / ".join(str(v) for v in (result.collection, result.label_column) if v) or "diagnosis"

    fig, ax = plt.subplots(figsize=(6, 5))
    for name, curve in result.roc.items():
        auc = result.per_class.get(name, {}).get("auc")
        ax.plot(curve["fpr"], curve["tpr"], label=f"{name} (AUC {auc:.2f})" if auc is not None else name)
    ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC per class, {title}")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _save(fig, roc_path)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    for key, style in (("before", "o--"), ("after", "s-")):
        pts = [(b["confidence"], b["accuracy"]) for b in result.reliability.get(key, []) if b["n"]]
        if pts:
            ece = result.overall.get(f"ece_{key}")
            ax.plot(*zip(*pts), style, label=f"{key} calibration (ECE {ece:.3f})")
    ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    ax.set(xlabel="stated confidence", ylabel="observed accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"Reliability, {title}")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    _save(fig, rel_path)
    plt.close(fig)

    result.files = [str(p) for p in (json_path, roc_path, rel_path)]
    atomic_write_bytes(json_path, result.to_json().encode())
    return [json_path, roc_path, rel_path]


def _save(fig: Any, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())

"""Diagnosis by similar cases on the shared labelled sets: accuracy, AUC, calibration, coverage, subgroups.

What it measures
----------------
For every set (``isic``, ``retinamnist``, ``breastmnist``, ``nih_cxr``, ``covid_cases``; label
``finding`` for the last) and encoder (default ``concat3``: classic + both MobileNets), on the
collection that ``adapt_images.py`` / ``bench_sets.py`` ingest (reused when complete):
``evaluate_diagnosis_arrays`` with the baseline's folds (as ``adapt_images.py``). For each fold the
adapter (auto), k, vote temperature, calibrator and abstention threshold are chosen on the
archive alone (nested cross-validation; the queries' patients out of the archive), then every
query is diagnosed from its nearest archive cases. Reported: accuracy, balanced accuracy, macro
one-vs-rest ROC AUC, ECE (15 bins) before and after calibration (target <= 0.05), log-loss,
coverage vs accuracy at confidence thresholds, coverage at 90 % precision (best possible, and
with the thresholds each fold's archive chose), per class, and per subgroup where the data has
the columns (covid_cases: sex, age band, view, modality).

Writes ``benchmarks/results/diagnosis.json`` (summary + results without the ROC curves) and, per
set and encoder, ``benchmarks/results/diagnosis/<set>-<encoder>{.json,_roc.png,_reliability.png}``. Rerun::

    nice -n 10 .venv/bin/python benchmarks/diagnosis.py
    nice -n 10 .venv/bin/python benchmarks/diagnosis.py --datasets covid_cases --encoders mnv3 concat3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapt_images import baseline_folds  # noqa: E402
from bench_sets import (DATASETS, DEFAULT_DATA_ROOT, DEFAULT_HOME, DEFAULT_MODELS_ROOT, ENCODERS,  # noqa: E402
                        data_sets, encoder_choices, ensure_collection, machine_info)

from caselens.indexes.collection import Collection  # noqa: E402
from caselens.retrieval.adaptation.collection import read_labelled  # noqa: E402
from caselens.retrieval.eval.diagnosis_eval import (evaluate_diagnosis_arrays, subgroup_columns,  # noqa: E402
                                                    write_report)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "diagnosis.json"
ECE_TARGET = 0.05


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", type=Path, default=DEFAULT_HOME)
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--models-root", type=Path, default=DEFAULT_MODELS_ROOT)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--encoders", nargs="+", default=["concat3"], choices=ENCODERS)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--inner-folds", type=int, default=5)
    p.add_argument("--target-precision", type=float, default=0.9)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    started = time.perf_counter()
    plots = args.out.parent / "diagnosis"
    out: dict[str, Any] = {"benchmark": "diagnosis", "timestamp": datetime.now(timezone.utc).isoformat(),
                           "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                           "machine": machine_info(), "home": str(args.home), "folds": args.folds,
                           "inner_folds": args.inner_folds, "ece_target": ECE_TARGET, "summary": {}, "results": {}}
    if args.out.exists():  # keep results of sets not rerun now
        try:
            old = json.loads(args.out.read_text())
            out["summary"], out["results"] = old.get("summary", {}), old.get("results", {})
        except (OSError, json.JSONDecodeError):
            pass
    choices = encoder_choices(args.models_root)
    for data in data_sets(args.data_root, args.datasets):
        for key in args.encoders:
            name = ensure_collection(args.home, data, choices[key])["collection"]
            col = Collection.open(name, args.home)
            columns = col.rows(limit=1).column_names
            chosen = subgroup_columns([c for c in columns if c not in (data.label_column, "patient_id")])
            lv = read_labelled(col, data.label_column, "patient_id", extra_columns=("source", *chosen.values()))
            t = time.perf_counter()
            res = evaluate_diagnosis_arrays(
                lv.vectors, lv.labels, lv.groups, {kind: lv.metadata[c] for kind, c in chosen.items()},
                fold_ids=baseline_folds(lv.metadata["source"], args.folds), inner_folds=args.inner_folds,
                target_precision=args.target_precision,
                progress=lambda m: print(f"  {data.name}/{key}: {m}", flush=True))
            res.collection, res.encoder, res.label_column = name, str(col.encoder["spec"]), data.label_column
            write_report(res, plots, stem=name)
            o, cov = res.overall, res.coverage
            summary = {"n": res.n_queries, "classes": len(res.classes), "accuracy": o["accuracy"],
                       "balanced_accuracy": o["balanced_accuracy"], "chance_accuracy": o["chance_accuracy"],
                       "macro_auc": o["macro_auc"], "ece_before": o["ece_before"], "ece_after": o["ece_after"],
                       "ece_target_met": o["ece_after"] <= ECE_TARGET,
                       f"coverage_at_{args.target_precision:g}_precision":
                           cov[f"coverage_at_{args.target_precision:g}_precision"],
                       "archive_thresholds": cov["archive_thresholds"], "p@10_raw": o["p@10_raw"],
                       "p@10_adapted": o["p@10_adapted"], "subgroup_gaps": res.subgroup_gaps,
                       "calibrators": [f["calibrator"] for f in res.per_fold], "k": [f["k"] for f in res.per_fold],
                       "seconds": round(time.perf_counter() - t, 1)}
            out["summary"][f"{data.name}/{key}"] = summary
            full = res.to_dict()
            full.pop("roc")  # the curves are in the set's own JSON beside its plots
            out["results"][f"{data.name}/{key}"] = full
            print(f"{data.name}/{key}: {json.dumps(summary)}", flush=True)
            out["elapsed_seconds"] = round(time.perf_counter() - started, 1)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} and plots in {plots}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

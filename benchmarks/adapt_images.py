"""Collection adaptation on the shared labelled sets: 5-fold P@10 raw vs adapted, beside the baseline.

What it measures
----------------
For every set (``isic``, ``retinamnist``, ``breastmnist``, ``nih_cxr``, ``covid_cases``; label
column ``finding`` for the last) and encoder (``classic``, MobileNetV2, MobileNetV3 and
``concat3``, the ``concat`` encoder of all three), one collection is ingested into a caselens
home outside the repository (reused when complete; see ``bench_sets.py``), then:

1. ``evaluate_adaptation_arrays`` on the collection's vectors, labels and patients with the
   *baseline's folds* (``../shared/baselines/adapter_baseline.py``: items sorted by source,
   ``default_rng(0).permutation``, 5 parts), so both score the same queries. For each fold the
   adapter is chosen (``--method auto``: raw, PCA whitening or shrinkage LDA, settings by nested
   5-fold cross-validation on the archive alone) and fitted on the archive (the other folds,
   less every item of the queries' patients: out of the fit and the ranking); P@10 by exact
   cosine. ``lda`` and ``whiten`` are also reported with the settings their own inner
   cross-validation chose.
2. The baseline script itself on the same collections (raw, whitening, LDA with its fixed
   settings). Its folds are not patient-disjoint for ``nih_cxr``/``covid_cases`` (it only drops
   same-patient items from the ranking), so there our archive is the smaller one.
3. Time to fit an adapter on ``isic`` (1,963 items) per encoder (``auto`` and ``lda``), and the
   search latency of one query: FAISS exact inner product over raw vectors vs adapter applied to
   the query + search over adapted vectors.

Writes ``benchmarks/results/adapt_images.json`` after every collection (the machine is shared:
timings are noisy, the load average is recorded). Rerun::

    nice -n 10 .venv/bin/python benchmarks/adapt_images.py                      # everything (1-2 h on 2 busy cores)
    nice -n 10 .venv/bin/python benchmarks/adapt_images.py --datasets isic --encoders mnv3 concat3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sets import (DATASETS, DEFAULT_DATA_ROOT, DEFAULT_HOME, DEFAULT_MODELS_ROOT, ENCODERS,  # noqa: E402
                        collection_name, data_sets, encoder_choices, ensure_collection, machine_info)

from caselens.indexes.collection import Collection  # noqa: E402
from caselens.retrieval.adaptation.collection import fit_collection_adapter, read_labelled  # noqa: E402
from caselens.retrieval.eval.adaptation_eval import evaluate_adaptation_arrays  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "adapt_images.json"
DEFAULT_BASELINE = REPO_ROOT.parent / "shared" / "baselines" / "adapter_baseline.py"
ISSUE_BASELINE = {"isic/mnv3": 0.619, "isic/concat3": 0.672, "retinamnist/mnv3": 0.504}  # quoted in issue 10


def baseline_folds(sources: list[str], folds: int = 5, seed: int = 0) -> np.ndarray:
    """The fold of each item as ``adapter_baseline.py`` makes them (sorted by source, permuted)."""
    order = np.argsort(np.array(sources))
    perm = np.random.default_rng(seed).permutation(len(sources))
    out = np.empty(len(sources), np.int64)
    for f, part in enumerate(np.array_split(perm, folds)):
        out[order[part]] = f
    return out


def run_baseline(script: Path, home: Path, names: dict[str, str], label_column: str) -> dict[str, Any]:
    """The baseline script's numbers for {key: collection name} (one run of the script)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "baseline.json"
        args = [sys.executable, str(script), str(out)] + [f"{key}={home / name / 'lance'}" for key, name in names.items()]
        env = {**os.environ, "LABEL_COLUMN": label_column}
        proc = subprocess.run(args, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            return {"error": (proc.stderr or proc.stdout)[-2000:]}
        return json.loads(out.read_text())


def search_latency(vectors: np.ndarray, adapter: Any, queries: int = 300) -> dict[str, float]:
    """Milliseconds per query: FAISS exact search over raw vectors vs adapter + search over adapted."""
    import faiss

    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    raw = faiss.IndexFlatIP(x.shape[1])
    raw.add(x)
    adapted_vectors = adapter.apply(vectors)
    ad = faiss.IndexFlatIP(adapted_vectors.shape[1])
    ad.add(adapted_vectors)
    qs = vectors[:queries]
    t = time.perf_counter()
    for q in qs:
        raw.search(q[None, :] / np.linalg.norm(q), 10)
    raw_ms = (time.perf_counter() - t) / len(qs) * 1000
    t = time.perf_counter()
    for q in qs:
        ad.search(adapter.apply(q[None, :]), 10)
    ad_ms = (time.perf_counter() - t) / len(qs) * 1000
    return {"raw_ms": round(raw_ms, 4), "adapted_ms": round(ad_ms, 4), "raw_dim": int(x.shape[1]),
            "adapted_dim": int(adapted_vectors.shape[1]), "items": int(len(x))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", type=Path, default=DEFAULT_HOME)
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--models-root", type=Path, default=DEFAULT_MODELS_ROOT)
    p.add_argument("--baseline", type=Path, default=DEFAULT_BASELINE, help="adapter_baseline.py")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=ENCODERS)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--inner-folds", type=int, default=5)
    p.add_argument("--no-timing", action="store_true", help="skip the fit-time and latency measurement")
    p.add_argument("--timing-only", action="store_true", help="only the fit-time and latency measurement (ISIC)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    args.home.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    out: dict[str, Any] = {"benchmark": "adapt_images", "timestamp": datetime.now(timezone.utc).isoformat(),
                           "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                           "machine": machine_info(), "home": str(args.home), "folds": args.folds,
                           "inner_folds": args.inner_folds, "issue_baseline": ISSUE_BASELINE, "results": {},
                           "baseline": {}, "timing": {}}
    if args.out.exists():  # keep results of sets not rerun now
        try:
            old = json.loads(args.out.read_text())
            out["results"], out["baseline"], out["timing"] = old.get("results", {}), old.get("baseline", {}), old.get("timing", {})
        except (OSError, json.JSONDecodeError):
            pass
    choices = encoder_choices(args.models_root)

    def save() -> None:
        out["elapsed_seconds"] = round(time.perf_counter() - started, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))

    for data in data_sets(args.data_root, [] if args.timing_only else args.datasets):
        names = {}
        for key in args.encoders:
            info = ensure_collection(args.home, data, choices[key])
            names[key] = info["collection"]
            col = Collection.open(names[key], args.home)
            lv = read_labelled(col, data.label_column, "patient_id", extra_columns=("source",))
            folds = baseline_folds(lv.metadata["source"], args.folds)
            t = time.perf_counter()
            res = evaluate_adaptation_arrays(lv.vectors, lv.labels, lv.groups, fold_ids=folds,
                                             inner_folds=args.inner_folds,
                                             progress=lambda m: print(f"  {data.name}/{key}: {m}", flush=True))
            record = res.to_dict()
            record.update({"collection": names[key], "encoder_spec": col.encoder["spec"], "dim": int(col.encoder["dim"]),
                           "patients": lv.groups is not None, "seconds": round(time.perf_counter() - t, 1)})
            out["results"][f"{data.name}/{key}"] = record
            print(f"{data.name}/{key}: raw {res.overall['raw']:.3f}  adapted {res.overall['adapted']:.3f}  "
                  f"lda {res.overall.get('lda', float('nan')):.3f}  chosen {[r['chosen'] for r in res.per_fold]}", flush=True)
            save()
        base = run_baseline(args.baseline, args.home, {f"{data.name}/{k}": n for k, n in names.items()}, data.label_column)
        out["baseline"].update(base if "error" not in base else {f"{data.name}/error": base["error"]})
        print(f"baseline {data.name}: {base}", flush=True)
        save()

    if not args.no_timing and "isic" in args.datasets:
        for key in args.encoders:
            col = Collection.open(collection_name("isic", key), args.home)
            timing: dict[str, Any] = {"items": col.count()}
            for method in ("auto", "lda"):
                t = time.perf_counter()
                adapter, report = fit_collection_adapter(col, "label", method)
                timing[f"fit_{method}_seconds"] = round(time.perf_counter() - t, 2)
                timing[f"fit_{method}_chosen"] = report.chosen
            lv = read_labelled(col, "label")
            timing["search"] = search_latency(lv.vectors, adapter)
            timing["load_average"] = list(os.getloadavg())
            out["timing"][f"isic/{key}"] = timing
            print(f"timing isic/{key}: {timing}", flush=True)
            save()
    save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

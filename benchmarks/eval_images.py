"""Leave-one-out image-to-image retrieval on the shared labelled image sets, per encoder.

What it measures
----------------
For every selected data set under ``<data-root>/images/<name>/manifest.csv`` (``nih_cxr``,
``isic``, ``retinamnist``, ``breastmnist``) and every selected encoder (``classic``: the
training-free descriptor; ``pixels``: the raw-pixel baseline; ``mobilenet_v2`` and
``mobilenet_v3``: the two ImageNet TFLite models in ``<models-root>``), the script

1. creates a fresh collection in a caselens home folder and ingests the manifest through the
   library (``ImageSource`` -> ``ingest``), timing the run (read + encode + write; the encoder's
   own time is measured separately, the FAISS index build too);
2. runs ``evaluate_retrieval``: every labelled image queries all the others (exact cosine
   ranking, so the numbers measure the encoder, not the ANN index) and P@1, P@10, mAP@10 and
   kNN@10 accuracy are averaged over queries. Data sets whose manifest has a ``patient_id``
   column (``nih_cxr``) are evaluated twice: plainly and with every image of the query's
   patient left out (``exclude_same="patient_id"``), which is the honest number;
3. writes everything (plus per-class metrics, accepted/duplicate/rejected counts, throughput,
   machine info and a timestamp) to ``benchmarks/results/eval_images.json`` and prints a table.

``chance_p@10`` is the expected P@10 of a random ranking (sum of squared class priors).
Do not tune on these numbers alone: the data README keeps test splits back for that.

Rerun
-----
From the repository root::

    .venv/bin/python benchmarks/eval_images.py                       # everything (5-15 min, 2 CPUs)
    .venv/bin/python benchmarks/eval_images.py --datasets nih_cxr breastmnist --encoders classic pixels
    .venv/bin/python benchmarks/eval_images.py --home /tmp/cl-bench --keep --out /tmp/eval.json

The data must be at ``../shared/data`` (or ``--data-root``) and the models at ``../shared/models``
(or ``--models-root``); neither is copied into the repository.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from caselens.files import atomic_write_bytes
from caselens.indexes import derived
from caselens.indexes.collection import Collection
from caselens.ingest.pipeline import IngestConfig, IngestReport, ingest
from caselens.ingest.sources.image_folder import ImageSource
from caselens.ingest.encoders import Encoder, load_encoder
from caselens.retrieval.eval.retrieval_eval import RetrievalEval, evaluate_retrieval
from harness import RESULTS, SHARED_DATA, SHARED_MODELS, machine_info

DEFAULT_DATA_ROOT = SHARED_DATA
DEFAULT_MODELS_ROOT = SHARED_MODELS
DEFAULT_OUT = RESULTS / "eval_images.json"
DATASETS = ("nih_cxr", "isic", "retinamnist", "breastmnist")
K = 10
LABEL_COLUMN = "label"
PATIENT_COLUMN = "patient_id"

# Wide enough for the summary table when the output goes to a log file.
console = Console() if sys.stdout.isatty() else Console(width=120)


@dataclass(frozen=True)
class EncoderChoice:
    """One encoder of the comparison: a short key, the registry spec and its options."""

    key: str  # short name used on the command line, in collection names and in the JSON
    spec: str  # name passed to load_encoder
    options: dict[str, str] = field(default_factory=dict)
    model_file: Path | None = None  # weights file that must exist, for model-file encoders


def encoder_choices(models_root: Path) -> dict[str, EncoderChoice]:
    """The encoders this benchmark knows, by key."""
    v2 = models_root / "mobilenet_v2_1.0_224_quant.tflite"
    v3 = models_root / "mobilenet_v3_small_075_224_embedder.tflite"
    return {
        "classic": EncoderChoice("classic", "classic"),
        "pixels": EncoderChoice("pixels", "pixels"),
        "mobilenet_v2": EncoderChoice("mobilenet_v2", f"tflite:{v2}", {"output": "MobilenetV2/Logits/AvgPool"}, v2),
        "mobilenet_v3": EncoderChoice("mobilenet_v3", f"tflite:{v3}", {}, v3),
    }


class TimedEncoder(Encoder):
    """Wraps an encoder and adds up the seconds spent in :meth:`encode_images`."""

    def __init__(self, inner: Encoder):
        self.inner = inner
        self.info = inner.info
        self.batch_size = inner.batch_size
        self.seconds = 0.0
        self.images = 0

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        start = time.perf_counter()
        out = self.inner.encode_images(images)
        self.seconds += time.perf_counter() - start
        self.images += len(images)
        return out

    def reset(self) -> None:
        self.seconds = 0.0
        self.images = 0


@dataclass
class Dataset:
    """One labelled image set: its manifest and whether it names patients."""

    name: str
    manifest: Path
    rows: int
    has_patients: bool


def find_datasets(data_root: Path, names: Sequence[str]) -> list[Dataset]:
    """The selected data sets under ``data_root/images``; exits naming any that is missing."""
    out: list[Dataset] = []
    for name in names:
        manifest = data_root / "images" / name / "manifest.csv"
        if not manifest.is_file():
            sys.exit(f"eval_images: {manifest} is missing; is --data-root {data_root} the shared data folder?")
        with manifest.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = list(reader.fieldnames or [])
            rows = sum(1 for _ in reader)
        if LABEL_COLUMN not in columns:
            sys.exit(f"eval_images: {manifest} has no {LABEL_COLUMN!r} column (columns: {columns})")
        out.append(Dataset(name, manifest, rows, PATIENT_COLUMN in columns))
    return out


def collection_name(dataset: str, encoder_key: str) -> str:
    return f"{dataset}-{encoder_key}"


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


def metrics_record(result: RetrievalEval) -> dict[str, Any]:
    """The numbers of one evaluation, flat, with the chance level beside them (6 decimals)."""
    return {
        "n_queries": result.n_queries,
        "n_unlabelled": result.n_unlabelled,
        "p@1": _round(result.overall.get("p@1")),
        f"p@{K}": _round(result.overall.get(f"p@{K}")),
        f"map@{K}": _round(result.overall.get(f"map@{K}")),
        f"knn@{K}": _round(result.overall.get(f"knn@{K}")),
        f"chance_p@{K}": _round(result.chance_p_at_k),
        "per_class": {c: {m: (int(v) if m == "n" else _round(v)) for m, v in vals.items()}
                      for c, vals in result.per_class.items()},
    }


def ingest_record(report: IngestReport, timed: TimedEncoder, load_seconds: float,
                  index_seconds: float | None) -> dict[str, Any]:
    """Counts and timings of one ingest run."""
    return {
        "accepted": report.accepted,
        "duplicates": report.duplicates,
        "rejected": sum(report.rejected.values()),
        "rejected_by_reason": dict(report.rejected),
        "total_items": report.total_items,
        "encoder_load_seconds": round(load_seconds, 3),
        "ingest_seconds": round(report.seconds, 3),  # read + decode + encode + write (no index)
        "images_per_s": round(report.accepted / report.seconds, 2) if report.seconds > 0 else None,
        "encode_seconds": round(timed.seconds, 3),  # inside encode_images only
        "encode_images_per_s": round(timed.images / timed.seconds, 2) if timed.seconds > 0 else None,
        "index_seconds": None if index_seconds is None else round(index_seconds, 3),
    }


def run_one(dataset: Dataset, choice: EncoderChoice, encoder: TimedEncoder, load_seconds: float,
            home: Path) -> list[dict[str, Any]]:
    """Ingest ``dataset`` with one encoder and evaluate it (plain, and per patient when possible)."""
    name = collection_name(dataset.name, choice.key)
    collection = Collection.create(name, encoder.info.to_record(), home)
    source = ImageSource(manifest=dataset.manifest, secret=collection.secret())
    encoder.reset()
    report = ingest(source, collection, encoder, IngestConfig(build_index=False, progress=False))
    start = time.perf_counter()
    derived.refresh(collection)
    index_seconds = time.perf_counter() - start
    ingested = ingest_record(report, encoder, load_seconds, index_seconds)

    base = {"dataset": dataset.name, "manifest": str(dataset.manifest), "manifest_rows": dataset.rows,
            "encoder": choice.key, "encoder_spec": encoder.info.spec, "encoder_options": encoder.info.options,
            "encoder_dim": encoder.info.dim, "encoder_fingerprint": encoder.info.fingerprint, "k": K}
    out: list[dict[str, Any]] = []
    for exclude in ([None, PATIENT_COLUMN] if dataset.has_patients else [None]):
        start = time.perf_counter()
        result = evaluate_retrieval(collection, LABEL_COLUMN, K, exclude)
        eval_seconds = time.perf_counter() - start
        out.append({**base, "exclude_same": exclude, **metrics_record(result), **ingested,
                    "eval_seconds": round(eval_seconds, 3), "error": None})
    return out


def error_record(dataset: Dataset, choice: EncoderChoice, stage: str, exc: BaseException) -> dict[str, Any]:
    return {"dataset": dataset.name, "manifest": str(dataset.manifest), "encoder": choice.key,
            "encoder_spec": choice.spec, "encoder_options": choice.options, "exclude_same": None,
            "error": {"stage": stage, "type": type(exc).__name__, "message": str(exc),
                      "traceback": traceback.format_exception(exc)}}


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically, so a partial file is never left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode())


def fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def results_table(results: list[dict[str, Any]]) -> Table:
    """Compact summary: one row per (dataset, encoder, exclude_same)."""
    table = Table(title=f"leave-one-out image retrieval (k={K})", pad_edge=False)
    for col in ("dataset", "encoder", "excl", "n", "P@1", f"P@{K}", f"mAP@{K}", f"kNN@{K}", "chance",
                "img/s", "acc/dup/rej"):
        table.add_column(col, justify="left" if col in ("dataset", "encoder", "excl") else "right", no_wrap=True)
    for r in results:
        if r.get("error"):
            table.add_row(r["dataset"], r["encoder"], "", "", "[red]error[/]", "", "", "", "", "",
                          f"[red]{r['error']['type']}[/]")
            continue
        table.add_row(r["dataset"], r["encoder"], "patient" if r["exclude_same"] else "", str(r["n_queries"]),
                      fmt(r["p@1"]), fmt(r[f"p@{K}"]), fmt(r[f"map@{K}"]), fmt(r[f"knn@{K}"]),
                      fmt(r[f"chance_p@{K}"]), fmt(r["images_per_s"], 1),
                      f"{r['accepted']}/{r['duplicates']}/{r['rejected']}")
    return table


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT,
                   help=f"shared data folder holding images/<set>/manifest.csv (default: {DEFAULT_DATA_ROOT})")
    p.add_argument("--models-root", type=Path, default=DEFAULT_MODELS_ROOT,
                   help=f"folder with the .tflite models (default: {DEFAULT_MODELS_ROOT})")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS, metavar="NAME",
                   help=f"data sets to run (default: all of {', '.join(DATASETS)})")
    p.add_argument("--encoders", nargs="+", default=["classic", "pixels", "mobilenet_v2", "mobilenet_v3"],
                   choices=["classic", "pixels", "mobilenet_v2", "mobilenet_v3"], metavar="KEY",
                   help="encoders to run (default: classic pixels mobilenet_v2 mobilenet_v3)")
    p.add_argument("--home", type=Path, help="caselens home for the collections (default: a temporary folder); "
                                             "must not already hold the collections this run creates")
    p.add_argument("--keep", action="store_true", help="keep the home folder (a temporary one is removed otherwise)")
    p.add_argument("--threads", type=int, default=0, help="TFLite interpreter threads (default 0: LiteRT's choice)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default: {DEFAULT_OUT})")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data_root = args.data_root.expanduser().resolve()
    if not (data_root / "images").is_dir():
        sys.exit(f"eval_images: shared data not found: {data_root}/images does not exist. "
                 "Pass --data-root (the folder described by shared/data/README.md).")
    datasets = find_datasets(data_root, list(dict.fromkeys(args.datasets)))
    choices = encoder_choices(args.models_root.expanduser().resolve())
    selected = [choices[k] for k in dict.fromkeys(args.encoders)]
    for c in selected:
        if c.model_file is not None and not c.model_file.is_file():
            sys.exit(f"eval_images: model file {c.model_file} for encoder {c.key!r} not found; pass --models-root "
                     f"or leave it out with --encoders")

    temp_home = args.home is None
    home = Path(tempfile.mkdtemp(prefix="caselens-eval-images-")) if temp_home else args.home.expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    clashes = [collection_name(d.name, c.key) for d in datasets for c in selected
               if Collection.exists(collection_name(d.name, c.key), home)]
    if clashes:
        sys.exit(f"eval_images: collections already exist in {home}: {', '.join(clashes)}; use an empty --home")

    out_path = args.out.expanduser().resolve()
    payload: dict[str, Any] = {
        "benchmark": "leave-one-out image-to-image retrieval",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": [Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)],
        "machine": machine_info(),
        "data_root": str(data_root),
        "home": str(home) if not temp_home or args.keep else None,
        "k": K,
        "label_column": LABEL_COLUMN,
        "results": [],
    }
    results: list[dict[str, Any]] = payload["results"]
    started = time.perf_counter()
    try:
        for choice in selected:
            options = dict(choice.options)
            if args.threads and choice.spec.startswith("tflite:"):
                options["threads"] = str(args.threads)
            try:
                start = time.perf_counter()
                encoder = TimedEncoder(load_encoder(choice.spec, options))
                load_seconds = time.perf_counter() - start
            except Exception as exc:  # noqa: BLE001 - recorded in the JSON and reported
                console.print(f"[red]loading encoder {choice.key} failed:[/] {type(exc).__name__}: {exc}")
                results.extend(error_record(d, choice, "load_encoder", exc) for d in datasets)
                write_json(out_path, payload)
                continue
            for dataset in datasets:
                console.print(f"{dataset.name} ({dataset.rows} images) x {choice.key} ...", end=" ")
                try:
                    rows = run_one(dataset, choice, encoder, load_seconds, home)
                except Exception as exc:  # noqa: BLE001 - one failure must not stop the comparison
                    console.print(f"[red]failed[/]: {type(exc).__name__}: {exc}")
                    results.append(error_record(dataset, choice, "ingest_or_eval", exc))
                else:
                    results.extend(rows)
                    r = rows[0]
                    console.print(f"P@{K} {r[f'p@{K}']:.3f}, mAP@{K} {r[f'map@{K}']:.3f}, "
                                  f"{r['images_per_s']:.1f} img/s, {r['accepted']} accepted, "
                                  f"{r['duplicates']} duplicates, {r['rejected']} rejected", highlight=False)
                payload["elapsed_seconds"] = round(time.perf_counter() - started, 1)
                write_json(out_path, payload)
    finally:
        payload["machine"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        payload["elapsed_seconds"] = round(time.perf_counter() - started, 1)
        write_json(out_path, payload)
        if temp_home and not args.keep:
            shutil.rmtree(home, ignore_errors=True)

    order = {d: i for i, d in enumerate(DATASETS)}
    enc_order = {c.key: i for i, c in enumerate(selected)}
    results_sorted = sorted(results, key=lambda r: (order.get(r["dataset"], 99), enc_order.get(r["encoder"], 99),
                                                    r.get("exclude_same") or ""))
    console.print(results_table(results_sorted))
    console.print(f"wrote {out_path}" + (f"; collections kept in {home}" if args.keep or not temp_home else ""))
    return 1 if any(r.get("error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

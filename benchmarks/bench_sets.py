"""The labelled sets and encoders that ``adapt_images.py`` and ``diagnosis.py`` measure, and the
ingest that fills one collection per (set, encoder) in a caselens home outside the repository.

Sets: ``../shared/data/images/{isic,retinamnist,breastmnist,nih_cxr}`` (label column ``label``) and
``../shared/data/cases/covid_cases`` (``cases.csv``, label column ``finding``). Encoders:
``classic``, the two TFLite MobileNets of ``../shared/models`` and ``concat3``, the ``concat``
encoder of all three. A collection already holding every row of its manifest is reused.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
DEFAULT_MODELS_ROOT = REPO_ROOT.parent / "shared" / "models"
DEFAULT_HOME = Path("/work/bench-home-adapt") if Path("/work").is_dir() else Path("/tmp/bench-home-adapt")
DATASETS = ("isic", "retinamnist", "breastmnist", "nih_cxr", "covid_cases")
ENCODERS = ("classic", "mnv2", "mnv3", "concat3")


@dataclass(frozen=True)
class DataSet:
    """One labelled set: its manifest, label column and the number of rows."""

    name: str
    manifest: Path
    label_column: str
    rows: int


@dataclass(frozen=True)
class EncoderChoice:
    """One encoder of the comparison: short key, registry spec and options."""

    key: str
    spec: str
    options: dict[str, Any] = field(default_factory=dict)


def data_sets(data_root: Path, names: Sequence[str]) -> list[DataSet]:
    """The selected sets under ``data_root``; exits naming any that is missing."""
    out = []
    for name in names:
        if name == "covid_cases":
            manifest, label = data_root / "cases" / "covid_cases" / "cases.csv", "finding"
        else:
            manifest, label = data_root / "images" / name / "manifest.csv", "label"
        if not manifest.is_file():
            sys.exit(f"{manifest} is missing; is --data-root {data_root} the shared data folder?")
        with manifest.open(newline="", encoding="utf-8-sig") as fh:
            rows = sum(1 for _ in csv.DictReader(fh))
        out.append(DataSet(name, manifest, label, rows))
    return out


def encoder_choices(models_root: Path) -> dict[str, EncoderChoice]:
    """The encoders by key (the MobileNets with the options of ../shared/models/README.md)."""
    v2 = f"tflite:{models_root / 'mobilenet_v2_1.0_224_quant.tflite'}"
    v3 = f"tflite:{models_root / 'mobilenet_v3_small_075_224_embedder.tflite'}"
    v2_opts = {"output": "MobilenetV2/Logits/AvgPool"}
    return {
        "classic": EncoderChoice("classic", "classic"),
        "mnv2": EncoderChoice("mnv2", v2, v2_opts),
        "mnv3": EncoderChoice("mnv3", v3),
        "concat3": EncoderChoice("concat3", "concat", {"parts": json.dumps(
            [{"spec": "classic"}, {"spec": v2, "options": v2_opts}, {"spec": v3}])}),
    }


def collection_name(data_set: str, encoder_key: str) -> str:
    return f"{data_set}-{encoder_key}"


def ensure_collection(home: Path, data: DataSet, choice: EncoderChoice) -> dict[str, Any]:
    """Create and fill the collection of (``data``, ``choice``) unless it already holds every row."""
    from caselens.indexes.collection import Collection
    from caselens.ingest.encoders import load_encoder
    from caselens.ingest.pipeline import IngestConfig, ingest
    from caselens.ingest.sources.image_folder import ImageSource

    name = collection_name(data.name, choice.key)
    if Collection.exists(name, home):
        col = Collection.open(name, home)
        settled = len(col.ledger())  # every manifest row ends accepted, duplicate or rejected
        if settled >= data.rows:
            return {"collection": name, "reused": True, "items": col.count()}
        sys.exit(f"{home / name} settled {settled} of {data.rows} rows; remove it and run again")
    encoder = load_encoder(choice.spec, dict(choice.options))
    col = Collection.create(name, encoder.info.to_record(), home)
    source = ImageSource(manifest=data.manifest, secret=col.secret())
    start = time.perf_counter()
    report = ingest(source, col, encoder, IngestConfig(progress=sys.stderr.isatty()))
    return {"collection": name, "reused": False, "items": report.total_items, "accepted": report.accepted,
            "rejected": dict(report.rejected), "ingest_seconds": round(time.perf_counter() - start, 2)}


def machine_info() -> dict[str, Any]:
    """CPU count, load and library versions, to read timings by (the machine is shared)."""
    import numpy

    return {"cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
            "platform": platform.platform(), "python": platform.python_version(), "numpy": numpy.__version__}


def main(argv: Sequence[str] | None = None) -> int:
    """Ingest every (set, encoder) collection: ``python benchmarks/bench_sets.py [--home DIR]``."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--home", type=Path, default=DEFAULT_HOME)
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--models-root", type=Path, default=DEFAULT_MODELS_ROOT)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=ENCODERS)
    args = p.parse_args(argv)
    args.home.mkdir(parents=True, exist_ok=True)
    choices = encoder_choices(args.models_root)
    for data in data_sets(args.data_root, args.datasets):
        for key in args.encoders:
            print(json.dumps(ensure_collection(args.home, data, choices[key])), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What every benchmark script shares: where things are, the machine it ran on, percentiles, and
writing the result JSON (atomically, with the command that made it).

Scripts run as ``python benchmarks/<name>.py`` (this folder is then on ``sys.path``) and do
``from harness import ...``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
SHARED_MODELS = ROOT.parent / "shared" / "models"
RESULTS = ROOT / "benchmarks" / "results"
VERSIONS = ("caselens", "faiss-cpu", "lancedb", "numpy", "pyarrow", "pillow", "torch", "onnxruntime",
            "sentence-transformers", "ai-edge-litert")


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU, memory, Python and library versions and the load average now, to read timings by."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = None
    return {"cpu_count": os.cpu_count(), "cpus_usable": usable, "memory_bytes": mem,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "versions": {n: v for n in VERSIONS if (v := package_version(n)) is not None}}


def percentiles(values: Sequence[float], digits: int = 3) -> dict[str, float | int | None]:
    """n, p50, p90, p99, mean and max of ``values`` (e.g. milliseconds)."""
    if not values:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "mean": None, "max": None}
    ordered = sorted(float(v) for v in values)

    def q(p: float) -> float:  # linear interpolation, as numpy's default
        pos = p * (len(ordered) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {"n": len(ordered), "p50": round(q(0.5), digits), "p90": round(q(0.9), digits),
            "p99": round(q(0.99), digits), "mean": round(sum(ordered) / len(ordered), digits),
            "max": round(ordered[-1], digits)}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def write_result(path: str | Path, result: dict[str, Any]) -> Path:
    """Write ``result`` (with the command line, the time and the machine added) as JSON to ``path``
    (a bare name goes to ``benchmarks/results/``), atomically; returns the path."""
    from caselens.files import atomic_write_bytes

    path = Path(path)
    if not path.is_absolute() and path.parent == Path("."):
        path = RESULTS / path
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine_info(), **result}
    atomic_write_bytes(path, json.dumps(record, indent=2, default=str).encode())
    log(f"wrote {path}")
    return path

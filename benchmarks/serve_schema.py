"""A long schemathesis run over ``/openapi.json`` of a live ``caselens serve``: the test suite's
schema test (tests/test_serve_schema.py: valid, invalid and real-collection requests to every
operation, checked for server errors, undocumented status codes and content types, and bodies and
headers that do not match the spec) with many more examples per operation.

    python benchmarks/serve_schema.py --examples 100

Writes benchmarks/results/serve_schema.json (examples per operation, outcome, failures, seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=100, help="generated examples per operation and mode")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_schema.json"))
    args = p.parse_args()
    env = {**os.environ, "CASELENS_SCHEMATHESIS_EXAMPLES": str(args.examples), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                           "tests/test_serve_schema.py"], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    failures = re.findall(r"^(?:GET|POST) /api\S* \[[^\]]*\]:.*$", out, flags=re.M)
    requests = re.findall(r"schemathesis: (\d+) requests", out)
    report = {"examples_per_operation_and_mode": args.examples, "passed": proc.returncode == 0,
              "requests": int(requests[-1]) if requests else None,
              "failures": failures, "seconds": round(seconds, 1), "summary": out.strip().splitlines()[-1:],
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg": os.getloadavg()},
              "checks": ["not_a_server_error", "status_code_conformance", "content_type_conformance",
                         "response_schema_conformance", "response_headers_conformance", "negative_data_rejection"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()

"""Fuzz each reader with atheris for a while and write the results JSON.

    python benchmarks/fuzz/run.py --seconds 300        # every target 300 s -> benchmarks/results/fuzz.json
    python benchmarks/fuzz/run.py --seconds 5 --targets all --out /tmp/fuzz.json   # one short mixed run
    python benchmarks/fuzz/run.py --replay crash-1234 [...]  # run saved inputs through every target

Each target (``targets.py``: dicom, dicomdir, image, pdf, manifest, jsonl, csv) runs in its own
``harness.py`` process, seeded with inputs made at run time (``seeds.py``), with a time bound
per input (``-timeout``) and a memory bound (``-rss_limit_mb``): a hang or a blow-up is a crash
too. The results give, per reader, the executions, coverage and crashes (the exception and the
input, base64, when it is small).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results" / "fuzz.json"
sys.path.insert(0, str(HERE))


def fuzz_one(target: str, seconds: int, work: Path, rss_mb: int, timeout_s: int, instrument: str) -> dict:
    from seeds import write_seeds

    seeds, corpus = work / f"seeds-{target}", work / f"corpus-{target}"
    corpus.mkdir(parents=True, exist_ok=True)
    n_seeds = write_seeds(target, seeds)
    artifacts = work / f"artifacts-{target}"
    artifacts.mkdir(exist_ok=True)
    cmd = [sys.executable, str(HERE / "harness.py"), target, f"-max_total_time={seconds}", f"-timeout={timeout_s}",
           f"-rss_limit_mb={rss_mb}", f"-artifact_prefix={artifacts}/", "-print_final_stats=1", str(corpus), str(seeds)]
    env = {**os.environ, "CASELENS_FUZZ_INSTRUMENT": instrument, "RUST_BACKTRACE": "0"}
    start = time.monotonic()
    got = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + 600)
    log = got.stdout + got.stderr
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log) or re.findall(r"#(\d+)\s", log)
    cov = re.findall(r"cov: (\d+)", log)
    crashes = []
    for path in sorted(artifacts.glob("*")):
        if not path.name.startswith(("crash-", "timeout-", "oom-", "leak-")):  # slow-unit-: slow, not a crash
            continue
        data = path.read_bytes()
        crashes.append({"kind": path.name.split("-")[0], "bytes": len(data),
                        "input_base64": base64.b64encode(data).decode() if len(data) <= 16384 else None})
    error = re.search(r"=== Uncaught Python exception: ===\n(.+)", log)
    return {"target": target, "seconds": round(time.monotonic() - start, 1), "fuzz_seconds": seconds,
            "executions": int(runs[-1]) if runs else 0, "coverage": int(cov[-1]) if cov else None,
            "seeds": n_seeds, "corpus_files": sum(1 for _ in corpus.iterdir()), "exit": got.returncode,
            "crashes": len(crashes), "crash_inputs": crashes, "error": error.group(1) if error else None,
            "log_tail": log[-1500:] if got.returncode else ""}


def replay(paths: list[str]) -> int:
    import targets

    bad = 0
    for p in paths:
        data = Path(p).read_bytes()
        for name, fn in targets.TARGETS.items():
            try:
                fn(data)
            except Exception as exc:  # noqa: BLE001 - a crash to report
                bad += 1
                print(f"{p}: {name}: {type(exc).__name__}: {exc}")
    print(f"{len(paths)} input(s), {bad} crash(es)")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    import targets

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=300, help="fuzzing time per target")
    p.add_argument("--targets", default=",".join(targets.TARGETS), help="comma-separated targets, or 'all'")
    p.add_argument("--rss-mb", type=int, default=3072, help="memory bound of the fuzzing process (MB)")
    p.add_argument("--timeout", type=int, default=30, help="seconds one input may take")
    p.add_argument("--instrument", default="caselens,pydicom", help="packages instrumented for coverage")
    p.add_argument("--out", help="results JSON (default benchmarks/results/fuzz.json)")
    p.add_argument("--replay", nargs="+", metavar="FILE", help="run saved inputs through every target and stop")
    args = p.parse_args(argv)
    if args.replay:
        return replay(args.replay)
    out = Path(args.out) if args.out else RESULTS
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets.split(","):
            result = fuzz_one(target, args.seconds, Path(tmp), args.rss_mb, args.timeout, args.instrument)
            print(json.dumps({k: v for k, v in result.items() if k not in ("crash_inputs", "log_tail")}), flush=True)
            results.append(result)
    readers = {}
    for family, names in targets.READERS.items():
        mine = [r for r in results if r["target"] in names]
        if mine:
            readers[family] = {"targets": [r["target"] for r in mine], "executions": sum(r["executions"] for r in mine),
                               "crashes": sum(r["crashes"] for r in mine)}
    summary = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds_per_target": args.seconds,
               "by_reader": readers, "executions": sum(r["executions"] for r in results),
               "crashes": sum(r["crashes"] for r in results),
               "note": "shared 2-core machine: executions per second are low and noisy"}
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {}
    out.write_text(json.dumps({**previous, "summary": summary, "targets": results}, indent=1) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return 1 if summary["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""The 10 MB row: a text corpus with one huge row among ordinary ones, ingested by `caselens ingest`.

Issue 12 found that one 10 MB row in a JSONL corpus stalled an ingest for 7 minutes at 2.7 GB and
wrote nothing. With input limits (``TextCorpusConfig``: row bytes, text characters) the huge row
is rejected with a reason (``too_long``) and the others are stored. This script measures one
checkout's behaviour: wall time, peak RSS of the ingest process (``wait4``), exit status, items
stored, ledger rows and what happened to the huge row, for a JSONL corpus (the row is one 10 MB
line) and a CSV corpus (one 10 MB field).

    python benchmarks/input_limits.py --label after                       # this checkout
    python benchmarks/input_limits.py --label before --python /path/to/old/checkout/.venv/bin/python --timeout 900
    python benchmarks/input_limits.py --label baseline --huge-mb 0        # the same corpus without the huge row

Each run merges its entry into ``benchmarks/results/input_limits.json`` under its label. Timings
on a shared machine are noisy; re-run on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "input_limits.json"
SENTENCE = "The chest radiograph shows a small left pleural effusion without pneumothorax. "


def make_corpus(folder: Path, kind: str, rows: int, huge_bytes: int) -> tuple[Path, int]:
    """``rows`` ordinary rows with the huge one in the middle (id ``huge``), and its line number."""
    huge = (SENTENCE * (huge_bytes // len(SENTENCE) + 1))[:huge_bytes]
    path = folder / f"corpus.{kind}"
    with path.open("w", encoding="utf-8", newline="") as fh:
        if kind == "csv":
            import csv

            writer = csv.writer(fh)
            writer.writerow(["id", "text"])
            for i in range(rows):
                writer.writerow([f"r{i}", f"Row {i}: {SENTENCE}"])
                if i == rows // 2 and huge_bytes:
                    writer.writerow(["huge", huge])
        else:
            for i in range(rows):
                fh.write(json.dumps({"id": f"r{i}", "text": f"Row {i}: {SENTENCE}"}) + "\n")
                if i == rows // 2 and huge_bytes:
                    fh.write(json.dumps({"id": "huge", "text": huge}) + "\n")
    return path, rows // 2 + (3 if kind == "csv" else 2)


def run_one(python: str, corpus: Path, huge_line: int, home: Path, timeout: float) -> dict:
    cmd = [python, "-m", "caselens.cli", "--home", str(home), "ingest", "bench", "--text", str(corpus),
           "-q", "--no-index"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    err_file = home.parent / "stderr.txt"
    start = time.perf_counter()
    with err_file.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, kill)
    timer.start()
    _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this one process: its peak RSS
    timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    result = {"exit": proc.returncode, "timed_out": killed.is_set(), "seconds": round(wall, 1),
              "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
              "stderr_tail": err_file.read_text(errors="replace")[-400:]}
    result.update(stored(home, huge_line))
    return result


def stored(home: Path, huge_line: int) -> dict:
    """Items stored and ledger rows, read with LanceDB directly."""
    import lancedb

    folder = home / "bench" / "lance"
    if not (folder / "items.lance").exists():
        return {"items": 0, "ledger_rows": 0, "huge": "collection not created"}
    db = lancedb.connect(str(folder))
    items = db.open_table("items").count_rows()
    ledger = db.open_table("ledger").to_arrow().to_pylist()
    huge = [r for r in ledger if r["input"].split("#")[0].endswith(f":{huge_line}")]
    return {"items": items, "ledger_rows": len(ledger),
            "huge": [{"status": r["status"], "reason_code": r["reason_code"], "reason": r["reason"][:200]}
                     for r in huge][:3] or "no ledger row",
            "huge_chunks_stored": sum(1 for r in ledger if r["status"] == "accepted" and
                                      str(r["item_id"]).startswith("huge"))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--label", required=True, help="name of this entry in the results (e.g. before, after)")
    p.add_argument("--python", default=sys.executable, help="python of the checkout to measure")
    p.add_argument("--rows", type=int, default=200, help="ordinary rows around the huge one")
    p.add_argument("--huge-mb", type=float, default=10.0, help="size of the huge row in MB")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before the ingest is killed")
    p.add_argument("--kinds", default="jsonl,csv", help="corpus formats to try")
    args = p.parse_args(argv)
    entry: dict = {"python": args.python, "rows": args.rows, "huge_bytes": int(args.huge_mb * 1e6),
                   "timeout_s": args.timeout, "machine": platform.node(), "cpus": os.cpu_count(),
                   "note": "shared machine: timings are noisy", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for kind in args.kinds.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            corpus, huge_line = make_corpus(Path(tmp), kind, args.rows, int(args.huge_mb * 1e6))
            entry[kind] = run_one(args.python, corpus, huge_line, Path(tmp) / "home", args.timeout)
            print(kind, json.dumps(entry[kind], indent=1))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[args.label] = entry
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ledger size over re-runs: one row per input and outcome, with run counts, instead of one per run.

Ingests the same folder of generated images (a manifest, with a few rows that are rejected)
once and then ``--reruns`` more times through the real command line, counting ledger rows after
each run; what an append-only ledger (one row per input per run, as caselens wrote before)
would hold is the sum of the rows' ``runs``. Then checks that `caselens ledger --run`, the
ids verify expects, and a delete followed by a re-ingest still read right. Last, a ledger of
the old form is made from the same history and migrated by the next write.

    python benchmarks/ledger_reruns.py            # -> benchmarks/results/ledger_reruns.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from harness import log, write_result

CLI = [sys.executable, "-m", "caselens.cli"]


def make_inputs(folder: Path, n: int, bad: int) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["path,label"]
    for i in range(n):
        pixels = rng.integers(0, 255, (32, 32)).astype(np.uint8)
        Image.fromarray(pixels, "L").save(folder / f"img{i}.png")
        rows.append(f"img{i}.png,{'a' if i % 2 else 'b'}")
    for i in range(bad):  # rejected every run: missing and unreadable files
        rows.append(f"missing{i}.png,a")
        (folder / f"broken{i}.png").write_bytes(b"not an image")
        rows.append(f"broken{i}.png,a")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


def cli(args: list[str], home: Path, python: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [python, "-m", "caselens.cli"] if python else CLI
    proc = subprocess.run([*command, "--home", str(home), *args], capture_output=True, text=True, env=env,
                          timeout=900, cwd=Path(python).parents[2] if python else None)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"caselens {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
    return proc


def record_at_scale(n: int, batch: int = 1024) -> dict[str, Any]:
    """Seconds of one ledger write of ``batch`` new inputs, of ``batch`` inputs met again with the
    same outcome, and of ``batch`` duplicates (a re-run), on a ledger of ``n`` rows (best of 3)."""
    import lance
    import pyarrow as pa

    from caselens.indexes.collection import Collection
    from caselens.indexes.ledger import LEDGER_SCHEMA, LedgerEntry, entry_key
    from caselens.indexes.checksums import with_checksums

    with tempfile.TemporaryDirectory(prefix="caselens-ledger-scale-") as tmp:
        record = {"spec": "bench", "dim": 4, "modalities": ["image"], "fingerprint": "0" * 16, "options": {}}
        coll = Collection.create("big", record, Path(tmp))
        start = time.perf_counter()
        for lo in range(0, n, 200_000):
            hi = min(n, lo + 200_000)
            inputs = [f"export/{i:09d}.dcm" for i in range(lo, hi)]
            items = [f"sha256:{i:032x}" for i in range(lo, hi)]
            table = pa.table({"run_id": ["r0"] * (hi - lo), "time": ["2024-01-01T00:00:00Z"] * (hi - lo),
                              "input": inputs, "item_id": items, "status": ["accepted"] * (hi - lo),
                              "reason_code": [""] * (hi - lo), "reason": [""] * (hi - lo),
                              "runs": pa.array([1] * (hi - lo), pa.int64()), "last_run": ["r0"] * (hi - lo),
                              "last_time": ["2024-01-01T00:00:00Z"] * (hi - lo),
                              "seq": pa.array(range(lo, hi), pa.int64()),
                              "key": pa.array([entry_key(a, b, "accepted") for a, b in zip(inputs, items)], pa.int64())},
                             schema=pa.schema([f for f in LEDGER_SCHEMA if f.name != "_checksum"]))
            lance.write_dataset(with_checksums(table), str(coll.layout.ledger_dir), mode="append")
        build = time.perf_counter() - start
        coll.ledger_table.compact()
        out: dict[str, Any] = {"rows": n, "build_seconds": round(build, 1)}
        new = [LedgerEntry(f"new/{i}.dcm", "accepted", f"sha256:new{i}") for i in range(batch)]
        picked = list(range(0, n, max(1, n // batch)))[:batch]
        met = [LedgerEntry(f"export/{i:09d}.dcm", "accepted", f"sha256:{i:032x}") for i in picked]
        dups = [LedgerEntry(f"export/{i:09d}.dcm", "duplicate", f"sha256:{i:032x}", "already_present", "")
                for i in picked]  # what a re-run writes: the first time a row each, then one more run each
        for name, entries in (("new", new), ("met_again", met), ("rerun_duplicates", dups)):
            times = []
            for r in range(3):
                t0 = time.perf_counter()
                coll.record(f"{name}{r}", entries)
                times.append(time.perf_counter() - t0)
            out[f"write_{len(entries)}_{name}_seconds"] = round(min(times), 3)
        out["rows_after"] = coll.ledger_table.count()
        log(f"ledger of {n} rows: {out}")
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="images")
    parser.add_argument("--bad", type=int, default=10, help="missing and unreadable files each (rejected)")
    parser.add_argument("--reruns", type=int, default=5)
    parser.add_argument("--baseline-python", metavar="PYTHON",
                        help="also run the re-runs with this interpreter's caselens (e.g. an older checkout's venv) "
                             "and count its ledger rows")
    parser.add_argument("--scale", type=int, default=1_000_000,
                        help="also time one ledger write of 1,024 new and of 1,024 met inputs on a ledger of this "
                             "many rows (0: skip)")
    parser.add_argument("--out", default="ledger_reruns.json")
    args = parser.parse_args()
    from caselens.indexes.collection import Collection
    from caselens.indexes.ledger import LEDGER_SCHEMA, OLD_COLUMNS, expected_ids

    with tempfile.TemporaryDirectory(prefix="caselens-ledger-") as tmp:
        home = Path(tmp) / "home"
        manifest = make_inputs(Path(tmp) / "images", args.n, args.bad)
        inputs = args.n + 2 * args.bad
        runs: list[dict[str, Any]] = []
        for r in range(args.reruns + 1):
            start = time.perf_counter()
            cli(["ingest", "cxr", "--manifest", str(manifest), "-q", "--write-items", "64"], home)
            seconds = time.perf_counter() - start
            rows = json.loads(cli(["ledger", "cxr", "--json"], home).stdout)
            runs.append({"run": r + 1, "ledger_rows": len(rows), "append_only_rows": sum(x["runs"] for x in rows),
                         "seconds": round(seconds, 2)})
            log(f"run {r + 1}: {len(rows)} ledger rows (append-only: {runs[-1]['append_only_rows']})")
        collection = Collection.open("cxr", home)
        ledger = collection.ledger()
        first_run = ledger[0]["run_id"]
        last_run = max(ledger, key=lambda x: x["seq"])["last_run"]
        checks = {
            "rows_per_input_outcome": len({(x["input"], x["item_id"], x["status"]) for x in ledger}) == len(ledger),
            "runs_counted": all(x["runs"] == args.reruns + 1 for x in ledger if x["status"] in ("rejected",))
            and all(x["runs"] == args.reruns for x in ledger if x["status"] == "duplicate"),
            "ledger_run_first": len(json.loads(cli(["ledger", "cxr", "--run", first_run, "--json"], home).stdout)),
            "ledger_run_last": len(json.loads(cli(["ledger", "cxr", "--run", last_run, "--json"], home).stdout)),
            "expected_ids": len(expected_ids(collection.ledger_table.table())),
            "items": collection.count(),
        }
        # a delete, then the same ingest again: the item comes back and verify expects it again
        victim = next(x["item_id"] for x in ledger if x["status"] == "accepted")
        cli(["verify", "cxr"], home)
        from caselens.indexes import derived

        derived.delete(collection, [victim])
        checks["expected_after_delete"] = len(expected_ids(collection.ledger_table.table()))
        cli(["ingest", "cxr", "--manifest", str(manifest), "-q"], home)
        collection = Collection.open("cxr", home)
        checks["expected_after_reingest"] = len(expected_ids(collection.ledger_table.table()))
        checks["verify_ok_after_reingest"] = json.loads(cli(["verify", "cxr", "--json"], home).stdout)["ok"]
        # migration: the same history in the old form (one row per input per run), then one write
        import lance
        import pyarrow as pa

        history = collection.ledger_table.table()
        old_rows = []
        for row in history.to_pylist():
            for _ in range(int(row["runs"])):
                old_rows.append({c: row[c] for c in OLD_COLUMNS})
        old_dir = Path(tmp) / "old" / "cxr"
        old_home = old_dir.parent
        Collection.create("cxr", collection.encoder, old_home)
        old_schema = pa.schema([LEDGER_SCHEMA.field(c) for c in OLD_COLUMNS])
        lance.write_dataset(pa.Table.from_pylist(old_rows, schema=old_schema), str(old_dir / "lance" / "ledger.lance"),
                            mode="overwrite", schema=old_schema)
        old = Collection.open("cxr", old_home)
        before = len(old.ledger())
        expected_before = expected_ids(old.ledger_table.table())  # the old form, read as it is
        start = time.perf_counter()
        from caselens.indexes.ledger import LedgerEntry

        old.record("migration-probe", [LedgerEntry("probe.png", "rejected", "", "probe", "a probe")])
        migration = {"rows_before": before, "rows_after": len(old.ledger()), "seconds": round(time.perf_counter() - start, 3),
                     "expected_ids": len(expected_before),
                     "expected_ids_same": expected_ids(old.ledger_table.table()) == expected_before}
        log(f"migration: {before} rows of the old form -> {migration['rows_after']}")
        baseline = None
        if args.baseline_python:
            base_home = Path(tmp) / "baseline"
            checkout = Path(args.baseline_python).absolute().parents[2]  # <checkout>/.venv/bin/python
            version = subprocess.run(["git", "-C", str(checkout), "log", "-1", "--format=%h %s"], capture_output=True,
                                     text=True).stdout.strip()[:80]
            counts = []
            for _ in range(args.reruns + 1):
                cli(["ingest", "cxr", "--manifest", str(manifest), "-q"], base_home, args.baseline_python)
                counts.append(len(json.loads(cli(["ledger", "cxr", "--json"], base_home, args.baseline_python).stdout)))
            baseline = {"caselens": version, "ledger_rows_per_run": counts}
            log(f"baseline {version}: ledger rows {counts}")
    scale = record_at_scale(args.scale) if args.scale else None
    write_result(args.out, {"inputs": inputs, "images": args.n, "rejected_per_run": 2 * args.bad,
                            "runs": runs, "after_reruns": {"rows": runs[-1]["ledger_rows"],
                                                           "append_only_rows": runs[-1]["append_only_rows"]},
                            "checks": checks, "migration": migration, "baseline": baseline,
                            "write_at_scale": scale})


if __name__ == "__main__":
    main()

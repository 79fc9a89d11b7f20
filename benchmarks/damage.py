"""Damage to a collection's Lance files: is it detected, named, repaired, and what is lost?

Builds a small real collection (generated images, the `classic` encoder, two ingest runs with a
manifest each), then for each case damages a fresh copy of it and runs the real command line:

    truncate        the newest items data file cut to half its size
    bitflip         bits flipped in the metadata region of the newest items data file (Lance fails to decode)
    delete          the newest items data file deleted
    manifest        the latest items manifest corrupted (a byte inverted)
    ledger          a bit flipped in the newest ledger data file
    silent          three single-bit flips in the vector data of the newest items data file (Lance reads it)
    *_no_history    the same after older table versions were cleaned up (a collection older than a
                    week: no older copy of the rows is left), so rows are lost and ingested again

For each: `info`, `search --id`, `ledger`, `ingest` (the same manifest again) and `verify` on the
damaged copy (exit status, whether a traceback reached stderr, whether the message names the
collection and the damaged file); then `verify --repair --reingest` and a final `verify`
(repaired? rows kept / recovered / from the index / lost, items ingested again, lost in the end).

    python benchmarks/damage.py                  # all cases -> benchmarks/results/damage.json
    python benchmarks/damage.py --cases silent   # some of them
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from harness import ROOT, log, write_result

CLI = [sys.executable, "-m", "caselens.cli"]
CASES = ("truncate", "bitflip", "delete", "manifest", "ledger", "silent",
         "truncate_no_history", "delete_no_history", "silent_no_history")


def make_images(folder: Path, n: int, seed: int) -> Path:
    """``n`` small grey images of two kinds and a manifest (path,label,patient_id)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["path,label,patient_id"]
    for i in range(n):
        yy, xx = np.mgrid[:48, :48]
        if i % 2:
            pixels = (np.sin(xx / (2 + i % 5)) > 0) * 200 + rng.integers(0, 40, (48, 48))
        else:
            pixels = np.exp(-((xx - 24) ** 2 + (yy - 24) ** 2) / (50 + 7 * i)) * 230 + rng.integers(0, 20, (48, 48))
        name = f"img_{seed}_{i}.png"
        Image.fromarray(pixels.astype(np.uint8), "L").save(folder / name)
        rows.append(f"{name},{'stripes' if i % 2 else 'blob'},P{i % 7}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


def run(args: list[str], home: Path) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([*CLI, "--home", str(home), *args], capture_output=True, text=True, env=env, timeout=600)
    return {"exit": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr,
            "seconds": round(time.perf_counter() - start, 2)}


def newest(folder: Path, pattern: str = "*.lance") -> Path:
    return max(folder.glob(pattern), key=lambda p: (p.stat().st_mtime_ns, p.name))


def damage(case: str, collection: Path, rng: random.Random) -> str:
    """Damage ``collection`` as ``case`` says; returns the damaged file relative to it."""
    import lance

    base = case.removesuffix("_no_history")
    items = collection / "lance" / "items.lance"
    if case.endswith("_no_history"):  # as if older than a week: older versions and their files cleaned up
        from datetime import timedelta

        lance.dataset(str(items)).cleanup_old_versions(older_than=timedelta(seconds=0), delete_unverified=True)
    if base == "manifest":
        path = min((items / "_versions").glob("*.manifest"))  # V2 names: the newest version sorts first
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        return str(path.relative_to(collection))
    path = newest((collection / "lance" / "ledger.lance" / "data") if base == "ledger" else items / "data")
    data = bytearray(path.read_bytes())
    if base == "truncate":
        data = data[:len(data) // 2]
    elif base == "delete":
        path.unlink()
        return str(path.relative_to(collection))
    elif base == "bitflip":  # the column metadata and footer at the end of a Lance file
        for _ in range(3):
            pos = len(data) - 1 - rng.randrange(64, 512)
            data[pos] ^= 1 << rng.randrange(8)
    elif base == "ledger":
        pos = rng.randrange(len(data) // 4, len(data) // 2)
        data[pos] ^= 1 << rng.randrange(8)
    elif base == "silent":  # the vectors fill most of the file, from the start
        for _ in range(3):
            pos = rng.randrange(len(data) // 20, len(data) * 6 // 10)
            data[pos] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return str(path.relative_to(collection))


def command_outcome(out: dict[str, Any], file: str) -> dict[str, Any]:
    text = out["stdout"] + out["stderr"]
    return {"exit": out["exit"], "traceback": "Traceback (most recent call last)" in out["stderr"],
            "names_collection": "cxr" in text, "names_file": file in text or Path(file).name in text,
            "message": (out["stderr"].strip().splitlines() or [""])[-1][:400]}


def one_case(case: str, base_home: Path, manifests: list[Path], work: Path, seed: int, sample_id: str,
             n_items: int) -> dict[str, Any]:
    home = work / case / "home"
    shutil.copytree(base_home, home)
    collection = home / "cxr"
    file = damage(case, collection, random.Random(seed))
    result: dict[str, Any] = {"damaged_file": file, "commands": {}}
    for name, args in (("info", ["info", "cxr"]), ("search", ["search", "cxr", "--id", sample_id]),
                       ("ledger", ["ledger", "cxr"]), ("verify", ["verify", "cxr", "--json"]),
                       ("ingest", ["ingest", "cxr", "--manifest", str(manifests[0]), "-q"])):
        out = run(args, home)
        result["commands"][name] = command_outcome(out, file)
        if name == "verify" and out["stdout"].strip().startswith("{"):
            report = json.loads(out["stdout"])
            result["verify"] = {k: report[k] for k in ("ok", "items", "missing_count", "phantom_count",
                                                         "checksum_mismatches", "index_mismatches", "table_problems",
                                                         "ledger_problems", "damaged_files")}
    verify = result.get("verify", {})
    silent = case.startswith("silent")
    result["detected"] = bool(verify) and not verify["ok"] and (
        file in verify["damaged_files"] or (silent and verify["checksum_mismatches"] > 0))
    result["no_traceback"] = not any(c["traceback"] for c in result["commands"].values())
    failing = [c for c in result["commands"].values() if c["exit"] == 3]
    result["errors_name_file"] = all(c["names_file"] and c["names_collection"] for c in failing)
    before = {p.name for p in collection.rglob("*") if p.is_file()}
    out = run(["verify", "cxr", "--repair", "--reingest", "--json"], home)
    repair = json.loads(out["stdout"]) if out["stdout"].strip().startswith("{") else {}
    result["repair"] = {"exit": out["exit"], "traceback": "Traceback" in out["stderr"],
                        "repaired": repair.get("repaired"), "repairs": repair.get("repairs"),
                        "lost_rows": repair.get("lost_count"), "missing_after_repair": repair.get("missing_count"),
                        "reingest": repair.get("reingest"), "reingested": repair.get("reingested"),
                        "after_reingest": repair.get("after_reingest")}
    final = run(["verify", "cxr", "--json"], home)
    final_report = json.loads(final["stdout"]) if final["stdout"].strip().startswith("{") else {}
    found = run(["search", "cxr", "--id", sample_id, "--k", "1", "--json"], home)
    result["final"] = {"exit": final["exit"], "ok": final_report.get("ok"), "items": final_report.get("items"),
                       "missing": final_report.get("missing_count"), "search_exit": found["exit"]}
    result["repaired"] = bool(final_report.get("ok")) and final_report.get("items") == n_items
    result["lost"] = final_report.get("missing_count")  # items the ledger expects and the table lacks, in the end
    after = {p.name for p in collection.rglob("*") if p.is_file()}
    result["files_deleted_by_repair"] = sorted(before - after)  # moved to damaged/ counts as kept
    log(f"{case}: detected={result['detected']} repaired={result['repaired']} lost_rows="
        f"{result['repair']['lost_rows']} lost_in_the_end={result['lost']} no_traceback={result['no_traceback']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--n", type=int, default=48, help="images per ingest run (two runs)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default="damage.json")
    args = parser.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    with tempfile.TemporaryDirectory(prefix="caselens-damage-") as tmp:
        work = Path(tmp)
        base_home = work / "base"
        manifests = [make_images(work / f"images{r}", args.n, seed=args.seed + r) for r in range(2)]
        start = time.perf_counter()
        for manifest in manifests:
            out = run(["ingest", "cxr", "--manifest", str(manifest), "--write-items", "16", "-q"], base_home)
            if out["exit"] != 0:
                raise SystemExit(out["stderr"])
        log(f"base collection: {2 * args.n} images in {time.perf_counter() - start:.1f} s")
        ledger = json.loads(run(["ledger", "cxr", "--json"], base_home)["stdout"])
        sample_id = ledger[-1]["item_id"]
        results = {case: one_case(case, base_home, manifests, work, args.seed + i, sample_id, 2 * args.n)
                   for i, case in enumerate(cases)}
    summary = {case: {"detected": r["detected"], "repaired": r["repaired"], "lost": r["lost"],
                      "rows_lost_by_repair": r["repair"]["lost_rows"],
                      "reingested": sum(d["accepted"] for d in r["repair"]["reingested"] or []),
                      "no_traceback": r["no_traceback"], "errors_name_file": r["errors_name_file"],
                      "exit_codes": {k: c["exit"] for k, c in r["commands"].items()}}
               for case, r in results.items()}
    write_result(args.out, {"items": 2 * args.n, "cases": summary, "details": results,
                            "root": str(ROOT.name)})
    for case, s in summary.items():
        print(f"{case:22s} detected={s['detected']!s:5s} repaired={s['repaired']!s:5s} lost={s['lost']} "
              f"(rows the repair could not save: {s['rows_lost_by_repair']}, re-ingested {s['reingested']}) "
              f"exit codes {s['exit_codes']}")


if __name__ == "__main__":
    main()

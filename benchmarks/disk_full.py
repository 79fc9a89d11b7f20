"""Disk full during an ingest and during an index write, on a small tmpfs.

For each try a fresh tmpfs holds the caselens home: a first ingest (with room) stores a set of
images, the file system is then shrunk to what it uses plus a small headroom, and a second ingest
(or an index rebuild) runs out of space. Each try checks:

* ``clear``: exit status 2, one error line naming the collection and the reason, no traceback;
* ``intact``: everything stored before is still there and readable (ids, vectors, ledger), no item
  twice, and no ledger row accepts an item the table lacks;
* ``completes``: with room again, the same command completes and ``caselens verify`` is ok (every
  accepted item once, ledger and table agree, index and table agree, each item finds itself).

Needs root (``mount -t tmpfs``); without it the results say why nothing ran.

    python benchmarks/disk_full.py            # writes benchmarks/results/disk_full.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "disk_full.json"
CASELENS = [sys.executable, "-m", "caselens.cli"]


def can_mount(where: Path) -> str | None:
    """None when a tmpfs can be mounted at ``where``, else why not."""
    where.mkdir(parents=True, exist_ok=True)
    got = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], capture_output=True, text=True)
    if got.returncode != 0:
        return (got.stderr or got.stdout).strip() or f"mount exited {got.returncode}"
    subprocess.run(["umount", str(where)], check=False)
    return None


def mount(where: Path, size: int) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)


def resize(where: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


def used(where: Path) -> int:
    st = os.statvfs(where)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def make_images(folder: Path, n: int, seed: int, size: int = 64) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(folder / f"im{seed}_{i:04d}.png")
    return folder


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(CASELENS + ["--home", str(home), *args], capture_output=True, text=True, env=env,
                          timeout=600)


def snapshot(home: Path, name: str) -> dict:
    """ids (with counts), vectors by id and accepted ledger ids, read with LanceDB directly."""
    import lancedb
    import numpy as np

    db = lancedb.connect(str(home / name / "lance"))
    items = db.open_table("items").to_arrow().select(["id", "vector"])
    ids = items.column("id").to_pylist()
    vectors = np.asarray(items.column("vector").to_pylist(), np.float32)
    ledger = db.open_table("ledger").to_arrow().to_pylist()
    return {"ids": ids, "vectors": dict(zip(ids, vectors)),
            "accepted": {r["item_id"] for r in ledger if r["status"] == "accepted"}}


def clear_error(proc: subprocess.CompletedProcess, name: str) -> bool:
    err = proc.stderr.strip()
    return (proc.returncode == 2 and "Traceback" not in err and f"'{name}'" in err
            and "no space left" in err.lower())


def intact(before: dict, after: dict) -> bool:
    import numpy as np

    same = all(i in after["vectors"] and np.array_equal(v, after["vectors"][i]) for i, v in before["vectors"].items())
    return same and len(after["ids"]) == len(set(after["ids"])) and after["accepted"] <= set(after["ids"])


def verified(home: Path, name: str, expected: int) -> tuple[bool, dict]:
    got = cli(home, "verify", name, "--json")
    try:
        report = json.loads(got.stdout)
    except ValueError:
        return False, {"stderr": got.stderr[-300:]}
    return bool(report.get("ok")) and report.get("items") == expected, report


def one_try(root: Path, images_a: Path, images_b: Path, headroom: int, stage: str) -> dict:
    home = root / "home"
    mount(root, 64 << 20)
    try:
        first = cli(home, "ingest", "c", "--images", str(images_a), "-q", "--write-items", "16")
        if first.returncode != 0:
            return {"stage": stage, "headroom": headroom, "setup_failed": first.stderr[-300:]}
        if stage == "index":
            extra = cli(home, "ingest", "c", "--images", str(images_b), "-q", "--no-index")
            if extra.returncode != 0:
                return {"stage": stage, "headroom": headroom, "setup_failed": extra.stderr[-300:]}
        before = snapshot(home, "c")
        resize(root, used(root) + headroom)
        start = time.perf_counter()
        if stage == "ingest":
            failing = cli(home, "ingest", "c", "--images", str(images_b), "-q", "--write-items", "16")
        else:
            failing = cli(home, "index", "c", "--rebuild", "-q")
        seconds = time.perf_counter() - start
        full = failing.returncode != 0
        after = snapshot(home, "c")
        result = {"stage": stage, "headroom": headroom, "ran_out": full, "exit": failing.returncode,
                  "clear": clear_error(failing, "c") if full else None,
                  "intact": intact(before, after), "seconds": round(seconds, 1),
                  "message": failing.stderr.strip().splitlines()[-1][:300] if failing.stderr.strip() else ""}
        resize(root, 64 << 20)
        again = cli(home, "ingest", "c", "--images", str(images_b), "-q") if stage == "ingest" else \
            cli(home, "index", "c", "--rebuild", "-q")
        n_expected = len(list(images_a.glob("*.png"))) + len(list(images_b.glob("*.png")))
        ok, report = verified(home, "c", n_expected)
        result.update({"next_run_exit": again.returncode, "completes": again.returncode == 0 and ok,
                       "verify": {k: report.get(k) for k in ("items", "expected", "missing_count",
                                                              "duplicated_count", "index_problems", "ok")}})
        return result
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=120, help="images of the first and of the second ingest")
    p.add_argument("--headrooms", default="16k,48k,96k,160k,256k,400k",
                   help="free bytes left for the failing command, comma-separated (k = KiB)")
    args = p.parse_args(argv)
    headrooms = [int(h[:-1]) << 10 if h.endswith("k") else int(h) for h in args.headrooms.split(",")]
    out: dict = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tries": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        why = can_mount(tmp / "probe")
        if why is not None:
            out["skipped"] = f"cannot mount a tmpfs here: {why}"
        else:
            images_a = make_images(tmp / "a", args.images, 1)
            images_b = make_images(tmp / "b", args.images, 2)
            for stage in ("ingest", "index"):
                for headroom in headrooms:
                    mnt = tmp / f"mnt_{stage}_{headroom}"
                    mnt.mkdir()
                    result = one_try(mnt, images_a, images_b, headroom, stage)
                    print(json.dumps(result), flush=True)
                    out["tries"].append(result)
    tries = [t for t in out["tries"] if "setup_failed" not in t]
    ran_out = [t for t in tries if t.get("ran_out")]
    out["summary"] = {
        "tries": len(tries), "ran_out": len(ran_out),
        "clear_error": sum(1 for t in ran_out if t["clear"]),
        "state_intact": sum(1 for t in tries if t["intact"]),
        "next_run_completes": sum(1 for t in tries if t["completes"]),
        "by_stage": {s: sum(1 for t in ran_out if t["stage"] == s) for s in ("ingest", "index")}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out["summary"], indent=2))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

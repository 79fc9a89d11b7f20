"""What row checksums cost: computing them at write time, and checking every row in ``verify``.

Builds a collection of ``--n`` random unit vectors (``--dim``) with a few metadata columns through
``Collection.add`` in batches, then measures:

- ``row_checksums`` alone on the same rows (µs per row) and the share of ``add`` it takes;
- ``check_table`` (every fragment read, every row's checksum recomputed) in rows per second;
- the whole ``verify`` (checksums, ledger, index comparison, self-search of ``--sample`` items);
- after three single-bit flips in the vectors of the data file: that verify finds exactly them.

    python benchmarks/verify_scale.py --n 200000 --dim 512     # -> benchmarks/results/verify_scale.json

Timings on a shared machine are noisy (the machine load is recorded): re-run on a quiet one.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from harness import log, write_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=20_000)
    parser.add_argument("--sample", type=int, default=2000, help="items searched for themselves by verify")
    parser.add_argument("--factory", default="IVF256,Flat", help="FAISS index (default keeps exact vectors)")
    parser.add_argument("--out", default="verify_scale.json")
    args = parser.parse_args()
    from caselens.indexes import derived
    from caselens.indexes.checksums import row_checksums
    from caselens.indexes.collection import Collection, LedgerEntry
    from caselens.indexes.index_choice import ChoiceConfig
    from caselens.indexes.integrity import check_table

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="caselens-verify-") as tmp:
        home = Path(tmp)
        record = {"spec": "bench:random", "dim": args.dim, "modalities": ["image"], "fingerprint": "f" * 16,
                  "options": {}}
        coll = Collection.create("big", record, home)
        add_seconds = checksum_seconds = 0.0
        flips: list[int] = []
        for start in range(0, args.n, args.batch):
            n = min(args.batch, args.n - start)
            vecs = rng.normal(size=(n, args.dim)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            records = [{"id": f"sha256:{start + i:032x}", "kind": "image", "source": f"export/{start + i}.dcm",
                        "provenance": {"sha256": f"{start + i:064x}"},
                        "metadata": {"label": f"c{(start + i) % 14}", "patient_id": f"p{(start + i) % 997}",
                                     "age": float((start + i) % 90)}} for i in range(n)]
            t0 = time.perf_counter()
            coll.add(records, vecs)
            add_seconds += time.perf_counter() - t0
            coll.record("bench", [LedgerEntry(r["source"], "accepted", r["id"]) for r in records])
            if start == 0:
                flips = [int(rng.integers(0, n)) for _ in range(3)]
                flip_vectors = vecs[flips].copy()
        coll.compact()
        log(f"{args.n} rows added in {add_seconds:.1f} s")
        sample = coll.rows(limit=min(args.n, 50_000))
        t0 = time.perf_counter()
        row_checksums(sample)
        per_row = (time.perf_counter() - t0) / sample.num_rows
        t0 = time.perf_counter()  # an IVF index that keeps exact vectors: verify compares every one
        derived.refresh(coll, config=ChoiceConfig(factories=(args.factory,), n_queries=200, target_recall=0.5))
        index_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        check = check_table(coll.guard, keep=("id", "_row", "vector"))
        check_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = derived.verify(coll, sample=args.sample)
        verify_seconds = time.perf_counter() - t0
        log(f"check_table {check_seconds:.1f} s, verify {verify_seconds:.1f} s, ok={report.ok}")
        # three single-bit flips in vectors of the data file: found?
        data_dir = coll.layout.items_dir / "data"
        path = max(data_dir.glob("*.lance"), key=lambda p: p.stat().st_size)
        raw = bytearray(path.read_bytes())
        flipped = 0
        for vec in flip_vectors:
            at = bytes(raw).find(vec.tobytes())
            if at >= 0:
                raw[at + 5] ^= 0x01
                flipped += 1
        path.write_bytes(bytes(raw))
        after = derived.verify(coll, sample=args.sample)
        checksum_seconds = per_row * args.n
    write_result(args.out, {
        "n": args.n, "dim": args.dim,
        "add": {"seconds": round(add_seconds, 2), "rows_per_s": round(args.n / add_seconds)},
        "row_checksums": {"us_per_row": round(per_row * 1e6, 2), "share_of_add": round(checksum_seconds / add_seconds, 3)},
        "faiss_index": {"factory": args.factory, "build_seconds": round(index_seconds, 2)},
        "check_table": {"seconds": round(check_seconds, 2), "rows_per_s": round(args.n / check_seconds),
                        "bad_rows": check.bad_rows},
        "verify": {"seconds": round(verify_seconds, 2), "ok": report.ok, "self_checked": report.self_checked,
                   "index_compared": report.index_compared},
        "bit_flips": {"flipped": flipped, "checksum_mismatches": after.checksum_mismatches,
                      "index_mismatches": after.index_mismatches, "ok": after.ok,
                      "rows": [int(r) for r in flips]},
    })


if __name__ == "__main__":
    main()

"""Crash safety of the index layer with real processes, files and signals: SIGKILL during an
index write, damaged index files, concurrent writers, and ``verify`` / ``optimize`` / ``index``
through the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from caselens.indexes import derived, faiss_index
from caselens.indexes.collection import Collection, LedgerEntry
from caselens.indexes.index_choice import ChoiceConfig
from caselens.cli import main
from caselens.retrieval.search import search_vector

IVF = ChoiceConfig(exact_below=500, n_queries=100, factories=("IVF16,SQ8",))


def _vectors(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _collection(home: Path, n: int = 2000, name: str = "safe") -> tuple[Collection, np.ndarray]:
    vecs = _vectors(n)
    record = {"spec": "test:vectors", "dim": 16, "modalities": ["image"], "fingerprint": "d" * 16, "options": {}}
    coll = Collection.create(name, record, home)
    coll.add([{"id": f"v{i}", "kind": "image", "source": f"v{i}", "metadata": {"group": f"g{i % 5}"}}
              for i in range(n)], vecs)
    coll.record("run1", [LedgerEntry(f"v{i}", "accepted", f"v{i}") for i in range(n)])
    return coll, vecs


def _run_python(code: str, home: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=home, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_during_index_write_leaves_previous_index_usable(home: Path) -> None:
    coll, vecs = _collection(home)
    before = derived.refresh(coll, config=IVF)
    marker = home / "writing"
    child = _run_python(f"""
        import os, time
        from pathlib import Path
        from caselens import files
        from caselens.indexes import derived
        from caselens.indexes.collection import Collection
        real = os.fsync
        def slow(fd):
            Path({str(marker)!r}).write_text("x")   # the new index is half-way: written, not renamed
            time.sleep(60)
            real(fd)
        files.os.fsync = slow  # caselens.files.atomic_write_bytes writes the index
        derived.refresh(Collection.open("safe", Path({str(home)!r})), rebuild=True)
        """, home)
    deadline = time.time() + 60
    while not marker.exists() and child.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), child.communicate()[0] if child.poll() is not None else "child never reached the write"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert list(coll.layout.faiss_dir.glob(".*.tmp"))  # the killed writer's temporary file
    index, stamp = faiss_index.load_index(coll.layout.faiss_dir, coll.encoder["fingerprint"], cached=False)
    assert stamp.checksum == before.checksum and index.ntotal == 2000
    assert search_vector(coll, vecs[7], k=1).hits[0].id == "v7"
    coll.add([{"id": "late", "kind": "image", "source": "late", "metadata": {}}], _vectors(1, seed=3))
    derived.refresh(coll)  # the next writer clears the leftovers
    assert not list(coll.layout.faiss_dir.glob(".*.tmp"))


@pytest.mark.parametrize("damage", ["bitflip", "truncate", "empty", "stamp"])
def test_damaged_ivf_index_is_detected_and_rebuilt(home: Path, damage: str) -> None:
    coll, vecs = _collection(home)
    derived.refresh(coll, config=IVF)
    path = coll.layout.faiss_dir / faiss_index.INDEX_FILE
    data = bytearray(path.read_bytes())
    if damage == "bitflip":
        data[len(data) // 3] ^= 0x10
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        (coll.layout.faiss_dir / faiss_index.STAMP_FILE).write_text("{not json")
    with pytest.raises(faiss_index.IndexIntegrityError):
        faiss_index.load_index(coll.layout.faiss_dir, coll.encoder["fingerprint"], cached=False)
    report = derived.verify(coll, sample=200)
    assert not report.ok and report.index_problems
    assert search_vector(coll, vecs[11], k=1).hits[0].id == "v11"  # ranked exactly, not served damaged
    derived.refresh(coll)  # a writer rebuilds it
    index, stamp = faiss_index.load_index(coll.layout.faiss_dir, coll.encoder["fingerprint"], cached=False)
    assert index.ntotal == 2000
    # rebuilt with the settings stored in the stamp (a destroyed stamp leaves the defaults: exact)
    assert stamp.factory == ("Flat" if damage == "stamp" else "IVF16,SQ8")
    assert derived.verify(coll, sample=200).ok


def test_two_concurrent_writers_lose_nothing(home: Path) -> None:
    coll, vecs = _collection(home, n=600)
    derived.refresh(coll, config=IVF)
    code = """
        import sys
        import numpy as np
        from pathlib import Path
        from caselens.indexes import derived
        from caselens.indexes.collection import Collection
        tag = sys.argv[1] if len(sys.argv) > 1 else "{tag}"
        coll = Collection.open("safe", Path({home!r}))
        rng = np.random.default_rng(ord(tag))
        for batch in range(4):
            vecs = rng.normal(size=(25, 16)).astype(np.float32)
            vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
            ids = [f"{{tag}}{{batch}}_{{i}}" for i in range(25)]
            coll.add([{{"id": i, "kind": "image", "source": i, "metadata": {{}}}} for i in ids], vecs)
            derived.refresh(coll)
        print("done", tag)
        """
    writers = [_run_python(code.format(tag=tag, home=str(home)), home) for tag in ("a", "b")]
    outputs = [w.communicate(timeout=300)[0] for w in writers]
    assert all(w.returncode == 0 for w in writers), outputs
    rows = coll.rows(columns=["id", "_row"])
    ids, row_numbers = rows.column("id").to_pylist(), rows.column("_row").to_pylist()
    assert len(ids) == 600 + 200 and len(set(ids)) == 800 and len(set(row_numbers)) == 800
    stamp = derived.refresh(coll)  # both writers refreshed after their commits: nothing left to add
    assert stamp.live == 800 and stamp.table_version == coll.version
    index, _ = derived.load_for_read(coll)
    assert set(faiss_index.index_ids(index).tolist()) == set(row_numbers)


def test_verify_checks_ledger_table_and_index_and_repairs_by_rebuilding(home: Path) -> None:
    coll, vecs = _collection(home, n=800)
    derived.refresh(coll, config=IVF)
    report = derived.verify(coll)
    assert report.ok and report.expected == 800 and report.self_checked == 800 and report.self_missed <= 40
    # the ledger says an item was accepted that the table lacks: reported, never "repaired" away
    coll.record("run2", [LedgerEntry("ghost.png", "accepted", "ghost")])
    # a row added behind the index's back, and the index file replaced by one of other rows
    coll.add([{"id": "extra", "kind": "image", "source": "x", "metadata": {}}], _vectors(1, seed=9))
    other, _ = faiss_index.build_index(vecs[:100], np.arange(100), "Flat")
    stamp = faiss_index.read_stamp(coll.layout.faiss_dir)
    faiss_index.write_index(other, coll.layout.faiss_dir, table_version=coll.version,
                            encoder_fingerprint=stamp.encoder_fingerprint, factory="Flat")
    report = derived.verify(coll)
    assert not report.ok and report.missing == ["ghost"]
    assert report.phantoms == ["extra"]  # stored without an accepted ledger row
    assert any("not in the index" in p for p in report.index_problems)
    count = coll.count()
    report = derived.verify(coll, repair=True)
    assert report.repaired and not report.index_problems and report.missing == ["ghost"]
    assert not report.phantoms and coll.ledger(item_ids=["extra"])[0]["reason_code"] == "recovered"
    assert coll.count() == count  # nothing dropped
    # deleting an item notes it in the ledger, so verify no longer expects it
    derived.delete(coll, ["v3"])
    report = derived.verify(coll, sample=100)
    assert report.expected == 801 and report.missing == ["ghost"] and not report.index_problems  # 800 + ghost + extra - v3


def test_cli_index_optimize_verify_and_info(home: Path, capsys: pytest.CaptureFixture) -> None:
    coll, _ = _collection(home, n=1500)
    assert main(["--home", str(home), "index", "safe", "--rebuild", "--factory", "IVF16,Flat", "-q",
                 "--target-recall", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "IVF16,Flat" in out and "recall@10" in out
    assert main(["--home", str(home), "info", "safe", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    idx = info["faiss_index"]
    assert idx["fresh"] and idx["factory"] == "IVF16,Flat" and idx["choice"]["recall"] >= 0.9
    assert idx["choice"]["config"]["target_recall"] == 0.9 and idx["deleted"] == 0 and idx["params"]["nprobe"] >= 1
    assert main(["--home", str(home), "optimize", "safe", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rebuilt"] is False and report["recall_before"] >= 0.9
    assert main(["--home", str(home), "verify", "safe", "--sample", "300"]) == 0
    assert "OK" in capsys.readouterr().out
    (coll.layout.faiss_dir / faiss_index.INDEX_FILE).write_bytes(b"garbage")
    assert main(["--home", str(home), "verify", "safe", "--sample", "300"]) == 1
    capsys.readouterr()
    assert main(["--home", str(home), "verify", "safe", "--repair", "--sample", "300", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["repaired"] and "rebuilt" in report["repaired"][0]
    assert main(["--home", str(home), "index", "safe", "--max-memory", "lots"]) == 2
    assert "not understood" in capsys.readouterr().err

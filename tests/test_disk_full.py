"""A full disk during an ingest and during an index write, on a real (small) tmpfs: a clear error
naming the collection (no traceback), the state before intact, and the next run with space
completes. Skipped where a tmpfs cannot be mounted (needs root). The longer probe over several
headrooms is ``benchmarks/disk_full.py``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caselens.indexes import faiss_index
from caselens.indexes.collection import Collection
from caselens.cli import main


def _mount(where: Path, size: int) -> str | None:
    where.mkdir(parents=True, exist_ok=True)
    try:
        got = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    return None if got.returncode == 0 else (got.stderr.strip() or f"mount exited {got.returncode}")


def _resize(where: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True, timeout=30)


def _used(where: Path) -> int:
    st = os.statvfs(where)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.fixture
def small_fs(tmp_path: Path):
    mnt = tmp_path / "mnt"
    why = _mount(mnt, 32 << 20)
    if why is not None:
        pytest.skip(f"cannot mount a tmpfs here ({why})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)


def _images(folder: Path, n: int, seed: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(folder / f"{seed}_{i}.png")
    return folder


def _state(home: Path) -> dict:
    coll = Collection.open("c", home)
    rows = coll.rows(columns=["id", "vector"]).to_pylist()
    accepted = {e["item_id"] for e in coll.ledger() if e["status"] == "accepted"}
    return {"ids": [r["id"] for r in rows], "vectors": {r["id"]: r["vector"] for r in rows}, "accepted": accepted}


def test_disk_full_during_ingest_and_index_write(small_fs: Path, tmp_path: Path, capsys) -> None:
    first, second = _images(tmp_path / "a", 30, 1), _images(tmp_path / "b", 30, 2)
    home = small_fs / "home"
    h = ["--home", str(home)]
    assert main(h + ["ingest", "c", "--images", str(first), "-q", "--write-items", "8"]) == 0
    before = _state(home)
    capsys.readouterr()
    # an ingest that runs out of space
    _resize(small_fs, _used(small_fs) + (24 << 10))
    assert main(h + ["ingest", "c", "--images", str(second), "-q", "--write-items", "8"]) == 3  # a failure at run time
    err = capsys.readouterr().err
    assert "collection 'c'" in err and "no space left" in err.lower() and "Traceback" not in err
    after = _state(home)
    assert all(after["vectors"][i] == v for i, v in before["vectors"].items())  # nothing stored is lost
    assert len(after["ids"]) == len(set(after["ids"])) and after["accepted"] <= set(after["ids"])
    # an index write that runs out of space leaves the previous index in place
    stamp = faiss_index.read_stamp(Collection.open("c", home).layout.faiss_dir)
    assert main(h + ["index", "c", "--rebuild", "-q"]) == 3
    err = capsys.readouterr().err
    assert "collection 'c'" in err and "no space left" in err.lower() and "Traceback" not in err
    index, kept = faiss_index.load_index(Collection.open("c", home).layout.faiss_dir, stamp.encoder_fingerprint,
                                         cached=False)
    assert kept.checksum == stamp.checksum and index.ntotal == 30
    # with space again, the same commands complete and everything agrees
    _resize(small_fs, 32 << 20)
    assert main(h + ["ingest", "c", "--images", str(second), "-q"]) == 0
    capsys.readouterr()
    assert main(h + ["verify", "c", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["items"] == 60 and report["expected"] == 60

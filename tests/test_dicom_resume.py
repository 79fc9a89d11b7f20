"""`caselens ingest` killed with SIGKILL at several points, then re-run: every accepted item
present exactly once, every file accounted for in the final run's ledger. The killed runs write
every 4 items (2 batches of 2), so kills land between, and during, the writes of item groups
(rows first, then their ledger rows)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom.data

from caselens.indexes import faiss_index
from caselens.indexes.collection import Collection
from caselens.ingest.sources.dicom_source import DicomSource

KEY = bytes(range(32))  # a pseudonym key (collections make their own)

CASELENS = [sys.executable, "-m", "caselens.cli"]


def _export(folder: Path) -> Path:
    src = Path(pydicom.data.__file__).parent / "test_files"
    folder.mkdir()
    names = ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "JPEG2000.dcm",
             "SC_rgb_rle.dcm", "SC_rgb_jpeg_gdcm.dcm", "examples_palette.dcm", "examples_ybr_color.dcm",
             "rtdose.dcm", "liver_1frame.dcm", "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_small_odd.dcm",
             "rtplan.dcm", "MR_truncated.dcm", "README.txt"]
    for i, name in enumerate(names):
        shutil.copy(src / name, folder / f"IM{i:03d}")
    tiny = src / "dicomdirtests" / "77654033"
    shutil.copytree(tiny, folder / "tiny")  # 2 studies of CR/CT instances
    return folder


def _versions(home: Path) -> int:
    d = home / "col" / "lance" / "items.lance" / "_versions"
    return len(list(d.iterdir())) if d.is_dir() else 0


def _run_and_kill(home: Path, export: Path, until: callable, timeout: float = 120) -> bool:
    """Start an ingest; SIGKILL it once ``until()`` holds. True when it was killed mid-run."""
    cmd = CASELENS + ["--home", str(home), "ingest", "col", "--dicom", str(export), "--batch-size", "2", "-q",
                      "--workers", "1", "--write-items", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    start = time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - start < timeout:
            if until():
                os.killpg(proc.pid, signal.SIGKILL)  # the ingest and its decoding workers
                proc.wait()
                return True
            time.sleep(0.01)
        return False
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_sigkill_at_several_points_then_rerun_stores_every_item_exactly_once(home: Path, tmp_path: Path) -> None:
    export = _export(tmp_path / "export")
    # reference: what a clean run accepts
    expected = {it.id for it in DicomSource(export, KEY) if hasattr(it, "id")}
    assert len(expected) >= 20
    killed = 0
    # 1: as soon as the collection exists (before or during the first batch)
    killed += _run_and_kill(home, export, lambda: (home / "col" / "secret.key").exists())
    # 2: after a few batches were written
    start = _versions(home)
    killed += _run_and_kill(home, export, lambda: _versions(home) >= start + 3)
    # 3: after a few more
    start = _versions(home)
    killed += _run_and_kill(home, export, lambda: _versions(home) >= start + 5)
    assert killed >= 2, "the ingest finished before it could be killed; the test proves nothing"
    final = subprocess.run(CASELENS + ["--home", str(home), "ingest", "col", "--dicom", str(export), "-q"],
                           capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    coll = Collection.open("col", home)
    ids = coll.rows(columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an item was stored twice"
    assert set(ids) == expected, "an item was lost or an unexpected one stored"
    run = coll.ledger()[-1]["run_id"]
    ledger = coll.ledger(run)
    n_files = sum(1 for p in export.rglob("*") if p.is_file())
    assert len(ledger) == n_files and {e["status"] for e in ledger} <= {"accepted", "duplicate", "rejected"}
    stamp = faiss_index.read_stamp(coll.layout.faiss_dir)  # the last run refreshed it after its commit
    assert stamp.ntotal == len(expected) and stamp.table_version == coll.version

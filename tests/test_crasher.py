"""Fault points kill a process exactly where they are named, and the crasher's ci mode (a handful of
SIGKILLs during an image ingest, an index rebuild and an optimize, each restarted) finds every
invariant holding. The full run (>= 200 kills) is ``python benchmarks/crasher.py --mode full``."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fault_point_kills_at_the_named_passage_and_traces(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    code = ("from caselens.faults import fault_point\n"
            "for name in ('a', 'b', 'b', 'b'):\n"
            "    fault_point(name)\n"
            "print('survived')\n")
    env = {**os.environ, "CASELENS_FAULT": "b:2", "CASELENS_FAULT_TRACE": str(trace)}
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert got.returncode == -signal.SIGKILL and "survived" not in got.stdout
    assert [line.split()[1] for line in trace.read_text().splitlines()] == ["a", "b", "b"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASELENS_FAULT")}
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert got.returncode == 0 and "survived" in got.stdout


def test_crasher_ci_mode_survives_every_kill(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("crasher", ROOT / "benchmarks" / "crasher.py")
    crasher = importlib.util.module_from_spec(spec)
    sys.modules["crasher"] = crasher  # its dataclasses look their module up
    try:
        spec.loader.exec_module(crasher)
    except BaseException:
        sys.modules.pop("crasher", None)
        raise
    out = tmp_path / "crasher.json"
    code = crasher.main(["--mode", "ci", "--out", str(out), "--work", str(tmp_path)])
    summary = json.loads(out.read_text())["summary"]
    assert summary["kills"] >= 3, summary
    assert code == 0 and summary["survived"] == summary["kills"], summary
    for path in summary["by_path"].values():
        assert path["lost"] == path["duplicated"] == path["phantom"] == 0

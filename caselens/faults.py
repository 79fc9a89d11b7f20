"""Named fault points for crash testing: a writer can be made to SIGKILL itself at an exact place.

``fault_point("table.commit.after")`` does nothing unless the environment variable
``CASELENS_FAULT`` names that point when the process starts::

    CASELENS_FAULT=table.commit.after       # kill at the first time the point is reached
    CASELENS_FAULT=ledger.write.before:3    # ... at the third time

Then the process sends itself SIGKILL there: no ``finally`` blocks, no flushing, as when the
machine loses power or the kernel's OOM killer strikes. ``CASELENS_FAULT_TRACE=FILE`` appends
the name of every point passed to ``FILE`` (the crasher, ``benchmarks/crasher.py``, uses the
first line as its "started real work" marker, and the lines to know which points a command
passes). With neither variable set, a call costs one global lookup and a comparison.

The points (one line each where they are):

* ``lock.acquired`` — a writer took a collection's write lock (ingest, index, optimize, delete);
* ``table.commit.before`` / ``table.commit.after`` — around each LanceDB append of item rows;
* ``ledger.write.before`` / ``ledger.write.after`` — around each append of ledger rows;
* ``table.compact.before`` / ``table.compact.after`` — around a table compaction;
* ``index.write.between`` — a new FAISS index file is in place, its stamp not yet;
* ``file.rename.before`` — an atomic file write (index, stamp, inputs file) is written and
  fsynced under its temporary name, not yet renamed over the old file.
"""

from __future__ import annotations

import os
import signal

ENV = "CASELENS_FAULT"
TRACE_ENV = "CASELENS_FAULT_TRACE"


def _parse(spec: str | None) -> tuple[str, int] | None:
    if not spec:
        return None
    name, _, nth = spec.partition(":")
    try:
        count = int(nth) if nth else 1
    except ValueError:
        count = 1
    return name.strip(), max(1, count)


_TARGET = _parse(os.environ.get(ENV))
_TRACE = os.environ.get(TRACE_ENV) or None
_ACTIVE = _TARGET is not None or _TRACE is not None
_hits = 0


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL here when ``CASELENS_FAULT`` names ``name`` (see the module
    docstring); note the passage in the trace file when one is set. Otherwise nothing."""
    if not _ACTIVE:
        return
    _passed(name)


def _passed(name: str) -> None:
    global _hits
    if _TRACE is not None:
        with open(_TRACE, "a", encoding="utf-8") as fh:  # one short line: appends do not interleave
            fh.write(f"{os.getpid()} {name}\n")
    if _TARGET is not None and _TARGET[0] == name:
        _hits += 1
        if _hits >= _TARGET[1]:
            os.kill(os.getpid(), signal.SIGKILL)

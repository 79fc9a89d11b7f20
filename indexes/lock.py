"""The write lock of a collection: one object, held by writers only.

Writers (ingest, add, delete, index and BM25 refreshes, compaction, repairs) hold it; readers
never take it and never wait for it (they read a snapshot of one table version, see
:mod:`caselens.indexes.snapshot`). It is exclusive between processes (``flock`` on the
collection's ``.lock`` file) and between threads, and re-entrant within the thread that holds
it, so an ingest holding it may call ``Collection.add``.

While a thread holds it, :meth:`WriteLock.facts` is a dict for facts that only writers change
(the table schema, the next free row number): no other process can write meanwhile, so they can
be kept instead of asked of LanceDB again; they are dropped when the lock is released.
"""

from __future__ import annotations

import contextlib
import fcntl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from caselens.faults import fault_point

_GUARD = threading.Lock()
_STATES: dict[str, "_State"] = {}  # one per lock file in this process, shared by every WriteLock of it


class _State:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.depth = 0
        self.owner: int | None = None
        self.facts: dict[str, Any] = {}


class WriteLock:
    """The write lock of the collection whose lock file is ``path``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with _GUARD:
            self._state = _STATES.setdefault(str(self.path), _State())

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the lock (waiting for other writers) for the ``with`` block."""
        with self._enter(blocking=True):  # a blocking enter always gets the lock
            yield

    @contextlib.contextmanager
    def try_hold(self) -> Iterator[bool]:
        """Hold the lock for the ``with`` block if no other writer has it; yields whether it did.

        For work that can be skipped or done later (a background index refresh)."""
        with self._enter(blocking=False) as held:
            yield held

    @contextlib.contextmanager
    def _enter(self, blocking: bool) -> Iterator[bool]:
        state = self._state
        if not state.lock.acquire(blocking=blocking):
            yield False
            return
        try:
            if state.depth:  # re-entered by the thread that holds it
                state.depth += 1
                try:
                    yield True
                finally:
                    state.depth -= 1
                return
            with open(self.path, "a") as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    yield False
                    return
                state.depth, state.owner, state.facts = 1, threading.get_ident(), {}
                fault_point("lock.acquired")
                try:
                    yield True
                finally:
                    state.depth, state.owner, state.facts = 0, None, {}
                    fcntl.flock(fh, fcntl.LOCK_UN)
        finally:
            state.lock.release()

    def held(self) -> bool:
        """Whether the calling thread holds the lock."""
        return self._state.owner == threading.get_ident()

    def facts(self) -> dict[str, Any] | None:
        """The facts kept while the calling thread holds the lock; None when it does not."""
        state = self._state
        return state.facts if state.owner == threading.get_ident() else None

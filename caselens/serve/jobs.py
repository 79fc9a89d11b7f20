"""Background ingest jobs with progress.

Jobs run one at a time in a worker thread of the service, at a lower CPU priority than the
threads answering requests (Linux threads have their own nice value), so searches keep their
latency while an ingest runs. Each job writes through its own collection handle; readers keep
theirs. A job's state moves ``queued -> running -> done | failed``; ``done``/``total`` count
inputs read (``total`` is None while the source cannot tell).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from caselens.errors import CaselensError
from caselens.serve.backend import IngestSpec
from caselens.serve.errors import status_of

log = logging.getLogger(__name__)

STATES = ("queued", "running", "done", "failed")
WORKER_NICE = 10  # added to the worker thread's nice value


@dataclass
class Job:
    """What a client sees of a job."""

    id: str
    kind: str
    collection: str
    state: str = "queued"
    done: int = 0  # inputs read so far
    total: int | None = None  # inputs the source expects (None: unknown)
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: dict[str, Any] | None = None  # accepted, duplicates, rejected by reason, items, ...
    error: str | None = None  # reason code of a failure
    detail: str | None = None  # what went wrong, for the user

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Runner = Callable[[IngestSpec, Callable[[int, int | None], None]], dict[str, Any]]


class JobManager:
    """Queue and worker of ingest jobs; keeps the last ``keep`` jobs for their status."""

    def __init__(self, runner: Runner, keep: int = 200):
        self._runner = runner
        self._keep = keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="caselens-job",
                                        initializer=_lower_priority)

    def submit(self, spec: IngestSpec) -> Job:
        job = Job(id=uuid.uuid4().hex[:16], kind="ingest", collection=spec.collection)
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > self._keep:
                oldest = next(iter(self._jobs))
                if self._jobs[oldest].state in ("queued", "running"):
                    break
                self._jobs.popitem(last=False)
        self._pool.submit(self._run, job, spec)
        return self.get(job.id)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return None if job is None else Job(**asdict(job))

    def list(self) -> list[Job]:
        with self._lock:
            return [Job(**asdict(j)) for j in reversed(self._jobs.values())]

    def busy(self, collection: str) -> bool:
        """True while a job for ``collection`` is queued or running."""
        with self._lock:
            return any(j.collection == collection and j.state in ("queued", "running") for j in self._jobs.values())

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)

    def _update(self, job: Job, **changes: Any) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(job, key, value)

    def _run(self, job: Job, spec: IngestSpec) -> None:
        self._update(job, state="running", started=time.time())
        try:
            result = self._runner(spec, lambda done, total: self._update(job, done=done, total=total))
        except CaselensError as exc:
            self._update(job, state="failed", finished=time.time(), error=status_of(exc)[1], detail=str(exc))
        except Exception as exc:  # noqa: BLE001 - a job's failure is reported, never raised into the server
            log.error("ingest job %s failed: %s", job.id, type(exc).__name__)  # no message: it may name inputs
            self._update(job, state="failed", finished=time.time(), error="internal_error",
                         detail=f"the ingest stopped with {type(exc).__name__}; see the server log")
        else:
            self._update(job, state="done", finished=time.time(), result=result,
                         total=job.total if job.total is not None else job.done)


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICE)
    except (OSError, AttributeError):
        pass

"""Generation jobs: states, the bounded priority queue and the book of every job the service accepted.

A job is accepted only when the queue has room; from then on it ends in a terminal state
(succeeded, failed, cancelled) that its client can read, also after a restart: its record is
written to the data directory when it is accepted and again when it ends, and a job found
unfinished at start-up (the process died) is recorded as failed with that reason.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runtime.errors import StorageError
from ..runtime.sampling.request import GenerationRequest
from .records import TERMINAL, JobRecords, QueueFull, State, ended, failed, public, storage_message

log = logging.getLogger(__name__)

SHUTDOWN_REASON = "cancelled: the service shut down"  # what the jobs a stopping service held say


@dataclass
class Job:
    """One accepted generation and everything a client may read about it."""

    id: str
    owner: str
    identity: str
    request: GenerationRequest
    priority: int = 0
    timeout_s: float = 600.0
    created: float = field(default_factory=time.time)
    state: State = State.QUEUED
    step: int = 0
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    error_kind: str | None = None
    images: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    cancel_reason: str | None = None  # set to stop a running job at its next step boundary
    fault: str | None = None  # a failed write of its progress: fails the job (storage) at its next step
    events: list[dict[str, Any]] = field(default_factory=list)
    seq: int = 0

    @property
    def deadline(self) -> float:
        return self.created + self.timeout_s

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def record(self) -> dict[str, Any]:
        """The job as its client sees it (JSON-ready); images as URLs relative to the API root."""
        out: dict[str, Any] = {
            "id": self.id,
            "state": self.state.value,
            "identity": self.identity,
            "priority": self.priority,
            "seed": self.request.seed,
            "steps": self.request.steps,
            "step": self.step,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
        }
        if self.state == State.SUCCEEDED:
            out["images"] = [f"/v1/generations/{self.id}/images/{k}" for k in range(self.images)]
            out["timings"] = self.timings
        if self.error is not None:
            out["error"] = self.error
            out["error_kind"] = self.error_kind
        return out

    def stored(self, position: int | None = None) -> dict[str, Any]:
        """The record as stored: the client's view, its owner and request, its place in the queue."""
        out = {**self.record(), "owner": self.owner, "request": self.request.values()}
        return out if position is None else {**out, "position": position}


class JobBook:
    """The queue (highest priority first, FIFO within a priority) and every job accepted.

    Thread-safe: the HTTP side submits, reads and cancels; the worker takes and finishes jobs.
    """

    def __init__(self, root: Path, max_queue: int, max_jobs: int, recover: bool = True) -> None:
        """`recover`: fail the unfinished records found at start (off where other processes share
        `root`: a Ray replica must not touch another replica's running jobs)."""
        self.records = JobRecords(root)
        self.max_queue, self.max_jobs = max_queue, max_jobs
        self.lock = threading.Condition()
        self.jobs: dict[str, Job] = {}
        self.heap: list[tuple[int, int, str]] = []
        self.queued = 0
        self.running: dict[str, Job] = {}  # jobs in the running batch
        self.seq = 0
        self.finished_order: list[str] = []
        self.busy: deque[float] = deque(maxlen=32)  # busy seconds each recent job added (throughput)
        self.last_end = 0.0
        self.watchers: dict[str, set[Callable[[], object]]] = {}  # job id -> wake-ups of async waiters
        self.shared = not recover  # other processes read progress and positions from progress files
        self.earlier: dict[str, dict[str, Any]] = {}  # owner and public record of earlier runs' jobs
        if recover:
            self._recover()

    # ---------------------------------------------------------------- persistence

    def _write_end(self, job: Job) -> None:
        """A job's final record; if it cannot be written, the job is failed (storage) in memory."""
        try:
            self.records.write(job.stored())
        except StorageError as exc:
            log.warning("job=%s: its record was not stored: %s", job.id, exc, extra={"job_id": job.id})
            job.state, job.error_kind, job.error = State.FAILED, "storage", storage_message(exc)

    def _progress(self, job: Job, **fields: Any) -> None:
        """A job's progress file (shared data directories only); a failed write fails the job."""
        if self.shared:
            try:
                self.records.progress(job.id, {"state": job.state.value, "step": job.step, **fields})
            except StorageError as exc:
                job.fault = storage_message(exc)

    def _write_positions(self) -> None:
        """Every queued job's place in the queue (readers in other processes)."""
        for k, job in enumerate(self.pending() if self.shared else ()):
            self._progress(job, position=k)

    def progress(self, job: Job) -> None:
        """A job's step, for readers in other processes (its record is not rewritten); its first step
        makes it running."""
        with self.lock:
            if job.state == State.QUEUED and job.id in self.running:
                job.state, job.started = State.RUNNING, time.time()
            if job.state == State.RUNNING:
                self._progress(job, started=job.started)
            self._notify(job)

    @contextmanager
    def watching(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event of the running loop, set (from any thread) on each step and on the end of a job."""
        loop, changed = asyncio.get_running_loop(), asyncio.Event()
        wake = lambda: loop.call_soon_threadsafe(changed.set)  # noqa: E731
        with self.lock:
            self.watchers.setdefault(job_id, set()).add(wake)
        try:
            yield changed
        finally:
            with self.lock:
                self.watchers[job_id].discard(wake)
                if not self.watchers[job_id]:
                    del self.watchers[job_id]

    def _notify(self, job: Job) -> None:
        for wake in self.watchers.get(job.id, ()):
            with suppress(RuntimeError):  # its loop has closed
                wake()

    def _recover(self) -> None:
        """Records of earlier runs: finished ones stay readable and listed, unfinished ones are failed now."""
        for r in sorted(self.records.all(), key=lambda r: r.get("finished") or r.get("created") or 0):
            if not ended(r):
                r = failed(r, "the service stopped before the job finished", "interrupted")
                try:
                    self.records.write(r)
                except StorageError as exc:  # read-only: served from memory; /readyz says not ready
                    log.warning("job=%s: its interrupted record was not stored: %s", r["id"], exc)
            self.earlier[r["id"]] = {**public(r), "owner": r.get("owner")}
            self.finished_order.append(r["id"])
        self._prune()

    def _prune(self) -> None:
        while len(self.finished_order) > self.max_jobs:
            old = self.finished_order.pop(0)
            self.jobs.pop(old, None)
            self.earlier.pop(old, None)
            self.records.remove(old)

    # ---------------------------------------------------------------- queue

    def submit(self, job: Job) -> Job:
        with self.lock:
            if self.queued >= self.max_queue:
                message = f"the queue holds {self.queued} jobs (limit {self.max_queue})"
                raise QueueFull(message, self.retry_after())
            try:
                self.records.write(job.stored())  # once, request and prompt included (positions: progress)
            except StorageError:
                self.records.remove(job.id)
                raise
            self.seq += 1
            job.seq = self.seq
            self.jobs[job.id] = job
            heapq.heappush(self.heap, (-job.priority, job.seq, job.id))
            self.queued += 1
            self._write_positions()
            self.lock.notify_all()
        return job

    def retry_after(self) -> int:
        """Seconds to drain the queue at the busy seconds per job measured lately (5 s before any)."""
        per_job = sum(self.busy) / len(self.busy) if self.busy else 5.0
        return min(3600, 1 + int(self.queued * per_job))

    def expire(self) -> list[Job]:
        """Queued jobs past their deadline end now (failed, kind timeout), not when they reach the head."""
        with self.lock:
            late = [job for job in self.pending() if time.time() > job.deadline]
            for job in late:
                self.queued -= 1
                message = f"deadline of {job.timeout_s:g} s passed while queued"
                self._finish_locked(job, State.FAILED, message, "timeout")
            if late:
                self._write_positions()
            return late

    def take(self, timeout: float, fits: Callable[[Job], bool] | None = None) -> Job | None:
        """The next queued job (to the running batch; `progress` marks it running at its first step),
        or None after `timeout` seconds without one.

        `fits`: whether the head of the queue fits the running batch; a head that does not fit
        stays first (big jobs are not overtaken forever) and None is returned.
        """
        with self.lock:
            end = time.monotonic() + timeout
            while True:
                while self.heap:
                    _, _, job_id = self.heap[0]
                    job = self.jobs.get(job_id)
                    if job is None or job.state != State.QUEUED:
                        heapq.heappop(self.heap)
                        continue  # cancelled while queued
                    if fits is not None and not fits(job):
                        return None
                    heapq.heappop(self.heap)
                    self.queued -= 1
                    self.running[job.id] = job
                    self._write_positions()
                    return job
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self.lock.wait(left)

    def position(self, job: Job) -> int | None:
        """Jobs ahead of a queued job (0: next), None once it left the queue."""
        with self.lock:
            if job.state != State.QUEUED or job.id in self.running:
                return None if job.state != State.QUEUED else 0
            mine = (-job.priority, job.seq)
            return sum(1 for p, s, i in self.heap if (p, s) < mine and self.jobs[i].state == State.QUEUED)

    def cancel(self, job: Job, reason: str = "cancelled by the client") -> None:
        """A queued job leaves the queue now; one in the running batch stops at its next step boundary."""
        with self.lock:
            if job.id in self.running:
                job.cancel_reason = reason
            elif job.state == State.QUEUED:
                self.queued -= 1
                self._finish_locked(job, State.CANCELLED, reason, "cancelled")
                self._write_positions()

    def finish(self, job: Job, state: State, error: str | None = None, kind: str | None = None) -> None:
        with self.lock:
            if job.done:  # ended already (a shutdown that could not wait for the job's step)
                return
            if self.running.pop(job.id, None) is not None:
                now = time.time()
                self.busy.append(now - max(self.last_end, job.started or now))
                self.last_end = now
            self._finish_locked(job, state, error, kind)

    def _finish_locked(self, job: Job, state: State, error: str | None, kind: str | None) -> None:
        job.state, job.finished = state, time.time()
        job.error, job.error_kind = error, kind
        self._write_end(job)
        self.finished_order.append(job.id)
        self._prune()
        self._notify(job)
        self.lock.notify_all()

    def get(self, job_id: str) -> Job | None:
        with self.lock:
            return self.jobs.get(job_id)

    def pending(self) -> list[Job]:
        """Queued jobs, in the order they would run."""
        with self.lock:
            ids = [i for _, _, i in sorted(self.heap)]
            return [self.jobs[i] for i in ids if self.jobs[i].state == State.QUEUED]


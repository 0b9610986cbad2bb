"""The service's operations, independent of HTTP: identities, jobs, progress, readiness, shutdown.

Everything a route does is a method here, so the FastAPI app (and a Ray Serve deployment) share
one behaviour. Errors are typed: `NotFound` (404), `QueueFull` (429), `Unavailable` (503),
`InputError` (422 naming the field), `PayloadTooLarge` (413).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import time
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, Protocol

from ..runtime.errors import FlashFaceError, InputError
from ..runtime.faces.images import check_pixels
from ..runtime.sampling.cost import Admission, available_ram, footprint_of
from ..runtime.sampling.params import REQUEST_PARAMS, SERVICE
from ..runtime.sampling.request import GenerationRequest, make_request
from .config import ServeSettings
from .jobs import SHUTDOWN_REASON, Job, JobBook
from .metrics import Metrics
from .records import STORAGE_DOWN, NotFound, QueueFull, State, new_job_id, public
from .store import IdentityStore
from .worker import LoadBackend, Worker

log = logging.getLogger(__name__)
LIMITS = ("max_queue", "max_files", "max_pixels", "max_upload_pixels", "memory_margin", "max_batch_rows")



class Unavailable(FlashFaceError):
    """The service is not ready yet, failed to load, or is shutting down."""


class PayloadTooLarge(FlashFaceError):
    """An upload over the service's byte limit."""


class API(Protocol):
    """What the HTTP routes call: the single-node `Service` and the Ray ingress both provide it."""

    settings: ServeSettings

    def status(self) -> dict[str, Any]: ...

    def metrics_text(self) -> bytes: ...

    def register(
        self, owner: str, uploads: Sequence[tuple[str, bytes]], cropped: bool = False, largest: bool = False
    ) -> dict[str, Any]: ...

    def identity_record(self, owner: str, identity: str) -> dict[str, Any]: ...

    def identities(self, owner: str) -> dict[str, Any]: ...

    def delete_identity(self, owner: str, identity: str) -> None: ...

    def submit_record(self, owner: str, body: dict[str, Any]) -> dict[str, Any]: ...

    def job(self, owner: str, job_id: str) -> dict[str, Any]: ...

    def jobs(self, owner: str) -> dict[str, Any]: ...

    def cancel(self, owner: str, job_id: str) -> dict[str, Any]: ...

    def image(self, owner: str, job_id: str, k: int) -> Path: ...

    def progress(self, owner: str, job_id: str, seen: int) -> tuple[list[dict[str, Any]], bool]: ...

    async def next_events(self, owner: str, job_id: str, seen: int, timeout: float) -> tuple[list, bool]: ...


async def wait_end(service: API, owner: str, job_id: str, timeout: float) -> None:
    """Await the end of a job, or `timeout` s, through its progress events (no thread held)."""
    end = time.monotonic() + timeout
    seen, done = 0, False
    while not done and time.monotonic() < end:
        events, done = await service.next_events(owner, job_id, seen, end - time.monotonic())
        seen += len(events)


__all__ = ["API", "NotFound", "PayloadTooLarge", "QueueFull", "Service", "Unavailable"]


class Service:
    """One device's service: a worker owning the backend, the job book and the identity store."""

    def __init__(
        self,
        settings: ServeSettings,
        load: LoadBackend,
        size: tuple[int, int] | None = None,
        shared: bool = False,
    ) -> None:
        """`shared`: the data directory is shared with other processes (Ray replicas)."""
        self.settings = settings = settings.validated()
        root = Path(settings.data_dir)
        self.book = JobBook(root / "jobs", settings.max_queue, settings.max_jobs, recover=not shared)
        self.store = IdentityStore(root / "identities")
        self.metrics = Metrics(lambda: {"": self.kv_stats()}, lambda: len(self.store))
        self.metrics.queue_depth.set_function(lambda: float(self.book.queued))
        self.worker = Worker(
            load, self.book, self.store, self.metrics, settings.warmup_steps, size, settings.max_batch_rows
        )
        self.draining = False
        self._admission: Admission | None = None

    def admission(self) -> Admission:
        """The job limits: max_cost, and once the backend is warm, the memory it has free less the margin."""
        s, be = self.settings, self.worker.backend
        if self._admission is None and self.worker.ready.is_set():
            free = getattr(be, "free_memory", available_ram)()  # the device's: CUDA's, else the host's
            self._admission = Admission(s.max_cost, footprint_of(be), free, s.memory_margin, s.max_batch_rows)
        return self._admission or Admission(s.max_cost)

    def start(self) -> Service:
        self.worker.start()
        return self

    def kv_stats(self) -> dict[str, int]:
        cache = getattr(self.worker.backend, "kv_cache", None)
        return {} if cache is None else cache.stats()

    # ---------------------------------------------------------------- health

    def ready(self) -> bool:
        return self.worker.ready.is_set() and not self.draining and self.book.records.writable()

    def status(self) -> dict[str, Any]:
        backend = self.worker.backend
        return {
            "ready": self.ready(),
            "reason": None if self.book.records.writable() else STORAGE_DOWN,
            "draining": self.draining,
            "backend": None if backend is None else self.worker.encoder,
            "load_error": None if self.worker.load_error is None else str(self.worker.load_error),
            "queued": self.book.queued,
            "running": len(self.book.running),
            "identities": len(self.store),
            "limits": {**self.admission().limits(), **{k: getattr(self.settings, k) for k in LIMITS}},
        }

    def _require_worker(self) -> None:
        if self.worker.load_error is not None:
            raise Unavailable(f"the backend failed to load: {self.worker.load_error}")
        if not self.worker.ready.is_set():
            raise Unavailable("the networks are still loading; retry when /readyz says ready")

    def _admitting(self) -> None:
        if self.draining:
            raise Unavailable("the service is shutting down and accepts no new work")
        self._require_worker()
        if not self.book.records.writable():
            raise Unavailable(f"{STORAGE_DOWN}; retry when /readyz says ready")

    # ---------------------------------------------------------------- identities

    def register(
        self, owner: str, uploads: Sequence[tuple[str, bytes]], cropped: bool = False, largest: bool = False
    ) -> dict[str, Any]:
        """Detect and crop (unless `cropped`), encode once, store; the identity's public record."""
        self._admitting()
        if not uploads:
            raise InputError("give at least one photo (multipart field 'photos')", "photos")
        if len(uploads) > self.settings.max_files:
            raise PayloadTooLarge(f"{len(uploads)} photos: over max_files={self.settings.max_files}")
        total = sum(len(data) for _, data in uploads)
        if total > self.settings.max_upload_bytes:
            raise PayloadTooLarge(
                f"uploads of {total} bytes exceed the limit of {self.settings.max_upload_bytes}"
            )
        names = [_safe_name(name, i) for i, (name, _) in enumerate(uploads)]
        uploads = [(n, data) for n, (_, data) in zip(names, uploads)]
        s, w, future = self.settings, self.worker, None
        try:
            check_pixels(uploads, s.max_pixels, s.max_upload_pixels)  # headers only: no decode yet
            future = self.worker.call(lambda: w.register(owner, uploads, cropped, largest, s.max_pixels))
            item = future.result(timeout=s.timeout_s)
        except InputError:
            self.metrics.errors.labels("input").inc()
            raise
        except FutureTimeout:
            if future is not None:
                future.cancel()  # not run later if it has not started
            raise Unavailable(f"the registration was not served within timeout_s={s.timeout_s:g} s") from None
        return item.public()

    def identity_record(self, owner: str, identity: str) -> dict[str, Any]:
        return self.store.owned(identity, owner).public()

    def delete_identity(self, owner: str, identity: str) -> None:
        self.store.delete(identity, owner)

    def identities(self, owner: str) -> dict[str, Any]:
        return {"identities": self.store.listed(owner)}

    # ---------------------------------------------------------------- jobs

    def submit(self, owner: str, body: dict[str, Any], job_id: str | None = None) -> Job:
        """Validate a generation request (the CLI's names and ranges), then queue it or raise."""
        self._admitting()
        size, timeout_s = self.worker.default_size(), self.settings.timeout_s
        identity, request, priority, timeout = parse_job(body, size, timeout_s)
        item = self.store.owned(identity, owner)  # 404 before anything is queued
        self.admission().check(request, item.num_refs)  # cost and memory, before a job exists
        job = Job(job_id or new_job_id(), owner, identity, request, priority, timeout)
        try:
            return self.book.submit(job)
        except QueueFull:
            self.metrics.errors.labels("queue_full").inc()
            raise

    def submit_record(self, owner: str, body: dict[str, Any]) -> dict[str, Any]:
        """`submit`, answered with the accepted job's record (state, position)."""
        return self.job(owner, self.submit(owner, body).id)

    def metrics_text(self) -> bytes:
        return self.metrics.render()

    def jobs(self, owner: str) -> dict[str, Any]:
        """The caller's queued, running and recent jobs (queue and history introspection)."""
        mine = [self.job(owner, j.id) for j in list(self.book.jobs.values()) if j.owner == owner]
        earlier = [public(r) for r in list(self.book.earlier.values()) if r["owner"] == owner]
        return {"queued": self.book.queued, "jobs": sorted(earlier, key=lambda r: r["created"]) + mine}

    def progress(self, owner: str, job_id: str, seen: int) -> tuple[list[dict[str, Any]], bool]:
        """Progress events after the first `seen`, and whether the job has ended."""
        self.job(owner, job_id)  # NotFound for another owner's job
        job = self.book.get(job_id)
        if job is None:  # only on disk: it ended
            return [], True
        done = job.done  # read before the events: the last step's event is in by then
        return job.events[seen:], done

    def job(self, owner: str, job_id: str) -> dict[str, Any]:
        """The client's view of a job: live while it runs, from disk once it ended (restarts too)."""
        job = self.book.get(job_id)
        if job is not None:
            if job.owner != owner:
                raise NotFound(f"no generation {job_id!r}")
            record = job.record()
            position = self.book.position(job)
            if position is not None:
                record["position"] = position
            return record
        earlier = self.book.earlier.get(job_id)  # an earlier run's, as recovered (also when unwritable)
        if earlier is not None and earlier["owner"] == owner:
            return {k: v for k, v in earlier.items() if k != "owner"}
        return public(self.book.records.owned(owner, job_id))

    def cancel(self, owner: str, job_id: str) -> dict[str, Any]:
        job = self.book.get(job_id)
        if job is None or job.owner != owner:
            self.job(owner, job_id)  # 404, or an ended job from disk: nothing to cancel
            return self.job(owner, job_id)
        self.book.cancel(job)
        if job.state == State.CANCELLED:
            self.metrics.job_failed(job, "cancelled")
        return self.job(owner, job_id)

    def image(self, owner: str, job_id: str, k: int) -> Path:
        return self.book.records.image(self.job(owner, job_id), k)

    async def next_events(self, owner: str, job_id: str, seen: int, timeout: float) -> tuple[list, bool]:
        """`progress`, awaited up to `timeout` s for a new event or the end: the book wakes this
        coroutine on each step and at the end (no thread held, no polling)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        with self.book.watching(job_id) as changed:
            while True:
                changed.clear()
                events, done = self.progress(owner, job_id, seen)
                if events or done or loop.time() >= end:
                    return events, done
                try:
                    await asyncio.wait_for(changed.wait(), end - loop.time())
                except asyncio.TimeoutError:
                    pass

    # ---------------------------------------------------------------- shutdown

    def shutdown(self, mode: str | None = None, drain_s: float | None = None) -> None:
        """Stop admitting; finish or cancel queued and running work; stop the worker."""
        mode = mode or self.settings.shutdown
        drain_s = self.settings.drain_s if drain_s is None else drain_s
        self.draining = True
        end = time.monotonic() + drain_s
        if mode == "finish":
            while (self.book.queued or self.book.running) and time.monotonic() < end:
                time.sleep(0.05)
        for job in self.book.pending():
            self.book.cancel(job, SHUTDOWN_REASON)  # queued: cancelled now
            self.metrics.job_failed(job, "cancelled")
        for running in list(self.book.running.values()):
            self.book.cancel(running, SHUTDOWN_REASON)  # stops at its next step boundary (or at the stop)
        self.worker.stopping.set()
        self.worker.join(timeout=max(end - time.monotonic(), 0.0) + 2.0)
        if self.worker.is_alive():  # mid-step (the thread is a daemon): its jobs end here, on disk
            for running in list(self.book.running.values()):
                self.book.finish(running, State.CANCELLED, f"{SHUTDOWN_REASON} mid-step", "interrupted")
        with contextlib.suppress(queue.Empty):  # registrations that will never run: 503 now
            while True:
                self.worker.tasks.get_nowait()[1].set_exception(Unavailable("the service is shutting down"))
        log.info("service stopped (%s)", mode)


def parse_job(
    body: dict[str, Any], size: tuple[int, int], default_timeout: float
) -> tuple[str, GenerationRequest, int, float]:
    """(identity, validated request, priority, timeout) of a JSON generation body; InputError naming
    the field otherwise. Height and width default to `size` (the backend's typical size)."""
    body = dict(body)
    job = {p.name: body.pop(p.name, p.default) for p in REQUEST_PARAMS if p.group == SERVICE}
    job["timeout_s"] = default_timeout if job["timeout_s"] is None else job["timeout_s"]
    for p in REQUEST_PARAMS:
        if p.group == SERVICE:
            p.check(job[p.name])
    body.setdefault("height", size[0])
    body.setdefault("width", size[1])
    request = make_request(body.pop("prompt", None), body.pop("recipe", None), **body)
    return job["identity"], request, job["priority"], float(job["timeout_s"])


def _safe_name(name: str | None, i: int) -> str:
    """An upload's base name for messages and temporary files, cut to 100 bytes ('photo<i>' if none)."""
    base = Path(name or "").name.replace("\x00", "").encode()[:100].decode(errors="ignore")
    return base if base and base not in (".", "..") else f"photo{i}"

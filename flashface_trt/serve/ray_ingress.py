"""The `service.API` of a Ray Serve ingress replica: validation here, work on the model replicas.

Identities, job records and images live in the data directory every process reads (the records
the model replicas' services write): any ingress replica answers for any job. When the replica
running a job dies, the ingress that accepted it sends it once more to another replica, else
records it as failed with the reason; with no replica running, new work gets 503.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from ..runtime.errors import StorageError
from ..runtime.faces.outputs import write_atomic
from ..runtime.sampling.cost import Admission
from .config import ServeSettings
from .jobs import Job
from .metrics import CacheCollector
from .ray_config import MODEL
from .ray_replica import replica_admission, replica_caches
from .records import STORAGE_DOWN, JobRecords, QueueFull, State, ended, error_kind, failed, new_job_id, public
from .service import LIMITS, Unavailable, parse_job
from .store import IdentityStore

log = logging.getLogger(__name__)


def _unwrap(exc: BaseException) -> BaseException:
    """The error a replica raised, from Ray's wrapper (RayTaskError keeps it as `cause`)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


class RayAPI:
    """The routes' operations over the model deployment's handle and the shared data directory."""

    def __init__(
        self, settings: ServeSettings, model: Any, app_name: str, size: tuple[int, int] | None
    ) -> None:
        self.settings = settings
        self.model = model
        self.app_name = app_name
        self.root = Path(settings.data_dir)
        self.records = JobRecords(self.root / "jobs")
        self.store = IdentityStore(self.root / "identities")
        self.size = size
        self.inflight: set[str] = set()
        self.admitted = (-1.0, Admission(settings.max_cost))  # (when read, the replicas' limits)
        self.lock = threading.Lock()
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("flashface_replicas", "model replicas running", registry=r).set_function(self.replicas)
        inflight = Gauge("flashface_inflight_jobs", "jobs accepted here, not ended", registry=r)
        inflight.set_function(lambda: len(self.inflight))
        identities = Gauge("flashface_identities", "registered identities", registry=r)
        identities.set_function(lambda: len(self.store.ids()))
        self.registry.register(CacheCollector(lambda: replica_caches(self.root)))

    # ---------------------------------------------------------------- health

    def model_status(self) -> Any:
        from ray import serve

        try:
            return serve.status().applications[self.app_name].deployments[MODEL]
        except (KeyError, AttributeError):
            return None

    def admission(self) -> Admission:
        """The model replicas' tightest limits, read again from their files at most once a second."""
        if time.monotonic() - self.admitted[0] > 1.0:
            self.admitted = (time.monotonic(), replica_admission(self.root, self.settings.max_cost))
        return self.admitted[1]

    def replicas(self) -> int:
        """Model replicas running now (0: nothing can run, new work gets 503)."""
        from ray.serve.schema import ReplicaState

        model = self.model_status()
        return 0 if model is None else int(model.replica_states.get(ReplicaState.RUNNING, 0))

    def status(self) -> dict[str, Any]:
        n, writable = self.replicas(), self.records.writable()
        reason = None if writable else STORAGE_DOWN
        if n == 0:  # Ray's reason (e.g. resources no node has) and the usual fix
            said = getattr(self.model_status(), "message", "") or "starting"
            reason = f"no model replica is running ({said}); without GPUs: --gpus-per-replica 0 or auto"
        ready = n > 0 and writable
        out = {"ready": ready, "reason": reason, "draining": False, "backend": "ray", "replicas": n}
        settings = {k: getattr(self.settings, k) for k in LIMITS}
        limits = {**self.admission().limits(), **settings}
        return {**out, "inflight": len(self.inflight), "limits": limits}

    def _require_replicas(self) -> None:
        if self.replicas() == 0:
            raise Unavailable("no model replica is running; retry when /readyz says ready")

    def metrics_text(self) -> bytes:
        """Prometheus text: the replicas' cache counters summed and each with a label, replicas, jobs."""
        return generate_latest(self.registry)

    # ---------------------------------------------------------------- identities

    def register(
        self, owner: str, uploads: Sequence[tuple[str, bytes]], cropped: bool = False, largest: bool = False
    ) -> dict[str, Any]:
        """Detected, cropped, encoded and stored on a model replica (which checks the upload limit)."""
        self._require_replicas()
        try:
            return self.model.register.remote(owner, list(uploads), cropped, largest).result(
                timeout_s=self.settings.timeout_s
            )
        except Exception as exc:
            raise _unwrap(exc) from None

    def identity_record(self, owner: str, identity: str) -> dict[str, Any]:
        return self.store.owned(identity, owner).public()

    def delete_identity(self, owner: str, identity: str) -> None:
        self.store.delete(identity, owner)

    def identities(self, owner: str) -> dict[str, Any]:
        return {"identities": self.store.listed(owner)}

    # ---------------------------------------------------------------- jobs

    def default_size(self) -> tuple[int, int]:
        if self.size is None:
            self.size = tuple(self.model.default_size.remote().result(timeout_s=60))  # type: ignore[assignment]
        assert self.size is not None
        return self.size

    def submit_record(self, owner: str, body: dict[str, Any]) -> dict[str, Any]:
        """Validate here (the same code as a single node), record the job as queued, hand it on."""
        self._require_replicas()
        identity, request, priority, timeout = parse_job(body, self.default_size(), self.settings.timeout_s)
        self.admission().check(request)  # before a job exists
        self.store.owned(identity, owner)
        with self.lock:
            queued = sum(1 for j in self.inflight if (self.records.read(j) or {}).get("state") == "queued")
            if queued >= self.settings.max_queue:
                raise QueueFull(f"the queue holds {queued} jobs (limit {self.settings.max_queue})", 5)
            job_id = new_job_id()
            self.inflight.add(job_id)
        try:
            self.records.write(Job(job_id, owner, identity, request, priority, timeout).stored())
        except StorageError:
            self.inflight.discard(job_id)
            raise
        args = (owner, job_id, dict(body), identity, timeout)
        threading.Thread(target=self._follow, args=args, name=f"job-{job_id}", daemon=True).start()
        end = time.monotonic() + 5  # answer once a replica holds it (its queue position is then known)
        while time.monotonic() < end:
            record = self.records.owned(owner, job_id)
            if "position" in record or record["state"] != State.QUEUED.value:
                break
            time.sleep(0.01)
        return self.job(owner, job_id)

    def _follow(self, owner: str, job_id: str, body: dict[str, Any], identity: str, timeout: float) -> None:
        """Wait for the replica's answer; on a dead replica send the job once more, on a full one
        wait for room until the job's deadline; anything else fails the job with its kind."""
        deadline = time.monotonic() + timeout
        try:
            attempt = 1
            while True:
                call = self.model.options(multiplexed_model_id=identity).generate
                try:
                    call.remote(owner, job_id, body, identity).result(timeout_s=timeout + 30)
                    return
                except Exception as exc:
                    err = _unwrap(exc)
                record = self.records.read(job_id) or {"id": job_id, "state": State.QUEUED.value}
                if ended(record):
                    return  # the replica finished it before the answer was lost
                cancelled = self.records.cancel_flag(job_id).exists()
                kind = error_kind(err)
                if isinstance(err, QueueFull) and not cancelled and time.monotonic() < deadline:
                    time.sleep(0.25)  # accepted here: it waits for room, as a queued job does
                    continue
                if kind == "replica_died" and attempt == 1 and not cancelled:
                    attempt = 2
                    log.warning("job=%s: its replica died (%s); sending it on", job_id, type(err).__name__)
                    self.records.write({**record, "state": State.QUEUED.value, "step": 0})
                    continue
                error = f"{type(err).__name__}: {err}".splitlines()[0]
                log.warning("job=%s failed (%s): %s", job_id, kind, error)
                self.records.write(failed(record, error, kind))
                return
        except StorageError as exc:  # a full or read-only disk: logged, this thread ends cleanly
            log.error("job=%s: its record was not stored: %s", job_id, exc)
        finally:
            with self.lock:
                self.inflight.discard(job_id)

    def job(self, owner: str, job_id: str) -> dict[str, Any]:
        return public(self.records.owned(owner, job_id))

    def jobs(self, owner: str) -> dict[str, Any]:
        mine = sorted(
            (public(r) for r in self.records.all() if r.get("owner") == owner), key=lambda r: r["created"]
        )
        return {"queued": sum(r["state"] == State.QUEUED.value for r in mine), "jobs": mine}

    def cancel(self, owner: str, job_id: str) -> dict[str, Any]:
        record = self.job(owner, job_id)
        if not ended(record):
            write_atomic(self.records.cancel_flag(job_id), b"")
            if record["state"] == State.QUEUED.value:  # answered as the replica will record it
                end = time.monotonic() + 5
                while time.monotonic() < end and self.job(owner, job_id)["state"] == State.QUEUED.value:
                    time.sleep(0.02)
        return self.job(owner, job_id)

    def image(self, owner: str, job_id: str, k: int) -> Path:
        return self.records.image(self.job(owner, job_id), k)

    def progress(self, owner: str, job_id: str, seen: int) -> tuple[list[dict[str, Any]], bool]:
        record = self.job(owner, job_id)
        step, steps = int(record.get("step", 0)), int(record["steps"])
        return [{"step": k, "steps": steps} for k in range(seen + 1, step + 1)], ended(record)

    async def next_events(self, owner: str, job_id: str, seen: int, timeout: float) -> tuple[list, bool]:
        """`progress` from the shared records, read again every 0.05 s up to `timeout` s."""
        end = time.monotonic() + timeout
        while True:
            events, done = await asyncio.to_thread(self.progress, owner, job_id, seen)
            if events or done or time.monotonic() >= end:
                return events, done
            await asyncio.sleep(0.05)

"""Scale-out on Ray Serve: the same HTTP API over N model replicas, routed by identity.

An ingress deployment serves the FastAPI app of `app.py` over `RayAPI`; each model replica runs
a single-node `Service` (its worker owns one device's backend). Requests for an identity carry it
as Ray Serve's multiplexed model id, so they land on a replica that already holds its latents and
reference K/V (each replica keeps a bounded LRU of identities). Identities, job records and images
live in a data directory every process can read (a shared filesystem; a local one in tests):
any ingress replica answers for any job. When the replica running a job dies, the ingress that
accepted it sends it once more to another replica, else records it as failed with the reason;
with no replica running, new work gets 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..runtime.errors import FlashFaceError, InputError
from .config import ServeSettings
from .jobs import State, new_job_id, read_record, write_record
from .service import (
    NotFound,
    PayloadTooLarge,
    QueueFull,
    Service,
    Unavailable,
    image_file,
    parse_job,
)
from .store import IdentityStore
from .worker import LoadBackend

log = logging.getLogger(__name__)

MODEL = "FlashFaceModel"
INGRESS = "FlashFaceIngress"


@dataclass(frozen=True)
class RayConfig:
    """How the deployment scales (the `serve run` config file carries the same fields).

    min_replicas/max_replicas: model replicas (equal: a fixed count; else autoscaling on
    `target_ongoing_requests` per replica); num_gpus/num_cpus: resources of one model replica
    (1 GPU in production, 0 in CPU tests); identities_per_replica: identities a replica keeps
    loaded (LRU); ingress_replicas: HTTP replicas; app_name, route_prefix: the Serve application;
    health_check_period_s: how often Serve checks each model replica, so how soon a dead one is
    replaced (not a `serve` option: the tests shorten it).
    """

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0
    num_gpus: float = 1.0
    num_cpus: float = 1.0
    identities_per_replica: int = 16
    ingress_replicas: int = 1
    app_name: str = "flashface"
    route_prefix: str = "/"
    health_check_period_s: float = 5.0

    def validated(self) -> RayConfig:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise InputError(
                f"replicas need 1 <= min ({self.min_replicas}) <= max ({self.max_replicas})", "min_replicas"
            )
        for name in ("identities_per_replica", "ingress_replicas"):
            if getattr(self, name) < 1:
                raise InputError(f"{name}={getattr(self, name)} must be at least 1", name)
        if not self.target_ongoing_requests > 0:
            raise InputError(
                f"target_ongoing_requests={self.target_ongoing_requests} must be > 0",
                "target_ongoing_requests",
            )
        if not self.health_check_period_s > 0:
            raise InputError(
                f"health_check_period_s={self.health_check_period_s} must be > 0", "health_check_period_s"
            )
        for name in ("num_gpus", "num_cpus"):
            if not getattr(self, name) >= 0:
                raise InputError(f"{name}={getattr(self, name)} must be >= 0", name)
        return self

    def deployment_options(self, max_queue: int) -> dict[str, Any]:
        """Ray Serve options of the model deployment."""
        scaling: dict[str, Any]
        if self.min_replicas == self.max_replicas:
            scaling = {"num_replicas": self.min_replicas}
        else:
            scaling = {
                "autoscaling_config": {
                    "min_replicas": self.min_replicas,
                    "max_replicas": self.max_replicas,
                    "target_ongoing_requests": self.target_ongoing_requests,
                }
            }
        return {
            **scaling,
            # our own priority queue holds the work: let requests reach it instead of Ray's router queue
            "max_ongoing_requests": max_queue + 4,
            "ray_actor_options": {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus},
            "health_check_period_s": self.health_check_period_s,
        }


class ModelReplica:
    """One model replica: a single-node service over the shared data directory."""

    def __init__(self, settings: ServeSettings, load: LoadBackend, size: tuple[int, int] | None) -> None:
        self.service = Service(settings, load, size, shared=True).start()
        while not self.service.worker.ready.wait(0.5):  # Serve routes to a replica once it is constructed
            if self.service.worker.load_error is not None:
                raise RuntimeError(f"the backend failed to load: {self.service.worker.load_error}")
        self.root = Path(settings.data_dir)
        self.tag = f"{os.uname().nodename}-{os.getpid()}"
        self._write_stats()

    def check_health(self) -> None:
        if self.service.worker.load_error is not None or not self.service.worker.is_alive():
            raise RuntimeError("the worker thread is gone")

    async def load_identity(self, identity: str) -> str:
        """Multiplexed loader: the identity's latents onto this replica's backend (LRU over ids)."""
        item = self.service.store.find(identity)
        if item is None:
            raise NotFound(f"no identity {identity!r}")
        await asyncio.wrap_future(self.service.worker.call(lambda: self.service.worker.identity(item)))
        return identity

    async def register(
        self, owner: str, uploads: Sequence[tuple[str, bytes]], cropped: bool, largest: bool
    ) -> dict[str, Any]:
        return await asyncio.to_thread(self.service.register, owner, uploads, cropped, largest)

    def default_size(self) -> tuple[int, int]:
        return self.service.worker.default_size()

    async def generate(self, owner: str, job_id: str, body: dict[str, Any], identity: str) -> dict[str, Any]:
        """Accept one job into this replica's queue and answer with its record once it ended."""
        await self.load_identity(identity)
        cancel = self.root / "jobs" / job_id / "cancel"
        job = self.service.submit(owner, body, job_id)
        while not job.done:
            if cancel.exists() and job.cancel_reason is None:
                self.service.book.cancel(job)
            await asyncio.sleep(0.02)
        self._write_stats()
        return self.service.job(owner, job_id)

    def _write_stats(self) -> None:
        """This replica's counters, beside the other replicas', for the ingress's /metrics."""
        stats = {
            "tag": self.tag,
            "kv_cache": self.service._kv_stats() or {},
            "identities_loaded": sum(
                1 for i in self.service.store.items.values() if i.backend_latents is not None
            ),
            "queued": self.service.book.queued,
            "time": time.time(),
        }
        folder = self.root / "replicas"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{self.tag}.json"
        tmp.write_text(json.dumps(stats))
        tmp.replace(folder / f"{self.tag}.json")


def _unwrap(exc: BaseException) -> BaseException:
    """The error a replica raised, from Ray's wrapper (RayTaskError keeps it as `cause`)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _replica_died(exc: BaseException) -> bool:
    """Whether a call failed because its replica (actor, worker process or node) went away.

    A killed replica shows up as one of several errors, depending on when the call noticed: the
    actor's death, its worker's crash, its node's loss, or Serve's own unavailable replica or
    cancelled request (a request still in the dead replica's queue; a client's cancel is told
    apart by the job's cancel flag before this is asked).
    """
    from ray.exceptions import (
        ActorDiedError,
        ActorUnavailableError,
        NodeDiedError,
        RayActorError,
        TaskCancelledError,
        WorkerCrashedError,
    )
    from ray.serve.exceptions import ReplicaUnavailableError, RequestCancelledError

    lost = (
        ActorDiedError,
        ActorUnavailableError,
        RayActorError,
        WorkerCrashedError,
        NodeDiedError,
        ReplicaUnavailableError,
        RequestCancelledError,
        TaskCancelledError,
    )
    return isinstance(exc, lost)


class RayAPI:
    """The `service.API` of the ingress: validation here, work on the model replicas, state on disk."""

    def __init__(
        self, settings: ServeSettings, model: Any, app_name: str, size: tuple[int, int] | None
    ) -> None:
        self.settings = settings
        self.model = model
        self.app_name = app_name
        self.root = Path(settings.data_dir)
        self.jobs_dir = self.root / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.store = IdentityStore(self.root / "identities")
        self.size = size
        self.inflight: set[str] = set()
        self.lock = threading.Lock()

    # ---------------------------------------------------------------- health

    def replicas(self) -> int:
        """Model replicas running now (0: nothing can run, new work gets 503)."""
        from ray import serve
        from ray.serve.schema import ReplicaState

        try:
            app = serve.status().applications[self.app_name]
            return int(app.deployments[MODEL].replica_states.get(ReplicaState.RUNNING, 0))
        except (KeyError, AttributeError):
            return 0

    def status(self) -> dict[str, Any]:
        n = self.replicas()
        return {
            "ready": n > 0,
            "draining": False,
            "backend": "ray",
            "replicas": n,
            "inflight": len(self.inflight),
        }

    def _require_replicas(self) -> None:
        if self.replicas() == 0:
            raise Unavailable("no model replica is running; retry when /readyz says ready")

    def metrics_text(self) -> bytes:
        """Prometheus text: the sum over the replicas' counters, and each replica's with a label."""
        rows = []
        for path in sorted((self.root / "replicas").glob("*.json")):
            try:
                rows.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError):
                continue
        lines = []
        for name in ("hits", "misses", "bytes", "entries"):
            kind = "counter" if name in ("hits", "misses") else "gauge"
            metric = f"flashface_kv_cache_{name}" + ("_total" if kind == "counter" else "")
            lines += [f"# TYPE {metric} {kind}", f"{metric} {sum(r['kv_cache'].get(name, 0) for r in rows)}"]
            per = f"flashface_replica_kv_cache_{name}" + ("_total" if kind == "counter" else "")
            lines.append(f"# TYPE {per} {kind}")
            lines += [f'{per}{{replica="{r["tag"]}"}} {r["kv_cache"].get(name, 0)}' for r in rows]
        lines += ["# TYPE flashface_replicas gauge", f"flashface_replicas {self.replicas()}"]
        lines += ["# TYPE flashface_inflight_jobs gauge", f"flashface_inflight_jobs {len(self.inflight)}"]
        lines += [
            "# TYPE flashface_identities gauge",
            f"flashface_identities {len(list(self.store.root.glob('*/meta.json')))}",
        ]
        return ("\n".join(lines) + "\n").encode()

    # ---------------------------------------------------------------- identities

    def register(
        self, owner: str, uploads: Sequence[tuple[str, bytes]], cropped: bool = False, largest: bool = False
    ) -> dict[str, Any]:
        self._require_replicas()
        total = sum(len(d) for _, d in uploads)
        if total > self.settings.max_upload_bytes:
            raise PayloadTooLarge(
                f"uploads of {total} bytes exceed the limit of {self.settings.max_upload_bytes}"
            )
        try:
            return self.model.register.remote(owner, list(uploads), cropped, largest).result(
                timeout_s=self.settings.timeout_s
            )
        except Exception as exc:
            raise _unwrap(exc) from None

    def identity_record(self, owner: str, identity: str) -> dict[str, Any]:
        item = self.store.get(identity, owner)
        if item is None:
            raise NotFound(f"no identity {identity!r}")
        return item.public()

    def delete_identity(self, owner: str, identity: str) -> None:
        if self.store.get(identity, owner) is None or not self.store.delete(identity, owner):
            raise NotFound(f"no identity {identity!r}")

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
        if self.store.get(identity, owner) is None:
            raise NotFound(f"no identity {identity!r}")
        with self.lock:
            queued = sum(
                1 for j in self.inflight if (read_record(self.jobs_dir / j) or {}).get("state") == "queued"
            )
            if queued >= self.settings.max_queue:
                raise QueueFull(f"the queue holds {queued} jobs (limit {self.settings.max_queue})", 5)
            job_id = new_job_id()
            self.inflight.add(job_id)
        now = time.time()
        record = {
            "id": job_id,
            "state": State.QUEUED.value,
            "identity": identity,
            "priority": priority,
            "seed": request.seed,
            "steps": request.steps,
            "step": 0,
            "created": now,
            "started": None,
            "finished": None,
            "owner": owner,
            "attempts": 1,
        }
        write_record(self.jobs_dir / job_id, record)
        args = (owner, job_id, dict(body), identity, timeout)
        threading.Thread(target=self._follow, args=args, name=f"job-{job_id}", daemon=True).start()
        end = time.monotonic() + 5  # answer once a replica holds it (its queue position is then known)
        while time.monotonic() < end:
            record = self._record(owner, job_id)
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
                    record = read_record(self.jobs_dir / job_id) or {}
                    if record.get("state") in [
                        s.value for s in (State.SUCCEEDED, State.FAILED, State.CANCELLED)
                    ]:
                        return  # the replica finished it before the answer was lost
                    cancelled = (self.jobs_dir / job_id / "cancel").exists()
                    if isinstance(err, QueueFull) and not cancelled and time.monotonic() < deadline:
                        time.sleep(0.25)  # accepted here: it waits for room, as a queued job does
                        continue
                    if _replica_died(err) and attempt == 1 and not cancelled:
                        attempt = 2
                        log.warning(
                            "job=%s: its replica died (%s); sending it to another", job_id, type(err).__name__
                        )
                        write_record(
                            self.jobs_dir / job_id, {**record, "state": "queued", "step": 0, "attempts": 2}
                        )
                        continue
                    kind = "replica_died" if _replica_died(err) else "internal"
                    if isinstance(err, FlashFaceError):
                        kind = "input" if isinstance(err, InputError) else "model"
                    if "GetTimeoutError" in type(err).__name__ or isinstance(err, QueueFull):
                        kind = "timeout"  # no replica had room for it before its deadline
                    self._fail(job_id, record, f"{type(err).__name__}: {err}".splitlines()[0], kind)
                    return
        finally:
            with self.lock:
                self.inflight.discard(job_id)

    def _fail(self, job_id: str, record: dict[str, Any], error: str, kind: str) -> None:
        log.warning("job=%s failed (%s): %s", job_id, kind, error)
        write_record(
            self.jobs_dir / job_id,
            {
                **record,
                "state": State.FAILED.value,
                "error": error,
                "error_kind": kind,
                "finished": time.time(),
            },
        )

    def _record(self, owner: str, job_id: str) -> dict[str, Any]:
        if "/" in job_id or job_id.startswith("."):
            raise NotFound(f"no generation {job_id!r}")
        record = read_record(self.jobs_dir / job_id)
        if record is None or record.get("owner") != owner:
            raise NotFound(f"no generation {job_id!r}")
        return record

    def job(self, owner: str, job_id: str) -> dict[str, Any]:
        record = self._record(owner, job_id)
        out = {k: v for k, v in record.items() if k not in ("owner", "request", "attempts")}
        if out["state"] != State.QUEUED.value:
            out.pop("position", None)
        return out

    def jobs(self, owner: str) -> dict[str, Any]:
        mine = []
        for path in self.jobs_dir.glob("*/record.json"):
            record = read_record(path.parent)
            if record is not None and record.get("owner") == owner:
                mine.append(self.job(owner, record["id"]))
        mine.sort(key=lambda r: r["created"])
        return {"queued": sum(r["state"] == "queued" for r in mine), "jobs": mine}

    def cancel(self, owner: str, job_id: str) -> dict[str, Any]:
        record = self._record(owner, job_id)
        if record["state"] in (State.QUEUED.value, State.RUNNING.value):
            (self.jobs_dir / job_id / "cancel").touch()
            if record["state"] == State.QUEUED.value:  # answered as the replica will record it
                end = time.monotonic() + 5
                while time.monotonic() < end and self._record(owner, job_id)["state"] == State.QUEUED.value:
                    time.sleep(0.02)
        return self.job(owner, job_id)

    def image(self, owner: str, job_id: str, k: int) -> Path:
        return image_file(self.job(owner, job_id), self.jobs_dir / job_id / f"{k}.png", k)

    def wait(self, owner: str, job_id: str, timeout: float) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            record = self.job(owner, job_id)
            if record["state"] not in ("queued", "running") or time.monotonic() > end:
                return record
            time.sleep(0.05)

    def progress(self, owner: str, job_id: str, seen: int) -> tuple[list[dict[str, Any]], bool]:
        record = self.job(owner, job_id)
        done = record["state"] not in ("queued", "running")
        step, steps = int(record.get("step", 0)), int(record["steps"])
        return [{"step": k, "steps": steps} for k in range(seen + 1, step + 1)], done


_CURRENT: dict[str, RayAPI] = {}  # this ingress replica's API (set in its constructor)


class _IngressAPI:
    """The routes' view of the ingress replica's `RayAPI` (made in the replica, after the routes)."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "api" not in _CURRENT:  # unpickling asks for dunders first
            raise AttributeError(name)
        return getattr(_CURRENT["api"], name)


class IngressReplica:
    """The HTTP replica: the FastAPI app over `RayAPI` and a handle to the model deployment."""

    def __init__(
        self, model: Any, settings: ServeSettings, app_name: str, size: tuple[int, int] | None
    ) -> None:
        _CURRENT["api"] = RayAPI(settings, model, app_name, size)


def build_app(
    settings: ServeSettings, load: LoadBackend, size: tuple[int, int] | None, config: RayConfig
) -> Any:
    """The Ray Serve application: an ingress (the FastAPI app) bound to the model deployment."""
    from fastapi import FastAPI
    from ray import serve

    from .app import create_app

    config = config.validated()
    settings = settings.validated()
    options = config.deployment_options(settings.max_queue)

    class Replica(ModelReplica):
        @serve.multiplexed(max_num_models_per_replica=config.identities_per_replica)
        async def load_identity(self, identity: str) -> str:  # type: ignore[override]
            return await ModelReplica.load_identity(self, identity)

    model: Any = serve.deployment(name=MODEL, **options)(Replica)

    fastapi_app: FastAPI = create_app(_IngressAPI(settings))
    ingress: Any = serve.deployment(
        name=INGRESS,
        num_replicas=config.ingress_replicas,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1000,
    )(serve.ingress(fastapi_app)(IngressReplica))
    return ingress.bind(model.bind(settings, load, size), settings, config.app_name, size)


def run(
    settings: ServeSettings,
    load: LoadBackend,
    size: tuple[int, int] | None,
    config: RayConfig,
    address: str | None,
) -> int:
    """`flashface-trt serve --ray`: connect to (or start) a Ray cluster, deploy, serve until SIGTERM."""
    import signal

    import ray
    from ray import serve

    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app(settings, load, size, config), name=config.app_name, route_prefix=config.route_prefix)
    log.info(
        "Ray Serve application %r on http://%s:%d (%s)",
        config.app_name,
        settings.host,
        settings.port,
        asdict(config),
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    stop.wait()
    serve.delete(config.app_name)
    return 0

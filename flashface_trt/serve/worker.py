"""The one worker thread that owns the backend: it loads and warms it up, registers identities and
runs generations one step at a time, checking cancellation and the deadline between steps.

Backends are not thread-safe, so every call into one happens here; the HTTP side only submits
work and reads state. A failure inside a job (bad input, out of memory, a bug) fails that job with
its reason and the worker takes the next one.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ..runtime.errors import InputError, StorageError
from ..runtime.faces.images import synthetic_face
from ..runtime.faces.outputs import save_image
from ..runtime.faces.references import load_references
from ..runtime.sampling.executor import StepExecutor, Stopped, Task
from ..runtime.sampling.identities import Identity
from ..runtime.sampling.params import BATCH_ROWS, DEFAULT_SIZE
from ..runtime.sampling.prepare import Backend, prepare_references
from ..runtime.sampling.request import GenerationRequest
from .jobs import SHUTDOWN_REASON, Job, JobBook, State
from .metrics import Metrics
from .records import error_kind, storage_message
from .store import IdentityStore, StoredIdentity, identity_id

log = logging.getLogger(__name__)

# (backend, detector factory or None): what `flashface-trt serve` loads on the worker thread
LoadBackend = Callable[[], tuple[Backend, Callable[[], Any] | None]]


class Worker(threading.Thread):
    """Loads the backend, then serves identity registrations (first) and queued jobs."""

    def __init__(
        self,
        load: LoadBackend,
        book: JobBook,
        store: IdentityStore,
        metrics: Metrics,
        warmup_steps: int,
        size: tuple[int, int] | None = None,
        max_batch_rows: int = BATCH_ROWS.default,
    ) -> None:
        super().__init__(name="flashface-worker", daemon=True)
        self.load, self.book, self.store, self.metrics = load, book, store, metrics
        self.warmup_steps = warmup_steps
        self.size = size
        self.max_batch_rows = max_batch_rows
        self.executor: StepExecutor
        self.tasks_by_job: dict[str, tuple[Job, Task]] = {}
        self.tasks: queue.Queue[tuple[Callable[[], Any], Future]] = queue.Queue()
        self.backend: Backend | None = None
        self.detector_factory: Callable[[], Any] | None = None
        self.detector: Any = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.stopping = threading.Event()
        self.encoder = ""

    # ---------------------------------------------------------------- the loop

    def run(self) -> None:
        try:
            self.backend, self.detector_factory = self.load()
            be = self.backend
            self.encoder = f"{be.name}/{be.precision}/{be.ref_size}px"  # what stored latents came from
            self.executor = StepExecutor(self.backend, self.max_batch_rows)
            if self.warmup_steps:
                self._warm_up()
        except BaseException as exc:  # reported by /readyz and every request from now on
            log.exception("the backend failed to load")
            self.load_error = exc
            return
        self.ready.set()
        log.info("worker ready on %s", self.encoder)
        while not self.stopping.is_set():
            try:
                self._run_tasks()  # registrations and other calls: between every two steps
                for job in self.book.expire():
                    self.metrics.job_failed(job, "timeout")
                self._admit()
                if self.executor.busy:
                    self.executor.run_once()
                    self._collect()
            except Exception:  # a bug outside any one job: logged, the worker goes on
                log.exception("worker loop")
                time.sleep(0.1)
        self._stop_jobs()
        self._run_tasks()

    def _stop_jobs(self) -> None:
        """On stop: the jobs this worker still holds end cancelled, none is left 'running' on disk.

        `Service.shutdown` cancels the queued and running jobs before it stops the loop, but a
        running job ends only at its next step boundary, and a job taken from the queue after
        the cancellations was never cancelled: both are stopped here, before any further step.
        """
        for job, _ in list(self.tasks_by_job.values()):
            self.book.cancel(job, SHUTDOWN_REASON)
        while self.executor.busy:
            self.executor.run_once()  # each task's check stops it before its next step
            self._collect()

    def _admit(self) -> None:
        """Move queued jobs into the executor only while they can run now (waiting briefly when idle)."""
        ex = self.executor
        while True:
            fits = lambda job: 3 * job.request.num_samples <= ex.room() or not ex.busy  # noqa: E731
            job = self.book.take(0.0 if ex.busy else 0.05, fits)
            if job is None:
                return
            try:
                self.tasks_by_job[job.id] = (job, ex.submit(self._task(job)))
            except Exception as exc:
                self._failed(job, exc)

    def _run_tasks(self) -> None:
        while True:
            try:
                fn, future = self.tasks.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the worker thread, before the next job; its result or error in the future."""
        future: Future = Future()
        self.tasks.put((fn, future))
        return future

    def _warm_up(self) -> None:
        """One short generation (both batch layouts) through the executor that serves, so that the
        first client pays no capture."""
        t0 = time.perf_counter()
        size = self.default_size()
        req = GenerationRequest(prompt="warm-up", steps=self.warmup_steps, height=size[0], width=size[1])
        task = Task(req, [synthetic_face()], name="warm-up")
        self.executor.run([task])
        if task.error is not None:
            raise task.error
        log.info("warm-up generation in %.1f s", time.perf_counter() - t0)

    def default_size(self) -> tuple[int, int]:
        """Height and width of requests that give none: the configured size, else the typical size
        of the backend's export or engines, else DEFAULT_SIZE's."""
        if self.size is not None:
            return self.size
        manifest = getattr(self.backend, "manifest", None) or {}
        shapes = (
            manifest.get("shapes") if "networks" in manifest else manifest.get("export", {}).get("shapes")
        )
        if shapes:
            return int(shapes["opt_height"]), int(shapes["opt_width"])
        return DEFAULT_SIZE["weights"], DEFAULT_SIZE["weights"]

    # ---------------------------------------------------------------- identities

    def register(
        self, owner: str, uploads: Sequence[tuple[str, bytes]], cropped: bool, largest: bool, max_pixels: int
    ) -> StoredIdentity:
        """Decode, detect (unless cropped), crop, encode once and store; runs on the worker thread."""
        assert self.backend is not None
        with tempfile.TemporaryDirectory(prefix="flashface-upload-") as tmp:
            paths = []
            for i, (name, data) in enumerate(uploads):
                path = Path(tmp) / f"{i:02d}" / name  # the photo's own name in messages
                path.parent.mkdir()
                path.write_bytes(data)
                paths.append(path)
            detector = None if cropped else self._detector()
            try:
                refs = load_references(paths, detector, largest, max_pixels)
            except InputError as exc:  # the client's file names, not this server's temporary paths
                exc.args = (re.sub(re.escape(tmp) + r"/\d+/", "", str(exc)),)
                raise
        crops = prepare_references([r.crop for r in refs], self.backend.ref_size)  # [R, 3, S, S]
        known = self.store.get(identity_id(owner, crops), owner)
        if known is not None:  # the same crops again: nothing to encode
            return known
        latents = self.backend.encode_references(crops)
        faces = [
            {
                "photo": r.photo,
                "box": None if r.box is None else [round(float(v), 2) for v in r.box[:4]],
                "score": None if r.box is None else round(float(r.box[4]), 6),
            }
            for r in refs
        ]
        item = self.store.put(owner, crops, self.backend.to_host(latents), faces, self.encoder)
        if item.backend_latents is None:
            item.backend_latents = latents
        return item

    def _detector(self) -> Any:
        if self.detector is None:
            if self.detector_factory is None:
                raise InputError("this service has no face detector: register already-cropped faces")
            self.detector = self.detector_factory()
        return self.detector

    def identity(self, item: StoredIdentity) -> Identity:
        """The backend's view of a stored identity (latents loaded, or re-encoded, once)."""
        assert self.backend is not None
        if item.backend_latents is None:
            if item.encoder == self.encoder:
                item.backend_latents = self.backend.latents_from_host(self.store.latents(item))
            else:  # stored by another backend or precision: encode the crops here
                crops = self.store.crops(item)  # [R, 3, S, S]
                if crops.shape[-1] != self.backend.ref_size:
                    raise InputError(
                        f"identity {item.id!r} holds {crops.shape[-1]} px face crops, this service's"
                        f" networks take {self.backend.ref_size} px: register its photos again",
                        "identity",
                    )
                item.backend_latents = self.backend.encode_references(crops)
        return Identity(item.key, item.backend_latents)

    # ---------------------------------------------------------------- jobs

    def _task(self, job: Job) -> Task:
        """The executor's view of a job: its identity loaded, stop checks and progress wired."""
        item = self.store.get(job.identity, job.owner)
        if item is None:
            raise InputError(f"identity {job.identity!r} was deleted before the job ran", "identity")
        t0 = time.perf_counter()
        identity = self.identity(item)
        self.metrics.running.set(len(self.book.running))

        def check() -> str | None:
            if job.fault is not None:
                return f"storage: {job.fault}"
            if job.cancel_reason is not None:
                return f"cancelled: {job.cancel_reason}"
            if time.time() > job.deadline:
                return f"timeout: deadline of {job.timeout_s:g} s passed"
            return None

        def on_step(k: int, n: int) -> None:
            job.step = k
            job.events.append({"step": k, "steps": n})
            self.book.progress(job)

        task = Task(job.request, identity, job.priority, check, on_step, name=job.id)
        task.timings["identity"] = time.perf_counter() - t0
        return task

    def _collect(self) -> None:
        """Jobs whose task ended: images saved and the job finished (succeeded, failed, cancelled)."""
        for job_id, (job, task) in list(self.tasks_by_job.items()):
            if not task.done.is_set():
                continue
            del self.tasks_by_job[job_id]
            if task.error is not None:
                self._failed(job, task.error)
                continue
            paths = [self.book.records.image_path(job.id, k) for k in range(len(task.images or []))]
            try:
                for path, img in zip(paths, task.images or []):
                    save_image(img, path)
            except Exception as exc:
                for path in paths:  # a failed job keeps no image
                    with contextlib.suppress(OSError):
                        path.unlink(missing_ok=True)
                self._failed(job, exc)
                continue
            job.images, job.timings = (
                len(task.images or []),
                {k: round(v, 4) for k, v in task.timings.items()},
            )
            self.book.finish(job, State.SUCCEEDED)
            self.metrics.job_done(job, task.timings)
            log.info(
                "job=%s succeeded in %.2f s",
                job.id,
                time.time() - (job.started or job.created),
                extra={"job_id": job.id},
            )
        self.metrics.running.set(len(self.book.running))

    def _failed(self, job: Job, exc: BaseException) -> None:
        """End a job that stopped or failed with its reason; the worker goes on."""
        kind = error_kind(exc)
        state = State.CANCELLED if kind == "cancelled" else State.FAILED
        message = str(exc) if isinstance(exc, Stopped) else f"{type(exc).__name__}: {exc}"
        message = storage_message(exc) if isinstance(exc, StorageError) else message
        self.book.finish(job, state, message, kind)
        self.metrics.job_failed(job, kind)
        log.log(
            logging.INFO if state == State.CANCELLED else logging.WARNING,
            "job=%s %s (%s): %s",
            job.id,
            state.value,
            kind,
            message,
            extra={"job_id": job.id},
            exc_info=kind == "internal",
        )

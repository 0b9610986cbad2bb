"""The one worker thread that owns the backend: it loads and warms it up, registers identities and
runs generations one step at a time, checking cancellation and the deadline between steps.

Backends are not thread-safe, so every call into one happens here; the HTTP side only submits
work and reads state. A failure inside a job (bad input, out of memory, a bug) fails that job with
its reason and the worker takes the next one.
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ..runtime.errors import FlashFaceError, InputError
from ..runtime.identities import Identity
from ..runtime.images import synthetic_face
from ..runtime.pipeline import Backend, generate, prepare_references
from ..runtime.references import load_references
from ..runtime.request import GenerationRequest
from ..runtime.sampler import StepPlan
from .jobs import Job, JobBook, State
from .metrics import Metrics
from .store import IdentityStore, StoredIdentity, identity_id

log = logging.getLogger(__name__)

# (backend, detector factory or None): what `flashface-trt serve` loads on the worker thread
LoadBackend = Callable[[], tuple[Backend, Callable[[], Any] | None]]


class JobStopped(Exception):
    """Raised between steps: the job was cancelled (`kind` 'cancelled') or ran past its deadline."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def error_kind(exc: BaseException) -> str:
    """A short class of failure for the job record and the errors-by-kind metric."""
    if isinstance(exc, InputError):
        return "input"
    if isinstance(exc, MemoryError) or "OutOfMemory" in type(exc).__name__:
        return "out_of_memory"
    if isinstance(exc, FlashFaceError):
        return "model"
    return "internal"


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
    ) -> None:
        super().__init__(name="flashface-worker", daemon=True)
        self.load, self.book, self.store, self.metrics = load, book, store, metrics
        self.warmup_steps = warmup_steps
        self.size = size
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
            self.encoder = f"{self.backend.name}/{self.backend.precision}"
            if self.warmup_steps:
                self._warm_up()
        except BaseException as exc:  # reported by /readyz and every request from now on
            log.exception("the backend failed to load")
            self.load_error = exc
            return
        self.ready.set()
        log.info("worker ready on %s", self.encoder)
        while not self.stopping.is_set():
            self._run_tasks()
            job = self.book.take(timeout=0.05)
            if job is not None:
                self.run_job(job)
        self._run_tasks()

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
        """One short generation (both batch layouts) so that the first client pays no capture."""
        assert self.backend is not None
        t0 = time.perf_counter()
        size = self.default_size()
        req = GenerationRequest(prompt="warm-up", steps=self.warmup_steps, height=size[0], width=size[1])
        generate(self.backend, req, [synthetic_face()])
        log.info("warm-up generation in %.1f s", time.perf_counter() - t0)

    def default_size(self) -> tuple[int, int]:
        """Height and width of requests that give none: the configured size, else the typical size
        of the backend's export or engines, else 768 x 768."""
        if self.size is not None:
            return self.size
        manifest = getattr(self.backend, "manifest", None) or {}
        shapes = (
            manifest.get("shapes") if "networks" in manifest else manifest.get("export", {}).get("shapes")
        )
        if shapes:
            return int(shapes["opt_height"]), int(shapes["opt_width"])
        return 768, 768

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
            refs = load_references(paths, detector, largest, max_pixels)
        crops = prepare_references([r.crop for r in refs])  # [R, 3, 224, 224]
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
                item.backend_latents = self.backend.encode_references(self.store.crops(item))
        return Identity(item.key, item.backend_latents)

    # ---------------------------------------------------------------- jobs

    def run_job(self, job: Job) -> None:
        """Run one job to a terminal state; nothing it raises leaves this function."""
        assert self.backend is not None
        jlog = logging.LoggerAdapter(log, {"job_id": job.id})
        timings: dict[str, float] = {}
        self.metrics.running.set(1)
        try:
            if time.time() > job.deadline:
                raise JobStopped("timeout", f"deadline of {job.timeout_s:g} s passed while queued")
            item = self.store.get(job.identity, job.owner)
            if item is None:
                raise InputError(f"identity {job.identity!r} was deleted before the job ran", "identity")
            t0 = time.perf_counter()
            identity = self.identity(item)
            timings["identity"] = time.perf_counter() - t0
            images = generate(self.backend, job.request, identity, wrap=self._stepper(job), timings=timings)
            for k, img in enumerate(images):
                img.save(self.book.image_path(job.id, k), format="PNG")
            job.images, job.timings = len(images), {k: round(v, 4) for k, v in timings.items()}
            self.book.finish(job, State.SUCCEEDED)
            self.metrics.job_done(job, timings)
            jlog.info("job=%s succeeded in %.2f s", job.id, time.time() - (job.started or job.created))
        except JobStopped as exc:
            state = State.CANCELLED if exc.kind == "cancelled" else State.FAILED
            self.book.finish(job, state, str(exc), exc.kind)
            self.metrics.job_failed(job, exc.kind)
            jlog.info("job=%s %s: %s", job.id, state.value, exc)
        except Exception as exc:
            kind = error_kind(exc)
            self.book.finish(job, State.FAILED, f"{type(exc).__name__}: {exc}", kind)
            self.metrics.job_failed(job, kind)
            jlog.warning("job=%s failed (%s): %s", job.id, kind, exc, exc_info=kind == "internal")
        finally:
            self.metrics.running.set(0)

    def _stepper(self, job: Job) -> Callable[[Iterable[StepPlan]], Iterable[StepPlan]]:
        """The loop's `wrap`: stop between steps when cancelled or late, record progress after each."""

        def wrap(steps: Iterable[StepPlan]) -> Iterable[StepPlan]:
            steps = list(steps)
            for i, step in enumerate(steps):
                if job.cancel_reason is not None:
                    raise JobStopped("cancelled", f"{job.cancel_reason} after {i} of {len(steps)} steps")
                if time.time() > job.deadline:
                    raise JobStopped("timeout", f"deadline of {job.timeout_s:g} s passed at step {i}")
                yield step
                job.step = i + 1
                job.events.append({"step": i + 1, "steps": len(steps)})
                self.book.progress(job)

        return wrap

"""The step-level executor: requests join and leave a running batch between denoising steps.

Each iteration admits waiting requests (highest priority first, FIFO within a priority) while the
active rows stay within `max_batch_rows`, runs ONE batched step (`backend.step`) for the active
requests that can share a batch (same image size and references: those of the longest-waiting
active request, so no request starves), moves each request to its next step, reports progress,
decodes the finished requests and drops the cancelled ones. Every request's images are the ones
it would get alone: each keeps its own noise, timesteps, guidance, identity and prompt.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..errors import FlashFaceError
from .batch import Member
from .identities import Identity
from .params import BATCH_ROWS
from .prepare import Prepared, prefetch_kv, prepare
from .request import GenerationRequest

log = logging.getLogger(__name__)


class Stopped(FlashFaceError):
    """A request stopped between steps: cancelled, or past its deadline (`kind`)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class Task:
    """One request in the executor and what becomes of it.

    identity: a registered identity, or face crops (registered when the task is admitted).
    check: called between steps; returns a reason to stop ('cancelled: ...', 'timeout: ...') or None.
    on_step(k, n): after each step. prepared: set on admission (`prepare.prepare`); x: its latents.
    z0 (the final latents) and images are set when it succeeds; error when it fails or stops;
    `done` is set either way.
    """

    request: GenerationRequest
    identity: Identity | Sequence[Image.Image]
    priority: int = 0
    check: Callable[[], str | None] | None = None
    on_step: Callable[[int, int], None] | None = None
    name: str = ""
    seq: int = 0
    prepared: Prepared | None = None
    index: int = 0
    x: Any = None
    z0: Any = None
    images: list[Image.Image] | None = None
    error: BaseException | None = None
    timings: dict[str, float] = field(default_factory=dict)
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def rows(self) -> int:
        """UNet rows this request needs at most (3-way steps: 3 per sample; `prepare` rejects a bad count)."""
        try:
            return 3 * int(self.request.num_samples)
        except (TypeError, ValueError):
            return 3

    @property
    def steps(self) -> int:
        """Steps of its plan (0 before admission)."""
        return len(self.prepared.steps) if self.prepared else 0

    def kind(self) -> tuple:
        """Requests of one kind can share a batch: output size and references."""
        assert self.prepared is not None  # only admitted tasks are batched
        return self.request.height, self.request.width, self.prepared.ctx.identity.num_refs


class StepExecutor:
    """Runs many requests on one backend, one batched step at a time (not thread-safe but `submit`)."""

    def __init__(self, backend: Any, max_batch_rows: int = BATCH_ROWS.default) -> None:
        self.backend, self.max_batch_rows = backend, BATCH_ROWS.check(max_batch_rows)
        self.waiting: list[Task] = []
        self.active: list[Task] = []
        self.lock = threading.Lock()
        self.counter = itertools.count()
        self.batches = 0  # batched steps run so far
        self.batch_sizes: list[int] = []  # requests per batched step (the benchmark reads it)

    def submit(self, task: Task) -> Task:
        """Queue `task`; it is validated and prepared when admitted (its errors end only it)."""
        with self.lock:
            task.seq = next(self.counter)
            self.waiting.append(task)
        return task

    @property
    def busy(self) -> bool:
        return bool(self.active or self.waiting)

    def room(self) -> int:
        """Rows free for a request that would start now (waiting requests, admitted next, hold theirs)."""
        return self.max_batch_rows - sum(t.rows for t in (*self.active, *self.waiting))

    def run(self, tasks: Sequence[Task] = ()) -> None:
        """Submit `tasks`, then step until nothing is left."""
        for task in tasks:
            self.submit(task)
        while self.busy:
            self.run_once()

    def run_once(self) -> None:
        """One iteration: admit, stop the stopped, one batched step, finish the finished."""
        self._admit()
        for task in list(self.active):
            reason = task.check() if task.check else None
            if reason is not None:
                kind, _, message = reason.partition(": ")
                self._end(
                    task, Stopped(kind, f"{message or reason} after {task.index} of {task.steps} steps")
                )
        if not self.active:
            return
        lead = min(self.active, key=lambda t: (-t.priority, t.seq))
        batch = [t for t in self.active if t.kind() == lead.kind()]
        self._step(batch)
        for task in batch:
            if task.index == task.steps and not task.done.is_set():
                self._finish(task)

    # ---------------------------------------------------------------- internals

    def _admit(self) -> None:
        """Admit waiting requests while their rows fit; each prepared outside the lock (`_end` takes it)."""
        while True:
            with self.lock:
                self.waiting.sort(key=lambda t: (-t.priority, t.seq))
                free = self.max_batch_rows - sum(t.rows for t in self.active)
                if not self.waiting or (self.active and self.waiting[0].rows > free):
                    return
                task = self.waiting.pop(0)
                self.active.append(task)
            self._start(task)

    def _start(self, task: Task) -> None:
        """`prepare` a newly admitted request and prefetch its reference K/V (its failures end only it)."""
        try:
            task.prepared = p = prepare(self.backend, task.request, task.identity, task.timings)
            prefetch_kv(self.backend, p)
            task.request, task.identity, task.x = p.request, p.ctx.identity, p.x
            task.timings["denoise"] = 0.0
        except Exception as exc:
            self._end(task, exc)

    def _step(self, batch: list[Task]) -> None:
        """One batched step; a failure is retried request by request so that it ends only its own."""
        t0 = time.perf_counter()
        try:
            self._advance(batch)
        except Exception as exc:
            if len(batch) == 1:
                self._end(batch[0], exc)
                return
            log.warning(
                "a batched step of %d requests failed (%s); stepping them one by one", len(batch), exc
            )
            for task in batch:
                try:
                    self._advance([task])
                except Exception as single:
                    self._end(task, single)
        dt = time.perf_counter() - t0
        for task in batch:
            task.timings["denoise"] = task.timings.get("denoise", 0.0) + dt

    def _advance(self, batch: list[Task]) -> None:
        states = [(t, t.prepared) for t in batch]
        members = [Member(p.ctx, t.x, p.steps[t.index]) for t, p in states if p is not None]
        xs = self.backend.step(members)
        self.batches += 1
        self.batch_sizes.append(len(batch))
        for task, x in zip(batch, xs):
            task.x = x
            task.index += 1
            if task.on_step is not None:
                task.on_step(task.index, task.steps)

    def _finish(self, task: Task) -> None:
        try:
            t0 = time.perf_counter()
            task.z0 = task.x
            task.images = [Image.fromarray(img) for img in self.backend.decode(task.x)]
            task.timings["decode"] = time.perf_counter() - t0
            self._end(task, None)
        except Exception as exc:
            self._end(task, exc)

    def _end(self, task: Task, error: BaseException | None) -> None:
        task.error = error
        with self.lock:
            if task in self.active:
                self.active.remove(task)
            if task in self.waiting:
                self.waiting.remove(task)
        task.done.set()

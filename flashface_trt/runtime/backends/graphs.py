"""One capture helper for the graphed step paths (PyTorch CUDA graphs and the engine runtime).

A graphed backend runs the same per-step body on static buffers for every request of one shape.
`StepGraphs.run(key, body)` runs it eagerly the first time a key is seen (the warm-up: lazy
initialisation and workspaces happen outside any capture), captures it the second time and
replays the captured graph from then on. Graphs are kept per key in a bounded LRU and destroyed
when evicted or when the buffers they read are freed (`discard`). Without a capturer (the CPU)
the body simply runs. Pattern of gpt-fast / stable-fast: capture per static shape, replay after.

Capture follows trtexec's practice: `prepare` (shapes, addresses) runs before the capture so that
only the body's enqueues are captured, and garbage collection is off during it (a collected
`DeviceBuffer` would call cudaFree, which invalidates a capture). A key whose capture fails runs
eagerly from then on, recorded in `failed` and logged, instead of failing its requests.
"""

from __future__ import annotations

import gc
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Protocol

from ..errors import FlashFaceError, InputError

log = logging.getLogger(__name__)

Body = Callable[[], None]


class Graph(Protocol):
    def replay(self) -> None: ...

    def destroy(self) -> None: ...


class Capturer(Protocol):
    """How one device records work: `eager` runs a body outside capture, `capture` records it."""

    def eager(self, body: Body) -> None: ...

    def capture(self, body: Body) -> Graph: ...


class StepGraphs:
    """Captured step bodies by key (the static buffers' shapes): eager once, then capture, then replay."""

    def __init__(self, capturer: Capturer | None, max_graphs: int = 8) -> None:
        if max_graphs < 1:
            raise InputError(f"max_graphs must be at least 1, got {max_graphs}")
        self.capturer = capturer
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[Hashable, Graph] = OrderedDict()
        self.warm: set[Hashable] = set()
        self.captures = 0  # graphs captured so far (a test and the logs read it)
        self.failed: dict[Hashable, str] = {}  # keys whose capture failed -> the error: they run eagerly

    def run(self, key: Hashable, body: Body, prepare: Body | None = None) -> None:
        """Run `body` for `key`: eagerly, or as the replay of its captured graph. `prepare` (binding
        shapes and addresses) runs before every eager run and before the capture, never inside it."""
        if self.capturer is None:
            body()
            return
        graph = self.graphs.pop(key, None)
        if graph is None and (key not in self.warm or key in self.failed):
            if prepare is not None:
                prepare()
            self.capturer.eager(body)
            self.warm.add(key)
            return
        if graph is None:
            if prepare is not None:
                prepare()
            enabled = gc.isenabled()
            gc.disable()
            try:
                graph = self.capturer.capture(body)
            except (FlashFaceError, RuntimeError) as exc:  # CudaError / TensorRT / torch's capture errors
                self.failed[key] = f"{type(exc).__name__}: {exc}"
                log.warning("capture of step graph %s failed, it runs eagerly from now on: %s", key, exc)
                self.capturer.eager(body)
                return
            finally:
                if enabled:
                    gc.enable()
            self.captures += 1
            log.debug("captured step graph %s", key)
        self.graphs[key] = graph
        while len(self.graphs) > self.max_graphs:
            old, evicted = self.graphs.popitem(last=False)
            evicted.destroy()
            self.warm.discard(old)
        graph.replay()

    def discard(self, key: Hashable) -> None:
        """Destroy the graph of `key` and forget its warm-up: the static buffers it reads are going."""
        if key in self.graphs:
            self.graphs.pop(key).destroy()
        self.warm.discard(key)
        self.failed.pop(key, None)

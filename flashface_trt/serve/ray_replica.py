"""A Ray Serve model replica: a single-node `Service` over the shared data directory.

Each replica writes its reference K/V cache counters and its job limits to `<data>/replicas/<tag>.json`,
so that any ingress replica's /metrics can sum them and list each replica's, and admit by the limits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..runtime.faces.outputs import write_atomic
from ..runtime.sampling.cost import Admission, Footprint
from .config import ServeSettings
from .records import NotFound
from .service import Service
from .worker import LoadBackend

log = logging.getLogger(__name__)


def _replica_stats(root: Path) -> list[dict[str, Any]]:
    """What every model replica last wrote under `root` (unreadable files skipped)."""
    stats = []
    for path in sorted((root / "replicas").glob("*.json")):
        try:
            stats.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return stats


def replica_caches(root: Path) -> dict[str, dict[str, int]]:
    """The K/V cache counters every model replica last wrote under `root`, by replica tag."""
    return {stats["tag"]: stats["kv_cache"] for stats in _replica_stats(root)}


def replica_admission(root: Path, max_cost: float) -> Admission:
    """The tightest memory limits the model replicas wrote (any replica may get a job); max_cost alone
    before one has."""
    written = (stats.get("admission") or {} for stats in _replica_stats(root))
    found = [a for a in written if a.get("footprint") and a.get("free")]
    if not found:
        return Admission(max_cost)
    a = min(found, key=lambda a: a["free"] * (1 - a["margin"]))
    return Admission(**{**a, "max_cost": max_cost, "footprint": Footprint(**a["footprint"])})


class ModelReplica:
    """One model replica: its service's worker owns this replica's backend."""

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
        cancel = self.service.book.records.cancel_flag(job_id)
        job = self.service.submit(owner, body, job_id)
        while not job.done:
            if cancel.exists() and job.cancel_reason is None:
                self.service.book.cancel(job)
            await asyncio.sleep(0.02)
        self._write_stats()
        return self.service.job(owner, job_id)

    def _write_stats(self) -> None:
        """This replica's cache counters, beside the other replicas', for the ingress's /metrics."""
        admission = asdict(self.service.admission())  # the ingress admits jobs by the tightest
        stats = {"tag": self.tag, "kv_cache": self.service.kv_stats(), "admission": admission}
        write_atomic(self.root / "replicas" / f"{self.tag}.json", json.dumps(stats).encode())

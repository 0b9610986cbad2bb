"""Settings of the HTTP service (one dataclass, named presets at the CLI edge)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime.errors import InputError
from ..runtime.faces.images import DEFAULT_MAX_PIXELS

SHUTDOWN_MODES = ("finish", "cancel")


@dataclass(frozen=True)
class ServeSettings:
    """How `flashface-trt serve` runs.

    host/port: where to listen (127.0.0.1 unless told otherwise; port 0 picks a free one).
    data_dir: identities (crops, latents) and finished jobs (records, PNGs) persist here.
    max_queue: queued generations accepted before new ones get 429 with Retry-After.
    max_upload_mb: request bodies above this get 413; max_pixels: the per-photo pixel guard.
    timeout_s: default per-job deadline (queueing included); a job past it is failed.
    api_keys: bearer keys; with keys every route but the health checks needs one, and
        identities and jobs belong to the key that made them (others get 404).
    shutdown: on SIGTERM, 'finish' the queued and running jobs (up to `drain_s`) or 'cancel' them.
    max_jobs: finished job records kept (oldest dropped first, with their images).
    max_batch_rows: UNet rows of the running batch (3 per sample of a 3-way step): jobs of one
        size share each denoising step up to this many rows (step-level batching).
    warmup_steps: steps of one generation run before /readyz says ready (graph capture included;
        0: none).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("flashface-data")
    max_queue: int = 64
    max_upload_mb: float = 20.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    timeout_s: float = 600.0
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    shutdown: str = "finish"
    drain_s: float = 60.0
    max_jobs: int = 1000
    max_batch_rows: int = 12
    warmup_steps: int = 2

    def validated(self) -> ServeSettings:
        if not 0 <= self.port <= 65535:
            raise InputError(f"port={self.port} must be in [0, 65535]", "port")
        if self.max_batch_rows < 3:
            raise InputError(f"max_batch_rows={self.max_batch_rows} must be at least 3", "max_batch_rows")
        for name in ("max_queue", "max_jobs", "max_pixels"):
            if getattr(self, name) < 1:
                raise InputError(f"{name}={getattr(self, name)} must be at least 1", name)
        for name in ("max_upload_mb", "timeout_s"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name}={getattr(self, name)} must be positive", name)
        if not 0 <= self.warmup_steps <= 1000:
            raise InputError(f"warmup_steps={self.warmup_steps} must be in [0, 1000]", "warmup_steps")
        if self.drain_s < 0:
            raise InputError(f"drain_s={self.drain_s} must be >= 0", "drain_s")
        if self.shutdown not in SHUTDOWN_MODES:
            raise InputError(f"shutdown={self.shutdown!r} must be one of {SHUTDOWN_MODES}", "shutdown")
        if any(not k or k != k.strip() for k in self.api_keys):
            raise InputError("API keys must be non-empty and have no surrounding spaces", "api_keys")
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * (1 << 20))


def owner_of(key: str | None) -> str:
    """The owner id of an API key (a short hash: keys are never stored); 'public' without keys."""
    return "public" if key is None else "k" + hashlib.sha256(key.encode()).hexdigest()[:12]


def read_keys_file(path: Path) -> tuple[str, ...]:
    """API keys from a file, one per line; blank lines and `#` comments skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise InputError(f"API keys file {str(path)!r} is not readable: {exc}", "api_keys_file") from exc
    keys = tuple(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
    if not keys:
        raise InputError(f"API keys file {str(path)!r} holds no key", "api_keys_file")
    return keys

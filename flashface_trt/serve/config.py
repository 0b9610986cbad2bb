"""Settings of the HTTP service (one dataclass, named presets at the CLI edge)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime.errors import InputError
from ..runtime.faces.images import DEFAULT_MAX_PIXELS
from ..runtime.sampling.params import BATCH_ROWS, Param

SHUTDOWN_MODES = ("finish", "cancel")


# every setting of the service, by the name `ServeSettings` and the `serve` command's flags use
SETTINGS = (
    Param("host", "str", "listen address", default="127.0.0.1"),
    Param("port", "int", "listen port (0 picks a free one)", 0, 65535, 8000),
    Param("data_dir", "path", "identities and job results", default=Path("flashface-data")),
    Param("max_queue", "int", "queued jobs before 429", 1, None, 64),
    Param("max_upload_mb", "float", "request body limit in MiB", 0, None, 20.0, lo_open=True),
    Param("max_pixels", "int", "pixels per uploaded photo (bomb guard)", 1, None, DEFAULT_MAX_PIXELS),
    Param("timeout_s", "float", "default per-job deadline in seconds", 0, None, 600.0, lo_open=True),
    Param("shutdown", "str", "on SIGTERM: finish or cancel jobs", default="finish", choices=SHUTDOWN_MODES),
    Param("drain_s", "float", "longest wait for jobs on SIGTERM, seconds", 0, None, 60.0),
    Param("max_jobs", "int", "finished job records kept", 1, None, 1000),
    Param("max_streams", "int", "open event streams and ?wait=true requests per key before 429", 1, None, 16),
    BATCH_ROWS,
    Param("warmup_steps", "int", "steps of the warm-up generation before ready (0: none)", 0, 1000, 2),
    Param("max_upload_pixels", "int", "decoded pixels of all photos of a registration", 1, None, 10**8),
    Param("max_files", "int", "photos per registration", 1, 1000, 16),
    Param("max_cost", "float", "job cost limit, H*W*samples*steps/1e6 (0: none)", 0, None, 0.0),
    Param("memory_margin", "float", "free memory share kept from jobs' peaks (1: none)", 0, 1, 0.2),
    Param("idle_timeout_s", "float", "seconds an idle connection stays open", 0, None, 5.0, lo_open=True),
    Param("header_timeout_s", "float", "seconds a request head may take", 0, None, 10.0, lo_open=True),
    Param("max_connections", "int", "open connections; more are closed at once", 1, None, 512),
)
DEFAULTS = {p.name: p.default for p in SETTINGS}


@dataclass(frozen=True)
class ServeSettings:
    """How `flashface-trt serve` runs (each setting's type, range, default and help: `SETTINGS`).

    host/port: where to listen (127.0.0.1 unless told otherwise; port 0 picks a free one).
    data_dir: identities (crops, latents) and finished jobs (records, PNGs) persist here.
    max_queue: queued generations accepted before new ones get 429 with Retry-After.
    max_upload_mb: request bodies above this get 413; max_pixels: the per-photo pixel guard.
    timeout_s: default per-job deadline (queueing included); a job past it is failed.
    api_keys: bearer keys; with keys every route but the health checks needs one, and
        identities and jobs belong to the key that made them (others get 404).
    shutdown: on SIGTERM, 'finish' the queued and running jobs (up to `drain_s`) or 'cancel' them.
    max_jobs: finished job records kept (oldest dropped first, with their images).
    max_streams: event streams and `?wait=true` requests one key may hold open at once (429 beyond).
    max_batch_rows: UNet rows of the running batch (3 per sample of a 3-way step): jobs of one
        size share each denoising step up to this many rows (step-level batching).
    warmup_steps: steps of one generation run before /readyz says ready (graph capture included;
        0: none).
    max_upload_pixels / max_files: a registration's decoded pixels (from headers) and photos, else 413.
    max_cost / memory_margin: jobs over these megapixel-steps or this share of free memory get 422.
    idle_timeout_s, header_timeout_s, max_connections: idle and header-read timeouts, open connections.
    """

    host: str = DEFAULTS["host"]
    port: int = DEFAULTS["port"]
    data_dir: Path = DEFAULTS["data_dir"]
    max_queue: int = DEFAULTS["max_queue"]
    max_upload_mb: float = DEFAULTS["max_upload_mb"]
    max_pixels: int = DEFAULTS["max_pixels"]
    timeout_s: float = DEFAULTS["timeout_s"]
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    shutdown: str = DEFAULTS["shutdown"]
    drain_s: float = DEFAULTS["drain_s"]
    max_jobs: int = DEFAULTS["max_jobs"]
    max_streams: int = DEFAULTS["max_streams"]
    max_batch_rows: int = DEFAULTS["max_batch_rows"]
    warmup_steps: int = DEFAULTS["warmup_steps"]
    max_upload_pixels: int = DEFAULTS["max_upload_pixels"]
    max_files: int = DEFAULTS["max_files"]
    max_cost: float = DEFAULTS["max_cost"]
    memory_margin: float = DEFAULTS["memory_margin"]
    idle_timeout_s: float = DEFAULTS["idle_timeout_s"]
    header_timeout_s: float = DEFAULTS["header_timeout_s"]
    max_connections: int = DEFAULTS["max_connections"]

    def validated(self) -> ServeSettings:
        """Return self after checking every setting by `SETTINGS`; InputError names value and range."""
        for p in SETTINGS:
            p.check(getattr(self, p.name))
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

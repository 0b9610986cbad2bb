"""Job states, failure kinds and job records: the one form the local service and the Ray ingress
write, read and show (a JSON file per job in the data directory, beside the job's images).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import time
import uuid
from enum import Enum
from pathlib import Path
from typing import Any

from ..runtime.errors import FlashFaceError, InputError, StorageError
from ..runtime.faces.outputs import write_atomic
from ..runtime.sampling.executor import Stopped

log = logging.getLogger(__name__)

ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # job and identity ids (ours are hex); anything else is no id
PRIVATE = ("owner", "request")  # stored with a job's record, never shown to its client

# Ray's errors for a replica (actor, worker process or node) that went away, or a request still in a
# dead replica's queue, by class name: classifying them needs no Ray import
REPLICA_LOST = frozenset(
    "ActorDiedError ActorUnavailableError RayActorError WorkerCrashedError NodeDiedError"
    " ReplicaUnavailableError RequestCancelledError TaskCancelledError".split()
)


class State(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = (State.SUCCEEDED, State.FAILED, State.CANCELLED)


class QueueFull(FlashFaceError):
    """No room in the queue; `retry_after` seconds is a fair wait before trying again."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotFound(FlashFaceError):
    """No such identity, job or image for this caller."""


def error_kind(exc: BaseException) -> str:
    """The short class of a job's failure, for its record and the errors-by-kind metric."""
    if isinstance(exc, Stopped):
        return exc.kind  # stopped between steps: 'cancelled' or 'timeout'
    names = {c.__name__ for c in type(exc).__mro__}
    if isinstance(exc, InputError):
        return "input"
    if isinstance(exc, StorageError):
        return "storage"  # the data directory could not be written (full, read-only, no permission)
    if isinstance(exc, MemoryError) or any("OutOfMemory" in name for name in names):
        return "out_of_memory"
    if isinstance(exc, QueueFull) or "GetTimeoutError" in names:
        return "timeout"  # no replica had room for an accepted job before its deadline
    if isinstance(exc, FlashFaceError):
        return "model"
    if names & REPLICA_LOST:
        return "replica_died"
    return "internal"


def storage_message(exc: BaseException) -> str:
    """A failed write's reason for the job's client: the OS's reason, no server path."""
    return f"the service could not store the job: {getattr(exc.__cause__, 'strerror', None) or 'failed'}"


def ended(record: dict[str, Any]) -> bool:
    return record["state"] in [s.value for s in TERMINAL]


def public(record: dict[str, Any]) -> dict[str, Any]:
    """What a client sees of a stored record: no owner or request, a position only while queued."""
    out = {k: v for k, v in record.items() if k not in PRIVATE}
    if out["state"] != State.QUEUED.value:
        out.pop("position", None)
    return out


def failed(record: dict[str, Any], error: str, kind: str) -> dict[str, Any]:
    """`record` ended as failed now, with its reason and kind."""
    now = time.time()
    return {**record, "state": State.FAILED.value, "error": error, "error_kind": kind, "finished": now}


def new_job_id() -> str:
    return uuid.uuid4().hex[:16]


STORAGE_DOWN = "the data directory is not writable"  # no server path: /readyz answers without a key


class JobRecords:
    """Jobs under `root/<id>/`: record.json (written at acceptance and at the end), progress.json (state,
    step, queue position), images <k>.png, a `cancel` flag; every write atomic (else StorageError)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.probed = (0.0, True)  # (monotonic time, writable) of the last probe

    def writable(self) -> bool:
        """Whether a small atomic write in the data directory succeeds (probed at most once a second)."""
        if time.monotonic() - self.probed[0] >= 1.0:
            try:
                write_atomic(self.root / ".probe", b"ok")
                self.probed = (time.monotonic(), True)
            except StorageError as exc:
                log.warning("%s", exc)
                self.probed = (time.monotonic(), False)
        return self.probed[1]

    def folder(self, job_id: str) -> Path:
        if not ID.fullmatch(job_id):
            raise NotFound(f"no generation {job_id[:64]!r}")
        return self.root / job_id

    def image_path(self, job_id: str, k: int) -> Path:
        return self.folder(job_id) / f"{k}.png"

    def cancel_flag(self, job_id: str) -> Path:
        """A file whose presence asks the process running the job to cancel it."""
        return self.folder(job_id) / "cancel"

    def write(self, record: dict[str, Any]) -> None:
        """A job's record, replaced atomically (no reader sees half a file); its stale progress removed."""
        folder = self.folder(record["id"])
        write_atomic(folder / "record.json", json.dumps(record).encode())
        (folder / "progress.json").unlink(missing_ok=True)

    def progress(self, job_id: str, progress: dict[str, Any]) -> None:
        """A job's state, step and position, without rewriting its record (request and prompt)."""
        write_atomic(self.folder(job_id) / "progress.json", json.dumps(progress).encode())

    def read(self, job_id: str) -> dict[str, Any] | None:
        """A job's record, with its progress while it has not ended; None if there is none."""
        try:
            folder = self.folder(job_id)
            record = json.loads((folder / "record.json").read_text())
        except (OSError, json.JSONDecodeError, NotFound):
            return None
        if not ended(record):  # no progress file yet, or gone as the record was rewritten: none
            with contextlib.suppress(OSError, json.JSONDecodeError):
                record.update(json.loads((folder / "progress.json").read_text()))
        return record

    def all(self) -> list[dict[str, Any]]:
        """Every readable record (an unreadable one is skipped)."""
        records = [self.read(path.parent.name) for path in self.root.glob("*/record.json")]
        return [r for r in records if r is not None]

    def owned(self, owner: str, job_id: str) -> dict[str, Any]:
        """The stored record of `owner`'s job; NotFound for anyone else's or none."""
        record = self.read(job_id)
        if record is None or record.get("owner") != owner:
            raise NotFound(f"no generation {job_id!r}")
        return record

    def image(self, record: dict[str, Any], k: int) -> Path:
        """The file of image k of a job (its client's `record`) if the job succeeded with it."""
        job_id = record["id"]
        if record["state"] != State.SUCCEEDED.value or not 0 <= k < len(record.get("images", [])):
            raise NotFound(f"generation {job_id!r} has no image {k}")
        path = self.image_path(job_id, k)
        if not path.is_file():
            raise NotFound(f"the image {k} of generation {job_id!r} is gone")
        return path

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.folder(job_id), ignore_errors=True)

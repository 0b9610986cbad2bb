"""Registered identities on disk: the prepared face crops, their encoded latents and who owns them.

An identity's id is derived from its owner and the content of its crops, so registering the same
photos again (with the same key) returns the same id. Latents are kept as float32 arrays with
the backend that encoded them; a backend of another kind or precision re-encodes the crops
(crops of another size are refused: the identity is registered again).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.faces.outputs import write_atomic
from ..runtime.sampling.identities import array_key
from .records import ID, NotFound

log = logging.getLogger(__name__)


@dataclass
class StoredIdentity:
    """An identity's metadata; `crops` [R, 3, S, S] and `latents` load from disk when needed."""

    id: str
    owner: str
    key: str  # content hash of the crops: the reference K/V cache key (shared across owners)
    num_refs: int
    faces: list[dict[str, Any]]
    encoder: str  # which backend, precision and crop size encoded the stored latents
    backend_latents: Any = field(default=None, repr=False)  # the latents on the serving backend

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "num_refs": self.num_refs, "faces": self.faces}


def identity_id(owner: str, crops: np.ndarray) -> str:
    """Owner-scoped content id: the same crops give the same id for one owner, another for another."""
    return hashlib.sha256(f"{owner}|{array_key(crops)}".encode()).hexdigest()[:20]


class IdentityStore:
    """Identities of every owner under `root/<id>/` (meta.json, crops.npy, latents.npy)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.items: dict[str, StoredIdentity] = {}
        for identity in sorted(self.ids()):
            self._load(identity)
        log.info("%d identities in %s", len(self.items), root)

    def _load(self, identity: str) -> StoredIdentity | None:
        """An identity's metadata from disk (another process may have stored it), or None."""
        meta = self.root / identity / "meta.json"
        if identity.startswith(".") or not meta.is_file():
            return None
        try:
            d = json.loads(meta.read_text())
            item = StoredIdentity(d["id"], d["owner"], d["key"], d["num_refs"], d["faces"], d["encoder"])
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            log.warning("skipping unreadable identity %s: %s", identity, exc)
            return None
        with self.lock:
            return self.items.setdefault(item.id, item)

    def __len__(self) -> int:
        return len(self.items)

    def ids(self) -> list[str]:
        """Every identity in the directory, also those other processes stored."""
        return [meta.parent.name for meta in self.root.glob("*/meta.json")]

    def find(self, identity: str) -> StoredIdentity | None:
        """An identity of any owner (a replica loads what the ingress authorised); the directory is
        the truth, as other processes (replicas) may store or delete identities in it."""
        if not ID.fullmatch(identity):
            return None
        with self.lock:
            item = self.items.get(identity)
        if item is not None and not (self.root / identity / "meta.json").is_file():
            with self.lock:
                self.items.pop(identity, None)
            item = None
        return item or self._load(identity)

    def get(self, identity: str, owner: str) -> StoredIdentity | None:
        """The identity if it exists and belongs to `owner` (others see nothing)."""
        item = self.find(identity)
        return item if item is not None and item.owner == owner else None

    def owned(self, identity: str, owner: str) -> StoredIdentity:
        """`get`, or NotFound."""
        item = self.get(identity, owner)
        if item is None:
            raise NotFound(f"no identity {identity[:64]!r}")
        return item

    def listed(self, owner: str) -> list[dict[str, Any]]:
        """`owner`'s identities' public records, newest first (also those other processes stored)."""
        dated = []
        for meta in self.root.glob("*/meta.json"):
            item = self.get(meta.parent.name, owner)
            try:
                dated += [] if item is None else [(meta.stat().st_mtime, item.id, item.public())]
            except FileNotFoundError:  # deleted meanwhile
                continue
        return [record for *_, record in sorted(dated, key=lambda d: d[:2], reverse=True)]

    def put(
        self, owner: str, crops: np.ndarray, latents: np.ndarray, faces: list[dict], encoder: str
    ) -> StoredIdentity:
        """Store (or find again) an identity; the files are written before it becomes visible."""
        ident = identity_id(owner, crops)
        with self.lock:
            if ident in self.items:
                return self.items[ident]
        d = self.root / ident
        tmp = self.root / f".{ident}.tmp"
        item = StoredIdentity(ident, owner, array_key(crops), len(crops), faces, encoder)
        meta = {k: getattr(item, k) for k in ("id", "owner", "key", "num_refs", "faces", "encoder")}
        try:  # every file written atomically in a hidden folder, which becomes the identity at once
            write_atomic(tmp / "crops.npy", lambda f: np.save(f, crops.astype(np.float32)))
            write_atomic(tmp / "latents.npy", lambda f: np.save(f, latents.astype(np.float32)))
            write_atomic(tmp / "meta.json", json.dumps(meta).encode())
            with self.lock:
                if ident not in self.items:
                    shutil.rmtree(d, ignore_errors=True)
                    tmp.replace(d)
                    self.items[ident] = item
                return self.items[ident]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def delete(self, identity: str, owner: str) -> None:
        """Remove `owner`'s identity (also one another process stored); NotFound if there is none."""
        self.owned(identity, owner)
        with self.lock:
            self.items.pop(identity, None)
        shutil.rmtree(self.root / identity, ignore_errors=True)

    def crops(self, item: StoredIdentity) -> np.ndarray:
        return np.load(self.root / item.id / "crops.npy")

    def latents(self, item: StoredIdentity) -> np.ndarray:
        return np.load(self.root / item.id / "latents.npy")

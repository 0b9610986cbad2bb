"""Registered identities and the reference key/value cache shared by all backends.

Registering reference faces once keeps their latents; the ReferenceNet's projected keys/values
depend only on (identity, timestep, negative prompt, reference size), so repeated generations
for the same person can skip the ReferenceNet entirely. The cache is an LRU with a byte budget.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

DEFAULT_KV_CACHE_BYTES = 2 << 30
# reference images (timesteps x references) per prefetch ReferenceNet call: 16 timesteps of 4 faces
DEFAULT_PREFETCH_IMAGES = 64
ORT_ITEMSIZE = {"tensor(float16)": 2, "tensor(float)": 4, "tensor(int32)": 4, "tensor(uint8)": 1}


def array_key(*arrays: np.ndarray) -> str:
    """Short content hash of host arrays (dtype, shape and bytes)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:20]


@dataclass(frozen=True)
class Identity:
    """A registered person: reference latents [R, 4, hr, wr] on the backend, and a content key.

    key: hash of the reference crops the latents came from (same crops -> same key);
    photos: names of the source photos, for messages.
    """

    key: str
    latents: Any
    photos: tuple[str, ...] = ()

    @property
    def num_refs(self) -> int:
        return int(self.latents.shape[0])


def nbytes(value: Any) -> int:
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    if hasattr(value, "nbytes"):  # NumPy arrays, torch tensors
        return int(value.nbytes)
    # an ONNX Runtime OrtValue on a device: element count x element size; `data_type()` names the
    # element type ('tensor(float16)'), `element_type()` would give an int and there is no `nbytes`
    kind = value.data_type()
    if kind not in ORT_ITEMSIZE:
        raise InputError(f"cannot size a cached value of type {kind!r}")
    return int(np.prod(value.shape(), dtype=np.int64)) * ORT_ITEMSIZE[kind]


class ReferenceKVCache:
    """LRU cache of per-step reference keys/values with a byte budget; counts hits and misses."""

    def __init__(self, budget_bytes: int = DEFAULT_KV_CACHE_BYTES) -> None:
        if budget_bytes < 0:
            raise InputError(f"reference K/V cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget = budget_bytes
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable) -> Any | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item[0]

    def put(self, key: Hashable, value: Any) -> None:
        """Insert `value` (an array, or a list/tuple/dict of them); evict least recently used entries."""
        size = nbytes(value)
        if key in self._items:
            self.bytes -= self._items.pop(key)[1]
        if size > self.budget:
            return  # larger than the whole budget: not cached
        self._items[key] = (value, size)
        self.bytes += size
        while self.bytes > self.budget:
            _, (_, freed) = self._items.popitem(last=False)
            self.bytes -= freed
            self.evictions += 1

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def stats(self) -> dict[str, int]:
        counts = {name: getattr(self, name) for name in ("hits", "misses", "evictions")}
        return {**counts, "entries": len(self._items), "bytes": self.bytes, "budget": self.budget}


def kv_key(identity: Identity, t: int, uncond_key: str) -> tuple:
    """Cache key of one step's reference K/V: identity, timestep, negative prompt, reference size."""
    return (identity.key, int(t), uncond_key, tuple(int(s) for s in identity.latents.shape))


def identity_from_crops(encode: Any, crops: np.ndarray, photos: Sequence[str] = ()) -> Identity:
    """Encode prepared crops [R, 3, S, S] with `encode` (a backend's `encode_references`)."""
    return Identity(array_key(crops), encode(crops), tuple(photos))

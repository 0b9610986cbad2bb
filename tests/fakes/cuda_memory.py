"""Memory of the fake CUDA runtime: device allocations and pinned host memory, with real addresses."""

from __future__ import annotations

import bisect
import ctypes

import numpy as np

from .cuda_types import Fault, cudaError_t, cudaMemcpyKind


class FakeMemory:
    """Device allocations (host bytes standing for device memory) and page-locked host allocations."""

    def __init__(self) -> None:
        self.allocs: dict[int, np.ndarray] = {}  # base address -> its bytes
        self.bases: list[int] = []  # sorted live bases
        self.freed: list[tuple[int, int]] = []  # (base, size) of freed allocations
        self._graveyard: list[np.ndarray] = []  # freed bytes stay reserved: no host array reuses them
        self.pinned: dict[int, np.ndarray] = {}  # page-locked host allocations: base -> bytes

    def _alloc_of(self, ptr: int) -> tuple[int, np.ndarray] | None:
        i = bisect.bisect_right(self.bases, ptr) - 1
        if i < 0:
            return None
        base = self.bases[i]
        buf = self.allocs[base]
        return (base, buf) if ptr < base + buf.size else None

    def is_device(self, ptr: int) -> bool:
        return self._alloc_of(ptr) is not None or any(b <= ptr < b + n for b, n in self.freed)

    def device_view(self, ptr: int, nbytes: int) -> np.ndarray:
        """Bytes [ptr, ptr + nbytes) of one live allocation; Fault if freed, unallocated, out of bounds."""
        found = self._alloc_of(ptr)
        if found is None:
            was_freed = any(b <= ptr < b + n for b, n in self.freed)
            what = "freed" if was_freed else "unallocated"
            raise Fault(cudaError_t.cudaErrorIllegalAddress, f"access to {what} device memory at {ptr:#x}")
        base, buf = found
        off = ptr - base
        if off + nbytes > buf.size:
            raise Fault(
                cudaError_t.cudaErrorIllegalAddress,
                f"{nbytes} bytes at {ptr:#x} run {off + nbytes - buf.size} bytes past an allocation of "
                f"{buf.size} bytes",
            )
        return buf[off : off + nbytes]

    @staticmethod
    def host_view(ptr: int, nbytes: int) -> np.ndarray:
        return np.ctypeslib.as_array((ctypes.c_uint8 * max(nbytes, 1)).from_address(ptr))[:nbytes]

    def pinned_view(self, ptr: int, nbytes: int) -> np.ndarray | None:
        """Bytes [ptr, ptr + nbytes) of one live pinned allocation, or None (pageable memory)."""
        for base, buf in self.pinned.items():
            if base <= ptr and ptr + nbytes <= base + buf.size:
                return buf[ptr - base : ptr - base + nbytes]
        return None

    def _pinned(self, ptr: int, nbytes: int) -> np.ndarray:
        view = self.pinned_view(ptr, nbytes)
        if view is None:
            raise Fault(cudaError_t.cudaErrorIllegalAddress, f"pinned memory at {ptr:#x} was freed")
        return view

    def read(self, ptr: int, nbytes: int) -> bytes:
        return self.device_view(ptr, nbytes).tobytes()

    def write(self, ptr: int, data: bytes | np.ndarray) -> None:
        raw = np.frombuffer(bytes(data) if not isinstance(data, np.ndarray) else data.tobytes(), np.uint8)
        self.device_view(ptr, raw.size)[:] = raw

    def _to_host(self, dst: int, src: int, count: int) -> None:
        self.host_view(dst, count)[:] = self.device_view(src, count)

    def _to_pinned(self, dst: int, src: int, count: int) -> None:
        self._pinned(dst, count)[:] = self.device_view(src, count)

    def _host_side_pinned(self, dst: int, src: int, count: int, kind: cudaMemcpyKind) -> bool:
        host = src if kind == cudaMemcpyKind.cudaMemcpyHostToDevice else dst
        return self.pinned_view(host, count) is not None

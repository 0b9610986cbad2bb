"""Types of the fake CUDA runtime: cuda-python's enums (same names and values), handles, work records."""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

ALIGN = 256  # cudaMalloc returns at least 256-byte aligned addresses
GARBAGE = 0xFF  # fresh allocations hold NaN-like bytes: cudaMalloc does not clear memory


class cudaError_t(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidResourceHandle = 400
    cudaErrorIllegalState = 401
    cudaErrorNotReady = 600
    cudaErrorIllegalAddress = 700
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901
    cudaErrorStreamCaptureImplicit = 906


class cudaMemcpyKind(enum.IntEnum):
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


class cudaStreamCaptureMode(enum.IntEnum):
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


class cudaStreamCaptureStatus(enum.IntEnum):
    cudaStreamCaptureStatusNone = 0
    cudaStreamCaptureStatusActive = 1
    cudaStreamCaptureStatusInvalidated = 2


class Fault(Exception):
    """Work touched memory it may not (raised while executing, turned into an error code)."""

    def __init__(self, code: cudaError_t, message: str) -> None:
        super().__init__(message)
        self.code = code


class Handle:
    """An opaque CUDA handle; `int()` gives its value, as cuda-python's handle types do."""

    _ids = itertools.count(0x1000, 0x10)

    def __init__(self) -> None:
        self.value = next(self._ids)

    def __int__(self) -> int:
        return self.value


class cudaStream_t(Handle):
    pass


class cudaEvent_t(Handle):
    pass


class cudaGraph_t(Handle):
    pass


class cudaGraphExec_t(Handle):
    pass


@dataclass
class Op:
    """One piece of recorded work; `run(replay)` executes it (replay: launched from a graph)."""

    name: str
    run: Callable[[bool], None]


@dataclass
class Capture:
    mode: cudaStreamCaptureMode
    ops: list[Op] = field(default_factory=list)
    invalidated: str = ""  # why, once an illegal call happened


@dataclass
class StreamState:
    handle: cudaStream_t
    queue: list[Op] = field(default_factory=list)
    capture: Capture | None = None


@dataclass
class cudaDeviceProp:
    name: bytes = b"Fake GPU (host memory, ONNX Runtime CPU)"
    major: int = 9
    minor: int = 0
    totalGlobalMem: int = 8 << 30

"""A small typed layer over cuda-python's runtime API: devices, buffers, streams, copies, CUDA graphs.

cuda-python ships no type information, so the rest of the runtime talks to CUDA only through these
functions, which check every returned error code and raise `CudaError` naming the call.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import FlashFaceError

log = logging.getLogger(__name__)


class CudaError(FlashFaceError):
    """A CUDA runtime call failed (or CUDA is unavailable)."""


def _rt() -> Any:
    try:
        from cuda.bindings import runtime
    except ImportError as exc:
        raise CudaError("cuda-python is not installed: pip install 'flashface-trt[trt]'") from exc
    return runtime


def check(result: Any, call: str) -> Any:
    """Unpack a cuda-python `(err, *values)` result, raising CudaError unless err is cudaSuccess."""
    rt = _rt()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        name = getattr(err, "name", str(err))
        raise CudaError(f"{call} failed: {name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def device_count() -> int:
    """CUDA devices visible to this process (0 where there is no driver or GPU)."""
    try:
        return int(check(_rt().cudaGetDeviceCount(), "cudaGetDeviceCount"))
    except CudaError as exc:
        log.debug("no CUDA: %s", exc)
        return 0


def free_device_memory() -> int | None:
    """Free bytes of the current CUDA device (cudaMemGetInfo); None without one (no memory check)."""
    try:
        return int(check(_rt().cudaMemGetInfo(), "cudaMemGetInfo")[0])
    except CudaError:
        return None


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: str
    total_memory: int


def device_info(device: int = 0) -> DeviceInfo:
    props = check(_rt().cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return DeviceInfo(name.rstrip("\x00"), f"{props.major}.{props.minor}", int(props.totalGlobalMem))


class DeviceBuffer:
    """`nbytes` of device memory (cudaMalloc) or, `pinned`, of page-locked host memory (cudaMallocHost:
    async copies read it when they execute), freed by `free()` or when collected."""

    def __init__(self, nbytes: int, pinned: bool = False) -> None:
        self.nbytes = max(int(nbytes), 1)
        self.pinned = pinned
        call = "cudaMallocHost" if pinned else "cudaMalloc"
        self.ptr: int = int(check(getattr(_rt(), call)(self.nbytes), f"{call}({self.nbytes})"))

    def host_array(self, offset: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A NumPy view of pinned bytes from `offset` (what the host fills before an async copy)."""
        count = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if not self.pinned or offset + count > self.nbytes:
            raise CudaError(f"{count} bytes at {offset} are outside pinned memory of {self.nbytes} bytes")
        return np.frombuffer((ctypes.c_uint8 * count).from_address(self.ptr + offset), dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            call = "cudaFreeHost" if self.pinned else "cudaFree"
            check(getattr(_rt(), call)(self.ptr), call)
            self.ptr = 0

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass


class Stream:
    """A CUDA stream; `handle` is what TensorRT's `execute_async_v3` takes."""

    def __init__(self) -> None:
        self.stream = check(_rt().cudaStreamCreate(), "cudaStreamCreate")
        self.handle = int(self.stream)

    def synchronize(self) -> None:
        check(_rt().cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")


class Event:
    """A CUDA event: `record(stream)` marks the work queued so far, `synchronize()` waits for it."""

    def __init__(self) -> None:
        self.event = check(_rt().cudaEventCreate(), "cudaEventCreate")

    def record(self, stream: Stream) -> None:
        check(_rt().cudaEventRecord(self.event, stream.stream), "cudaEventRecord")

    def synchronize(self) -> None:
        """Wait for the recorded work (at once if nothing was recorded)."""
        check(_rt().cudaEventSynchronize(self.event), "cudaEventSynchronize")


def copy_to_device(dst: int, src: np.ndarray, stream: Stream) -> None:
    """Host array -> device pointer (async on `stream`; a pinned `src` is read when the copy executes)."""
    rt = _rt()
    src = np.ascontiguousarray(src)
    kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
    check(rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, stream.stream), "cudaMemcpyAsync H2D")


def copy_to_host(dst: np.ndarray, src: int, stream: Stream) -> None:
    rt = _rt()
    kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
    check(rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, stream.stream), "cudaMemcpyAsync D2H")


def copy_device(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    rt = _rt()
    kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
    check(rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream.stream), "cudaMemcpyAsync D2D")


class CudaGraph:
    """A captured and instantiated CUDA graph on one stream (the `graphs.Graph` protocol)."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.graph: Any = None
        self.exec: Any = None

    def capture(self, work: Any) -> None:
        """Record everything `work()` enqueues on the stream (no host syncs allowed inside).

        If `work` raises, the capture is ended and discarded and that error is what propagates
        (the `cudaStreamEndCapture` failure it causes would otherwise hide it).
        """
        rt = _rt()
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(rt.cudaStreamBeginCapture(self.stream.stream, mode), "cudaStreamBeginCapture")
        try:
            work()
        except BaseException:
            err, graph = rt.cudaStreamEndCapture(self.stream.stream)
            if err == rt.cudaError_t.cudaSuccess and graph is not None:
                rt.cudaGraphDestroy(graph)
            raise
        self.graph = check(rt.cudaStreamEndCapture(self.stream.stream), "cudaStreamEndCapture")
        self.exec = check(rt.cudaGraphInstantiate(self.graph, 0), "cudaGraphInstantiate")

    def replay(self) -> None:
        if self.exec is None:
            raise CudaError("CUDA graph launched before it was captured")
        check(_rt().cudaGraphLaunch(self.exec, self.stream.stream), "cudaGraphLaunch")

    def destroy(self) -> None:
        rt = _rt()
        if self.exec is not None:
            check(rt.cudaGraphExecDestroy(self.exec), "cudaGraphExecDestroy")
            self.exec = None
        if self.graph is not None:
            check(rt.cudaGraphDestroy(self.graph), "cudaGraphDestroy")
            self.graph = None

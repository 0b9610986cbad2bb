"""A fake `cuda.bindings.runtime`: host memory with real addresses, ordered streams, captured graphs.

Calls have cuda-python's signatures and return `(err, value...)` tuples. Work enqueued on a stream
is recorded and executed in order when the host waits for it (stream/device sync, a synchronous
copy, `cudaFree`, `cudaFreeHost`; an event sync runs its stream's work up to the event); a copy
from pageable host memory reads its source at the call, as CUDA stages it then, while a copy from
pinned memory (`cudaMallocHost`) reads it when it executes, and one to pinned memory returns at
once. A stream under capture records work into a graph instead; `cudaGraphLaunch` replays the
recorded work, which reads whatever the captured addresses hold at launch time.

What a GPU refuses is refused: a synchronising call, an allocation or free, or a copy to or from
pageable host memory while a stream captures (the capture is invalidated, `cudaStreamEndCapture`
then fails); a copy whose range leaves its allocation, touches freed memory or goes the wrong way
(`cudaErrorInvalidValue`); work that touches freed or unallocated memory when it executes (a sticky
`cudaErrorIllegalAddress`, returned by every later call, as a corrupted CUDA context does).
"""

from __future__ import annotations

import bisect
import time
from typing import Any

import numpy as np

from .cuda_memory import FakeMemory
from .cuda_types import (
    ALIGN,
    GARBAGE,
    Capture,
    Fault,
    Op,
    StreamState,
    cudaDeviceProp,
    cudaError_t,
    cudaEvent_t,
    cudaGraph_t,
    cudaGraphExec_t,
    cudaMemcpyKind,
    cudaStream_t,
    cudaStreamCaptureMode,
    cudaStreamCaptureStatus,
)

__all__ = ["ALIGN", "FakeCudaRuntime", "Fault", "Op", "cudaError_t"]


class FakeCudaRuntime(FakeMemory):
    """The module object installed as `cuda.bindings.runtime` (one per test)."""

    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind
    cudaStreamCaptureMode = cudaStreamCaptureMode
    cudaStreamCaptureStatus = cudaStreamCaptureStatus
    cudaStream_t = cudaStream_t

    def __init__(self) -> None:
        super().__init__()
        self.__name__ = "cuda.bindings.runtime"
        self.streams: dict[int, StreamState] = {}
        self.graphs: dict[int, list[Op]] = {}
        self.execs: dict[int, list[Op]] = {}
        self.events: dict[int, float | None] = {}
        self.recorded: dict[int, Op] = {}  # event -> its last record op
        self.sticky = cudaError_t.cudaSuccess
        self.faults: list[str] = []  # what went wrong, in words (tests read them)
        self.launches = 0  # cudaGraphLaunch calls that succeeded
        self.device_count = 1

    # -- bookkeeping ----------------------------------------------------------------------------
    def _fail(self, code: cudaError_t, message: str) -> cudaError_t:
        self.faults.append(f"{code.name}: {message}")
        return code

    def _capturing(self) -> list[StreamState]:
        return [s for s in self.streams.values() if s.capture is not None]

    def _unsafe(self, call: str) -> cudaError_t | None:
        """A call CUDA forbids while a (non-relaxed) capture is active: invalidate it, say so."""
        for s in self._capturing():
            assert s.capture is not None
            if s.capture.mode != cudaStreamCaptureMode.cudaStreamCaptureModeRelaxed:
                s.capture.invalidated = s.capture.invalidated or f"{call} during capture"
                return self._fail(cudaError_t.cudaErrorStreamCaptureUnsupported, f"{call} during capture")
        return None

    def _stream(self, stream: Any) -> StreamState | None:
        return self.streams.get(int(stream)) if stream is not None else None

    def _execute(self, ops: list[Op], replay: bool) -> cudaError_t:
        for op in ops:
            try:
                op.run(replay)
            except Fault as exc:
                self.sticky = exc.code
                return self._fail(exc.code, f"{op.name}: {exc}")
        return cudaError_t.cudaSuccess

    def _flush(self, s: StreamState) -> cudaError_t:
        ops, s.queue = s.queue, []
        return self._execute(ops, replay=False)

    def _flush_all(self) -> cudaError_t:
        for s in self.streams.values():
            err = self._flush(s)
            if err:
                return err
        return cudaError_t.cudaSuccess

    def enqueue(self, stream: Any, op: Op) -> cudaError_t:
        """Queue `op` on `stream` (or record it into the stream's capture)."""
        s = self._stream(stream)
        if s is None:
            return self._fail(cudaError_t.cudaErrorInvalidResourceHandle, f"{op.name}: unknown stream")
        if s.capture is not None and s.capture.invalidated:
            return self._fail(
                cudaError_t.cudaErrorStreamCaptureInvalidated, f"{op.name}: capture invalidated"
            )
        (s.capture.ops if s.capture is not None else s.queue).append(op)
        return cudaError_t.cudaSuccess

    def capture_of(self, stream: Any) -> Capture | None:
        s = self._stream(stream)
        return s.capture if s is not None else None

    # -- the API --------------------------------------------------------------------------------
    def cudaGetDeviceCount(self):
        return (cudaError_t.cudaSuccess, self.device_count)

    def cudaGetDeviceProperties(self, device: int):
        if not 0 <= device < self.device_count:
            return (cudaError_t.cudaErrorInvalidValue, None)
        return (cudaError_t.cudaSuccess, cudaDeviceProp())

    def cudaMemGetInfo(self):
        """(free, total): the device's memory less what the double holds allocated."""
        total = cudaDeviceProp().totalGlobalMem
        return (cudaError_t.cudaSuccess, total - sum(b.nbytes for b in self.allocs.values()), total)

    def cudaMalloc(self, size: int):
        if self.sticky:
            return (self.sticky, None)
        err = self._unsafe("cudaMalloc")
        if err:
            return (err, None)
        if size <= 0:
            return (cudaError_t.cudaErrorInvalidValue, None)
        raw = np.full(size + ALIGN, GARBAGE, np.uint8)
        base = (raw.ctypes.data + ALIGN - 1) // ALIGN * ALIGN
        off = base - raw.ctypes.data
        buf = raw[off : off + size]
        self.allocs[base] = buf
        bisect.insort(self.bases, base)
        return (cudaError_t.cudaSuccess, base)

    def cudaFree(self, devPtr: int):
        if self.sticky:
            return (self.sticky,)
        if int(devPtr) == 0:
            return (cudaError_t.cudaSuccess,)
        err = self._unsafe("cudaFree")
        if err:
            return (err,)
        err = self._flush_all()  # cudaFree synchronises the device first
        if err:
            return (err,)
        buf = self.allocs.pop(int(devPtr), None)
        if buf is None:
            return (
                self._fail(cudaError_t.cudaErrorInvalidValue, f"cudaFree of {int(devPtr):#x}: not a base"),
            )
        self.bases.remove(int(devPtr))
        self.freed.append((int(devPtr), buf.size))
        self._graveyard.append(buf)
        return (cudaError_t.cudaSuccess,)

    def cudaMallocHost(self, size: int):
        if self.sticky:
            return (self.sticky, None)
        err = self._unsafe("cudaMallocHost")
        if err:
            return (err, None)
        raw = np.full(size + ALIGN, GARBAGE, np.uint8)
        base = (raw.ctypes.data + ALIGN - 1) // ALIGN * ALIGN
        self.pinned[base] = raw[base - raw.ctypes.data : base - raw.ctypes.data + size]
        return (cudaError_t.cudaSuccess, base)

    def cudaFreeHost(self, ptr: int):
        if self.sticky:
            return (self.sticky,)
        err = self._unsafe("cudaFreeHost") or self._flush_all()  # it synchronises the device first
        if err:
            return (err,)
        buf = self.pinned.pop(int(ptr), None)
        if buf is None:
            return (self._fail(cudaError_t.cudaErrorInvalidValue, f"cudaFreeHost of {int(ptr):#x}"),)
        self._graveyard.append(buf)
        return (cudaError_t.cudaSuccess,)

    def _copy_op(self, dst: int, src: int, count: int, kind: cudaMemcpyKind) -> Op | cudaError_t:
        """Check a copy now (pointer kinds, bounds, liveness); the op performs it later."""
        h2d, d2h = cudaMemcpyKind.cudaMemcpyHostToDevice, cudaMemcpyKind.cudaMemcpyDeviceToHost
        dev_src = kind in (d2h, cudaMemcpyKind.cudaMemcpyDeviceToDevice)
        dev_dst = kind in (h2d, cudaMemcpyKind.cudaMemcpyDeviceToDevice)
        for ptr, on_device, role in ((src, dev_src, "source"), (dst, dev_dst, "destination")):
            if on_device:
                try:
                    self.device_view(ptr, count)
                except Fault as exc:
                    return self._fail(cudaError_t.cudaErrorInvalidValue, f"{kind.name} {role}: {exc}")
            elif self.is_device(ptr):
                return self._fail(
                    cudaError_t.cudaErrorInvalidValue, f"{kind.name}: {role} {ptr:#x} is device memory"
                )
        if kind == h2d and self.pinned_view(src, count) is not None:  # read when the copy executes
            return Op(f"{kind.name} {count} B", lambda replay: self.write(dst, self._pinned(src, count)))
        if kind == h2d:  # pageable host memory is staged at the call
            staged = self.host_view(src, count).copy()
            return Op(f"{kind.name} {count} B", lambda replay: self.write(dst, staged))
        if kind == d2h and self.pinned_view(dst, count) is not None:
            return Op(f"{kind.name} {count} B", lambda replay: self._to_pinned(dst, src, count))
        if kind == d2h:
            return Op(f"{kind.name} {count} B", lambda replay: self._to_host(dst, src, count))
        return Op(f"{kind.name} {count} B", lambda replay: self.write(dst, self.read(src, count)))

    def cudaMemcpyAsync(self, dst: int, src: int, count: int, kind: cudaMemcpyKind, stream: Any):
        if self.sticky:
            return (self.sticky,)
        kind = cudaMemcpyKind(kind)
        s = self._stream(stream)
        if s is None:
            return (
                self._fail(cudaError_t.cudaErrorInvalidResourceHandle, "cudaMemcpyAsync: unknown stream"),
            )
        d2d = kind == cudaMemcpyKind.cudaMemcpyDeviceToDevice
        if s.capture is not None and not d2d and not self._host_side_pinned(int(dst), int(src), count, kind):
            s.capture.invalidated = s.capture.invalidated or f"{kind.name} copy (pageable host memory)"
            return (self._fail(cudaError_t.cudaErrorStreamCaptureUnsupported, f"{kind.name} during capture"),)
        op = self._copy_op(int(dst), int(src), int(count), kind)
        if not isinstance(op, Op):
            return (op,)
        if kind == cudaMemcpyKind.cudaMemcpyDeviceToHost and self.pinned_view(int(dst), count) is None:
            # to pageable memory: returns when done
            s.queue.append(op)
            return (self._flush(s),)
        return (self.enqueue(stream, op),)

    def cudaMemcpy(self, dst: int, src: int, count: int, kind: cudaMemcpyKind):
        if self.sticky:
            return (self.sticky,)
        for s in self._capturing():  # the legacy stream would wait for a capturing blocking stream
            assert s.capture is not None
            s.capture.invalidated = s.capture.invalidated or "synchronous cudaMemcpy"
            return (self._fail(cudaError_t.cudaErrorStreamCaptureImplicit, "cudaMemcpy during capture"),)
        op = self._copy_op(int(dst), int(src), int(count), cudaMemcpyKind(kind))
        if not isinstance(op, Op):
            return (op,)
        err = self._flush_all()
        return (err or self._execute([op], replay=False),)

    def cudaStreamCreate(self):
        handle = cudaStream_t()
        self.streams[int(handle)] = StreamState(handle)
        return (cudaError_t.cudaSuccess, handle)

    def cudaStreamDestroy(self, stream: Any):
        s = self.streams.pop(int(stream), None)
        return (cudaError_t.cudaSuccess if s is not None else cudaError_t.cudaErrorInvalidResourceHandle,)

    def cudaStreamSynchronize(self, stream: Any):
        if self.sticky:
            return (self.sticky,)
        s = self._stream(stream)
        if s is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        if s.capture is not None:
            s.capture.invalidated = s.capture.invalidated or "cudaStreamSynchronize"
            return (self._fail(cudaError_t.cudaErrorStreamCaptureUnsupported, "sync of a capturing stream"),)
        return (self._flush(s),)

    def cudaDeviceSynchronize(self):
        if self.sticky:
            return (self.sticky,)
        err = self._unsafe("cudaDeviceSynchronize")
        return (err or self._flush_all(),)

    def cudaStreamBeginCapture(self, stream: Any, mode: cudaStreamCaptureMode):
        if self.sticky:
            return (self.sticky,)
        s = self._stream(stream)
        if s is None or s.capture is not None:
            return (cudaError_t.cudaErrorInvalidValue if s is None else cudaError_t.cudaErrorIllegalState,)
        err = self._flush(s)  # (a fake simplification: earlier work is done before capture starts)
        if err:
            return (err,)
        s.capture = Capture(cudaStreamCaptureMode(mode))
        return (cudaError_t.cudaSuccess,)

    def cudaStreamIsCapturing(self, stream: Any):
        s = self._stream(stream)
        if s is None:
            return (cudaError_t.cudaErrorInvalidResourceHandle, None)
        if s.capture is None:
            return (cudaError_t.cudaSuccess, cudaStreamCaptureStatus.cudaStreamCaptureStatusNone)
        status = "Invalidated" if s.capture.invalidated else "Active"
        return (cudaError_t.cudaSuccess, cudaStreamCaptureStatus[f"cudaStreamCaptureStatus{status}"])

    def cudaStreamEndCapture(self, stream: Any):
        s = self._stream(stream)
        if s is None or s.capture is None:
            return (cudaError_t.cudaErrorInvalidValue, None)
        capture, s.capture = s.capture, None
        if capture.invalidated:
            self._fail(cudaError_t.cudaErrorStreamCaptureInvalidated, capture.invalidated)
            return (cudaError_t.cudaErrorStreamCaptureInvalidated, None)
        graph = cudaGraph_t()
        self.graphs[int(graph)] = capture.ops
        return (cudaError_t.cudaSuccess, graph)

    def cudaGraphInstantiate(self, graph: Any, flags: int):
        ops = self.graphs.get(int(graph))
        if ops is None:
            return (cudaError_t.cudaErrorInvalidValue, None)
        exe = cudaGraphExec_t()
        self.execs[int(exe)] = list(ops)
        return (cudaError_t.cudaSuccess, exe)

    def cudaGraphLaunch(self, graphExec: Any, stream: Any):
        if self.sticky:
            return (self.sticky,)
        ops = self.execs.get(int(graphExec))
        if ops is None:
            return (self._fail(cudaError_t.cudaErrorInvalidResourceHandle, "launch of a destroyed graph"),)
        replay = Op("graph launch", lambda replay: self._replay(ops))
        err = self.enqueue(stream, replay)
        self.launches += 0 if err else 1
        return (err,)

    def _replay(self, ops: list[Op]) -> None:
        for op in ops:
            op.run(True)

    def cudaGraphDestroy(self, graph: Any):
        found = self.graphs.pop(int(graph), None)
        return (cudaError_t.cudaSuccess if found is not None else cudaError_t.cudaErrorInvalidValue,)

    def cudaGraphExecDestroy(self, graphExec: Any):
        found = self.execs.pop(int(graphExec), None)
        return (cudaError_t.cudaSuccess if found is not None else cudaError_t.cudaErrorInvalidValue,)

    def cudaEventCreate(self):
        event = cudaEvent_t()
        self.events[int(event)] = None
        return (cudaError_t.cudaSuccess, event)

    def cudaEventRecord(self, event: Any, stream: Any):
        if int(event) not in self.events:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        self.events[int(event)] = None

        def stamp(replay: bool) -> None:
            self.events[int(event)] = time.perf_counter()

        self.recorded[int(event)] = op = Op("event record", stamp)
        return (self.enqueue(stream, op),)

    def cudaEventSynchronize(self, event: Any):
        """Run the work of the event's stream up to its record (work after it stays queued)."""
        if self.sticky:
            return (self.sticky,)
        err = self._unsafe("cudaEventSynchronize")
        if err:
            return (err,)
        op = self.recorded.get(int(event))
        for s in self.streams.values():
            i = next((i for i, queued in enumerate(s.queue) if queued is op), None)
            if i is not None:
                ops, s.queue = s.queue[: i + 1], s.queue[i + 1 :]
                return (self._execute(ops, replay=False),)
        return (cudaError_t.cudaSuccess,)  # done already, or never recorded

    def cudaEventElapsedTime(self, start: Any, end: Any):
        t0, t1 = self.events.get(int(start)), self.events.get(int(end))
        if t0 is None or t1 is None:
            return (cudaError_t.cudaErrorNotReady, None)
        return (cudaError_t.cudaSuccess, (t1 - t0) * 1e3)

    def cudaEventDestroy(self, event: Any):
        if int(event) not in self.events:
            return (cudaError_t.cudaErrorInvalidResourceHandle,)
        del self.events[int(event)]
        return (cudaError_t.cudaSuccess,)

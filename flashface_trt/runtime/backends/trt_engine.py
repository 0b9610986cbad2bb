"""One TensorRT engine on device buffers: its I/O checked against the export spec, checked enqueues.

TensorRT reports most misuse by a False return and a log line; every such return is checked here
and turned into an error naming the engine, the tensor and the value. No torch.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..artifacts.spec import NetworkSpec
from ..errors import FlashFaceError, InputError, WeightsError
from .cuda import CudaGraph, DeviceBuffer, Stream
from .graphs import Body

if TYPE_CHECKING:
    import tensorrt as trt

ALIGN = 256  # TensorRT: every tensor address must be at least 256-byte aligned (setTensorAddress)
EAGER = "eager"  # context key of engine calls that are never captured (one context per engine)
TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "UINT8": "uint8", "INT64": "int64"}


@dataclass
class DeviceTensor:
    """A device buffer with a shape and dtype (what engines read and write)."""

    buffer: DeviceBuffer
    shape: tuple[int, ...]
    dtype: str

    @property
    def ptr(self) -> int:
        return self.buffer.ptr

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @classmethod
    def empty(cls, shape: tuple[int, ...], dtype: str) -> DeviceTensor:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        return cls(DeviceBuffer(size), tuple(shape), dtype)


class Engine:
    """One deserialized engine, its I/O checked against the export spec, one context per graph key."""

    def __init__(self, runtime: trt.Runtime, path: Path, spec: NetworkSpec) -> None:
        self.spec = spec
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise WeightsError(f"TensorRT could not deserialize {path.name}; rebuild it")
        self.engine: trt.ICudaEngine = engine
        self.contexts: OrderedDict[Any, trt.IExecutionContext] = OrderedDict()
        self._check_io(path)

    def _check_io(self, path: Path) -> None:
        """The engine's tensors must be the spec's: names, modes, dtypes, shapes, profile ranges."""
        import tensorrt

        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        want = {t.name: t for t in (*self.spec.inputs, *self.spec.outputs)}
        if names != set(want):
            raise WeightsError(
                f"{path.name}: engine tensors {sorted(names)} differ from the export's {sorted(want)}"
            )
        for name, t in want.items():
            is_input = self.engine.get_tensor_mode(name) == tensorrt.TensorIOMode.INPUT
            if is_input != (t in self.spec.inputs):
                raise WeightsError(
                    f"{path.name}: {name!r} is an {'input' if is_input else 'output'} of the engine"
                )
            dtype = TRT_DTYPES.get(self.engine.get_tensor_dtype(name).name)
            if dtype != t.dtype:
                raise WeightsError(f"{path.name}: {name!r} is {dtype} in the engine, {t.dtype} in the export")
            shape = _dims(self.engine.get_tensor_shape(name))
            if not _shape_fits(shape, t.shape, is_input):
                raise WeightsError(
                    f"{path.name}: {name!r} has shape {list(shape)} in the engine, "
                    f"{list(t.shape)} in the export"
                )
        self._check_profile(path)

    def _check_profile(self, path: Path) -> None:
        """Every dynamic input's profiles together must hold the range the manifest promises (spec axes)."""
        lo_want, hi_want = self.spec.profile("min"), self.spec.profile("max")
        self.ranges: list[dict[str, tuple[tuple[int, ...], tuple[int, ...]]]] = []
        for k in range(self.engine.num_optimization_profiles):
            ranges = {}
            for t in self.spec.inputs:
                points = self.engine.get_tensor_profile_shape(t.name, k) if t.dynamic_axes() else []
                if t.dynamic_axes() and len(points) != 3:
                    raise WeightsError(f"{path.name}: input {t.name!r} has no optimisation profile {k}")
                if points:
                    ranges[t.name] = (_dims(points[0]), _dims(points[2]))
            self.ranges.append(ranges)
        for name in self.ranges[0] if self.ranges else ():
            lo = tuple(min(v) for v in zip(*(r[name][0] for r in self.ranges)))
            hi = tuple(max(v) for v in zip(*(r[name][1] for r in self.ranges)))
            if any(a > b for a, b in zip(lo, lo_want[name])) or any(a < b for a, b in zip(hi, hi_want[name])):
                raise WeightsError(
                    f"{path.name}: input {name!r} accepts {list(lo)}..{list(hi)}, the manifest promises "
                    f"{list(lo_want[name])}..{list(hi_want[name])}; rebuild it"
                )

    def profile_for(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """The first (smallest) optimisation profile that holds every input shape; else the last, whose
        `set_input_shape` then names the input outside it."""
        fits = (
            k
            for k, ranges in enumerate(self.ranges)
            if all(all(a <= s <= b for a, s, b in zip(lo, shapes[n], hi)) for n, (lo, hi) in ranges.items())
        )
        return next(fits, len(self.ranges) - 1)

    def memory_for(self, profile: int) -> int:
        """Device memory a context needs with this profile active (TensorRT 10.1+)."""
        return int(self.engine.get_device_memory_size_for_profile_v2(profile))

    def context(self, key: Any, memory: DeviceBuffer) -> trt.IExecutionContext:
        """The execution context of one graph key (TensorRT: one context per captured graph)."""
        import tensorrt

        ctx = self.contexts.get(key)
        if ctx is None:
            strategy = tensorrt.ExecutionContextAllocationStrategy.USER_MANAGED
            ctx = self.engine.create_execution_context(strategy)
            if ctx is None:
                raise FlashFaceError(f"{self.spec.name}: TensorRT could not create an execution context")
            ctx.set_device_memory(memory.ptr, memory.nbytes)
            self.contexts[key] = ctx
        return ctx

    def bind(
        self,
        ctx: trt.IExecutionContext,
        shapes: dict[str, tuple[int, ...]],
        ptrs: dict[str, int],
        stream: Stream,
    ) -> None:
        """Select the profile of these shapes, set every input shape and I/O address (each checked)."""
        name, profile = self.spec.name, self.profile_for(shapes)
        if ctx.active_optimization_profile != profile and not ctx.set_optimization_profile_async(
            profile, stream.handle
        ):
            raise FlashFaceError(f"{name}: TensorRT refused optimisation profile {profile}")
        for t in self.spec.inputs:
            if not ctx.set_input_shape(t.name, shapes[t.name]):
                raise InputError(f"{name}: input {t.name} shape {shapes[t.name]} is outside the engine")
        for t in self.spec.outputs:  # the engine writes this many bytes: it must be the buffer's shape
            got = _dims(ctx.get_tensor_shape(t.name))
            if got != tuple(shapes[t.name]):
                raise FlashFaceError(
                    f"{name}: output {t.name} would be {got}, its buffer is {shapes[t.name]}"
                )
        for t in (*self.spec.inputs, *self.spec.outputs):
            ptr = ptrs.get(t.name)
            if ptr is None:
                raise FlashFaceError(f"{name}: no address given for {t.name!r}")
            if ptr % ALIGN:
                raise FlashFaceError(f"{name}: address {ptr:#x} of {t.name!r} is not {ALIGN}-byte aligned")
            if not ctx.set_tensor_address(t.name, ptr):
                raise FlashFaceError(f"{name}: TensorRT refused the address {ptr:#x} of {t.name!r}")

    def launch(self, ctx: trt.IExecutionContext, stream: Stream) -> None:
        """Enqueue the bound context on `stream` (all a captured graph records)."""
        if not ctx.execute_async_v3(stream.handle):
            raise FlashFaceError(
                f"{self.spec.name}: TensorRT enqueue failed (execute_async_v3 returned False)"
            )


def _dims(dims: trt.Dims) -> tuple[int, ...]:
    """A TensorRT shape as a tuple of ints (-1: dynamic)."""
    return tuple(int(dims[i]) for i in range(len(dims)))


def _shape_fits(engine: tuple[int, ...], spec: tuple[int | str, ...], is_input: bool) -> bool:
    """Same rank; fixed sizes equal; dynamic axes dynamic (-1). An output may leave a fixed size -1."""
    if len(engine) != len(spec):
        return False
    for e, s in zip(engine, spec):
        if isinstance(s, str) and e != -1:
            return False
        if isinstance(s, int) and e != s and not (e == -1 and not is_input):
            return False
    return True


class TrtCapture:
    """CUDA-graph capture on the backend's stream for `StepGraphs` (the warm-up runs in place)."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def eager(self, body: Body) -> None:
        body()

    def capture(self, body: Body) -> CudaGraph:
        graph = CudaGraph(self.stream)
        graph.capture(body)
        return graph

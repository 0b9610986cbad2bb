"""A TensorRT double whose engines run the PyTorch modules their ONNX graphs were exported from.

It keeps the contracts of tests/fakes/tensorrt.py (profiles, shapes, 256-byte addresses, device
memory, a shape's first execution outside capture) and changes what an execution computes:

- with the CUDA double (`real_cuda=False`, the CPU dry run) an execution is an op of the fake
  stream that evaluates the module on host copies of the fake device memory;
- on a GPU (`real_cuda=True`) `execute_async_v3` launches the module's kernels on the stream it is
  given (`torch.cuda.ExternalStream`), reading and writing the bound device addresses in place
  (`__cuda_array_interface__` views, no copies), so `TrtBackend`'s allocation, alignment, K/V
  loading, graph capture and replay run on real CUDA with the real `cuda.bindings`. It writes the
  active profile's share of the `set_device_memory` scratch on every execution (a scratch too small
  or freed faults); the activations come from one private PyTorch memory pool per context, filled by
  the context's first (eager) execution of a shape. An execution that would allocate device memory
  after that (inside a capture, where real TensorRT never allocates) is refused (False, logged).
"""

from __future__ import annotations

import math
import sys
import types
from typing import Any

import numpy as np
import pytest
import torch

from flashface_trt.export.networks import GRAPHS
from flashface_trt.models.backend import TorchModels
from flashface_trt.models.config import EXPORT_CUTS
from tests.fakes import polygraphy_build
from tests.fakes import tensorrt as fake

TYPESTR = {"FLOAT": "<f4", "HALF": "<f2", "INT32": "<i4", "INT64": "<i8", "UINT8": "|u1"}


class _Raw:
    """Device memory at `ptr` as a `__cuda_array_interface__` (v2: no stream, so no implicit sync)."""

    def __init__(self, ptr: int, shape: tuple[int, ...], typestr: str) -> None:
        self.__cuda_array_interface__ = {
            "shape": tuple(shape),
            "typestr": typestr,
            "data": (int(ptr), False),
            "version": 2,
            "strides": None,
        }


def device_view(ptr: int, shape: tuple[int, ...], dtype_name: str) -> torch.Tensor:
    """A tensor over device memory someone else owns (written in place)."""
    return torch.as_tensor(_Raw(ptr, shape, TYPESTR[dtype_name]), device="cuda")


class TorchEngine(fake.ICudaEngine):
    """A fake plan whose kernels are the exported network's PyTorch module (`export.networks.GRAPHS`)."""

    def __init__(self, module: types.ModuleType, desc: dict, logger: fake.Logger) -> None:
        super().__init__(module, desc, logger)
        self.graph = module._graphs[self.network]

    def create_execution_context(
        self, strategy: Any = fake.ExecutionContextAllocationStrategy.STATIC
    ) -> fake.IExecutionContext:
        cls = CudaContext if self.trt._real_cuda else HostContext
        return cls(self, strategy)

    def evaluate(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The module on the inputs (graph order), its outputs by name."""
        inputs = [n for n, v in self.io.items() if v[0] == fake.TensorIOMode.INPUT]
        with torch.inference_mode():
            out = self.graph(*(feeds[n] for n in inputs))
        out = out if isinstance(out, (tuple, list)) else (out,)
        return dict(zip(self._outputs(), out))


class HostContext(fake.IExecutionContext):
    """The CUDA double's memory: the module runs when the fake stream executes the op."""

    def _run(self, shapes: dict, addresses: dict, memory: tuple[int, int], outs: dict) -> None:
        rt, eng = self.rt, self.engine
        eng.runs += 1
        rt.device_view(*memory)[:] = eng.runs % 251
        feeds = {}
        for name, shape in shapes.items():
            dtype = fake.NUMPY[eng.io[name][1].name]
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            feeds[name] = torch.from_numpy(np.frombuffer(rt.read(addresses[name], nbytes), dtype).copy())
            feeds[name] = feeds[name].reshape(shape)
        for name, value in eng.evaluate(feeds).items():
            if tuple(value.shape) != outs[name]:
                raise fake.Fault(fake.cudaError_t.cudaErrorIllegalAddress, f"{name}: {value.shape}")
            arr = value.detach().numpy().astype(fake.NUMPY[eng.io[name][1].name])
            rt.write(addresses[name], np.ascontiguousarray(arr))


class CudaContext(fake.IExecutionContext):
    """Real CUDA: the module's kernels go onto the given stream, in the context's own memory pool."""

    def __init__(self, engine: TorchEngine, strategy: Any) -> None:
        super().__init__(engine, fake.ExecutionContextAllocationStrategy.USER_MANAGED)
        self.pool = torch.cuda.MemPool()

    def _capturing(self, stream_handle: int) -> bool:
        err, status = self.rt.cudaStreamIsCapturing(int(stream_handle))
        return err == self.rt.cudaError_t.cudaSuccess and status.name != "cudaStreamCaptureStatusNone"

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        if not 0 <= profile_index < self.engine.num_optimization_profiles:
            return self._error(f"optimization profile {profile_index} does not exist")
        if self._capturing(stream_handle):
            return self._error("profile switch inside a CUDA-graph capture")
        self.active_optimization_profile, self.shapes = profile_index, {}
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        eng = self.engine
        if self.memory is None:
            return self._error("no device memory set (user-managed allocation strategy)")
        need = eng.memory[self.active_optimization_profile]
        if self.memory[1] < need:
            return self._error(f"device memory of {self.memory[1]} bytes is smaller than profile's {need}")
        missing = [n for n in self._inputs() if n not in self.shapes]
        unbound = [n for n in eng.names if n not in self.addresses]
        if missing or unbound:
            return self._error(f"input shapes not set: {missing}; tensor addresses not set: {unbound}")
        capturing, key = self._capturing(stream_handle), tuple(sorted(self.shapes.items()))
        if capturing and key not in self.warm:
            return self._error("first execution of these shapes inside a CUDA-graph capture")
        outs = eng._output_shapes(dict(self.shapes))
        before = torch.cuda.memory_stats().get("num_device_alloc", 0)
        stream = torch.cuda.ExternalStream(int(stream_handle))
        with torch.cuda.stream(stream), torch.cuda.use_mem_pool(self.pool):
            eng.runs += 1
            device_view(self.memory[0], (need,), "UINT8").fill_(eng.runs % 251)  # its activations' scratch
            dtypes = {n: eng.io[n][1].name for n in eng.names}
            feeds = {n: device_view(self.addresses[n], s, dtypes[n]) for n, s in self.shapes.items()}
            for name, value in eng.evaluate(feeds).items():
                device_view(self.addresses[name], outs[name], dtypes[name]).copy_(value)
        if torch.cuda.memory_stats().get("num_device_alloc", 0) != before and capturing:
            return self._error("device memory allocated inside execute_async_v3 during a capture")
        if not capturing:
            self.warm.add(key)
        return True


def install(mp: pytest.MonkeyPatch, models: TorchModels, real_cuda: bool, version: str = "10.13.0.35") -> Any:
    """Put the double in place as `tensorrt` (with the CUDA double unless `real_cuda`) and patch
    polygraphy's build; returns `tests.fakes.Fakes` (its `cuda` is the real runtime on a GPU)."""
    from tests.fakes import Fakes
    from tests.fakes import install as install_fakes

    if real_cuda:
        from cuda.bindings import runtime as rt

        fakes = Fakes(rt, fake.make_module(rt, version), [], {})  # type: ignore[arg-type]
        polygraphy_build.patch(mp, fakes.builds, fakes.overrides)
    else:
        fakes = install_fakes(mp, version)
    models.unet.set_cuts(EXPORT_CUTS)  # the cuts the graphs were exported with
    graphs = {name: GRAPHS[name](models).eval() for name in GRAPHS}
    runtime = type("Runtime", (fake.Runtime,), {"_module": fakes.trt})
    fakes.trt.__dict__.update(_graphs=graphs, _real_cuda=real_cuda, ICudaEngine=TorchEngine, Runtime=runtime)
    mp.setitem(sys.modules, "tensorrt", fakes.trt)
    return fakes

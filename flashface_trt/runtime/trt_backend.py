"""The TensorRT backend: engines on one stream, shared activation memory, a CUDA-graphed loop. No torch.

Never run here (TensorRT cannot be installed on these machines): type-checked against
`tensorrt-stubs`; the shapes, tables and wiring it relies on are unit-tested (`buffers.py`), and
the update step it replays is the ONNX graph tested against the NumPy sampler.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..engine.cache import GpuIdentity, check_engine
from ..errors import FlashFaceError, WeightsError
from ..export.spec import NetworkSpec
from ..models.tokenizer import ClipTokenizer
from .buffers import LoopDims, io_shapes, step_coefficients, step_tables
from .cuda import CudaGraph, DeviceBuffer, Stream, copy_device, copy_to_device, copy_to_host, device_info
from .identities import DEFAULT_KV_CACHE_BYTES, Identity, ReferenceKVCache, kv_key
from .sampler import GuidanceParams, StepPlan, guide

if TYPE_CHECKING:
    import tensorrt as trt

log = logging.getLogger(__name__)


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
    """One deserialized engine and its execution contexts (one per input-shape layout)."""

    def __init__(self, runtime: trt.Runtime, path: Path, spec: NetworkSpec) -> None:
        self.spec = spec
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise WeightsError(f"TensorRT could not deserialize {path.name}; rebuild it")
        self.engine: trt.ICudaEngine = engine
        self.contexts: dict[Any, trt.IExecutionContext] = {}

    @property
    def memory_size(self) -> int:
        return int(self.engine.device_memory_size_v2)

    def context(self, layout: Any, memory: DeviceBuffer) -> trt.IExecutionContext:
        """An execution context for one shape layout, on the shared activation memory."""
        import tensorrt

        if layout not in self.contexts:
            strategy = tensorrt.ExecutionContextAllocationStrategy.USER_MANAGED
            ctx = self.engine.create_execution_context(strategy)
            ctx.set_device_memory(memory.ptr, memory.nbytes)
            self.contexts[layout] = ctx
        return self.contexts[layout]

    def enqueue(
        self,
        ctx: trt.IExecutionContext,
        shapes: dict[str, tuple[int, ...]],
        ptrs: dict[str, int],
        stream: Stream,
    ) -> None:
        for t in self.spec.inputs:
            if not ctx.set_input_shape(t.name, shapes[t.name]):
                raise WeightsError(
                    f"{self.spec.name}: input {t.name} shape {shapes[t.name]} is outside the engine"
                )
        for name, ptr in ptrs.items():
            ctx.set_tensor_address(name, ptr)
        if not ctx.execute_async_v3(stream.handle):
            raise WeightsError(f"{self.spec.name}: TensorRT enqueue failed")


@dataclass
class TrtDenoiser:
    """Per-step `denoise(x, step) -> x0` (host x in, host x0 out) and the device state a graphed loop uses."""

    backend: TrtBackend
    cond: DeviceTensor  # [1, 77, C]
    uncond: DeviceTensor
    identity: Identity  # latents: DeviceTensor [R, 4, hr, wr]
    mask: np.ndarray  # [1, 1, h, w]
    guidance: GuidanceParams
    uncond_key: str = ""
    prepared: LoopDims | None = None  # sizes the backend's buffers were last filled for

    def dims(self, x_shape: tuple[int, ...], steps: int) -> LoopDims:
        n, _, h, w = x_shape
        return LoopDims(n, h, w, self.identity.num_refs, steps)

    def reference_kv(self, t: int, dims: LoopDims) -> dict[str, DeviceTensor]:
        """Reference K/V of one timestep: from the identity cache, or the ReferenceNet engine."""
        key = kv_key(self.identity, t, self.uncond_key)
        kv = self.backend.kv_cache.get(key)
        if kv is None:
            b = self.backend
            spec = b.specs["reference_net"]
            shapes = io_shapes(spec, dims)
            kv = {t_.name: DeviceTensor.empty(shapes[t_.name], t_.dtype) for t_ in spec.outputs}
            t_in = DeviceTensor.empty((1,), "float32")
            copy_to_device(t_in.ptr, np.full(1, t, np.float32), b.stream)
            ptrs = {
                "ref_latents": self.identity.latents.ptr,
                "timestep": t_in.ptr,
                "context": self.uncond.ptr,
            }
            b.run("reference_net", "one", shapes, {**ptrs, **{k: v.ptr for k, v in kv.items()}})
            b.stream.synchronize()
            self.backend.kv_cache.put(key, kv)
        return kv

    def unet_ptrs(self, dims: LoopDims, k: int, x_rep: int, t: int, lam: int, kv: dict[str, DeviceTensor]):
        """Input/output addresses of one UNet call (2-way: the context's rows N..3N)."""
        b = self.backend.buffers
        offset = 0 if k == 3 else dims.samples * self.cond.nbytes
        return {
            "x": x_rep,
            "mask": b["mask"].ptr,
            "timestep": t,
            "context": b["context"].ptr + offset,
            "ref_scale": lam,
            "eps": b["eps"].ptr,
            **{name: v.ptr for name, v in kv.items()},
        }

    def prepare(self, dims: LoopDims) -> None:
        """The backend's buffers for these sizes, filled with this request's mask and context rows.

        Context rows are [cond x N, cond x N, uncond x N]: the 3-way context; rows N.. are the 2-way one.
        """
        if self.prepared == dims:
            return
        b, n = self.backend, dims.samples
        shapes = io_shapes(b.specs["unet"], dims, 3)
        for name in ("x", "eps", "mask", "context"):
            b.buffer(name, shapes[name], "float32")
        copy_to_device(b.buffers["mask"].ptr, self.mask, b.stream)
        row = self.cond.nbytes
        for i in range(3 * n):
            src = self.cond if i < 2 * n else self.uncond
            copy_device(b.buffers["context"].ptr + i * row, src.ptr, row, b.stream)
        self.prepared = dims

    def __call__(self, x: np.ndarray, step: StepPlan) -> np.ndarray:
        b = self.backend
        dims = self.dims(x.shape, 1)
        self.prepare(dims)  # no-op after the first step
        k, n = step.batch_factor, x.shape[0]
        x_rep = b.buffers["x"]
        copy_to_device(x_rep.ptr, np.concatenate([x] * k), b.stream)
        t_buf = DeviceTensor.empty((k * n,), "float32")
        copy_to_device(t_buf.ptr, np.full(k * n, step.t, np.float32), b.stream)
        lam = DeviceTensor.empty((step.ref_rows(n),), "float32")
        copy_to_device(lam.ptr, np.full(step.ref_rows(n), step.ref_strength, np.float32), b.stream)
        kv = self.reference_kv(step.t, dims)
        shapes = io_shapes(b.specs["unet"], dims, k)
        b.run("unet", k, shapes, self.unet_ptrs(dims, k, x_rep.ptr, t_buf.ptr, lam.ptr, kv))
        eps = np.empty(shapes["eps"], np.float32)
        copy_to_host(eps, b.buffers["eps"].ptr, b.stream)
        b.stream.synchronize()
        return step.ddim.x0_from_eps(x, guide(eps, n, step, self.guidance))


class TrtBackend:
    """FlashFace on TensorRT engines from `flashface-trt build` (fp16, one stream, CUDA graphs)."""

    name = "tensorrt"

    def __init__(self, engines_dir: str | Path, kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES) -> None:
        self.root = Path(engines_dir)
        try:
            self.manifest = json.loads((self.root / "engines.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise WeightsError(
                f"{str(self.root)!r} has no readable engines.json; run `flashface-trt build`"
            ) from exc
        try:
            import tensorrt
        except ImportError as exc:
            raise FlashFaceError(
                "TensorRT is not installed: the tensorrt backend needs it and an NVIDIA GPU"
            ) from exc
        info = device_info(0)
        gpu = GpuIdentity(info.name, info.compute_capability)
        self.trt_logger = tensorrt.Logger(tensorrt.Logger.WARNING)
        runtime = tensorrt.Runtime(self.trt_logger)
        self.specs = {n: NetworkSpec.from_dict(e["spec"]) for n, e in self.manifest["engines"].items()}
        self.engines = {}
        for name, entry in self.manifest["engines"].items():
            check_engine(
                self.root / entry["file"], str(tensorrt.__version__), gpu
            )  # stale engines refused here
            self.engines[name] = Engine(runtime, self.root / entry["file"], self.specs[name])
        # one activation memory for every engine: they run one after another on one stream
        self.memory = DeviceBuffer(max(e.memory_size for e in self.engines.values()))
        self.stream = Stream()
        self._tokenizer = ClipTokenizer(self.root / self.manifest["vocab"])
        self.kv_cache = ReferenceKVCache(kv_cache_bytes)
        self.buffers: dict[str, DeviceTensor] = {}  # loop buffers, reused across requests of one size
        self.graphs: dict[tuple, CudaGraph] = {}
        self.generation = 0  # bumped whenever a loop buffer is reallocated: cached graphs are dropped

    def buffer(self, name: str, shape: tuple[int, ...], dtype: str) -> DeviceTensor:
        """The named loop buffer at this shape; reallocating it invalidates every captured graph."""
        buf = self.buffers.get(name)
        if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype:
            self.buffers[name] = buf = DeviceTensor.empty(tuple(shape), dtype)
            self.generation += 1
            for graph in self.graphs.values():
                graph.destroy()
            self.graphs.clear()
        return buf

    @property
    def tokenizer(self) -> ClipTokenizer:
        return self._tokenizer

    def run(self, name: str, layout: Any, shapes: dict[str, tuple[int, ...]], ptrs: dict[str, int]) -> None:
        engine = self.engines[name]
        engine.enqueue(engine.context(layout, self.memory), shapes, ptrs, self.stream)

    def _run_host(self, name: str, dims: LoopDims, **inputs: np.ndarray) -> dict[str, DeviceTensor]:
        spec = self.specs[name]
        shapes = io_shapes(spec, dims)
        shapes.update({k: v.shape for k, v in inputs.items()})
        ins = {}
        for t in spec.inputs:
            ins[t.name] = DeviceTensor.empty(shapes[t.name], t.dtype)
            copy_to_device(ins[t.name].ptr, inputs[t.name].astype(t.dtype), self.stream)
        outs = {t.name: DeviceTensor.empty(shapes[t.name], t.dtype) for t in spec.outputs}
        self.run(name, "one", shapes, {k: v.ptr for k, v in {**ins, **outs}.items()})
        self.stream.synchronize()
        return outs

    def to_host(self, t: DeviceTensor) -> np.ndarray:
        out = np.empty(t.shape, t.dtype)
        copy_to_host(out, t.ptr, self.stream)
        self.stream.synchronize()
        return out

    def from_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.float32)

    def encode_text(self, ids: np.ndarray) -> list[DeviceTensor]:
        """Token ids [P, 77] -> one device tensor [1, 77, C] per prompt."""
        dims = LoopDims(1, 8, 8, 1, 1, prompts=len(ids))
        hidden = self.to_host(self._run_host("text_encoder", dims, input_ids=ids.astype(np.int32))["hidden"])
        out = []
        for row in hidden:
            t = DeviceTensor.empty((1, *row.shape), "float32")
            copy_to_device(t.ptr, row[None], self.stream)
            out.append(t)
        return out

    def encode_references(self, images: np.ndarray) -> DeviceTensor:
        """Crops [R, 3, S, S] -> scaled latents [R, 4, S/8, S/8], kept on the device."""
        dims = LoopDims(1, 8, 8, len(images), 1)
        return self._run_host("vae_encoder", dims, images=images)["latents"]

    def denoiser(
        self,
        cond: Any,
        uncond: Any,
        identity: Identity,
        mask: np.ndarray,
        guidance: GuidanceParams,
        uncond_key: str = "",
    ) -> TrtDenoiser:
        c = cond[0] if isinstance(cond, list) else cond
        u = uncond[0] if isinstance(uncond, list) else uncond
        return TrtDenoiser(self, c, u, identity, mask.astype(np.float32)[None, None], guidance, uncond_key)

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Latents [N, 4, h, w] -> uint8 images [N, 8h, 8w, 3]."""
        n, _, h, w = z.shape
        return self.to_host(self._run_host("vae_decoder", LoopDims(n, h, w, 1, 1), latents=z)["images"])

    def loop(
        self,
        denoise: TrtDenoiser,
        x: np.ndarray,
        steps: Sequence[StepPlan],
        wrap: Callable[[Iterable[StepPlan]], Iterable[StepPlan]] | None = None,
    ) -> np.ndarray:
        """The whole denoising loop as one CUDA graph launch (captured on first use for these shapes)."""
        dims = denoise.dims(x.shape, len(steps))
        denoise.prepare(dims)
        n = dims.samples
        tables = step_tables(
            [step_coefficients(s, denoise.guidance) for s in steps],
            [s.t for s in steps],
            [s.ref_strength for s in steps],
            dims,
        )
        for name, table in zip(("coef", "t_unet", "lam", "t_ref"), tables):
            copy_to_device(self.buffer(name, table.shape, "float32").ptr, table, self.stream)
        xs = [self.buffer(f"x{i}", x.shape, "float32") for i in (0, 1)]
        copy_to_device(xs[0].ptr, x, self.stream)
        kvs = [denoise.reference_kv(s.t, dims) for s in steps]  # cached, or computed once per timestep
        layout = tuple(s.three_way for s in steps)
        kv_ptrs = tuple(v.ptr for kv in kvs for v in kv.values())  # baked into the graph
        key = (dims, layout, kv_ptrs, self.generation)
        graph = self.graphs.get(key)

        def work() -> None:
            b = self.buffers
            for i, (s, kv) in enumerate(zip(steps, kvs)):
                k = s.batch_factor
                cur, nxt = xs[i % 2], xs[(i + 1) % 2]
                row = cur.nbytes
                for j in range(k):  # the k-way batch repeats x
                    copy_device(b["x"].ptr + j * row, cur.ptr, row, self.stream)
                t_ptr = b["t_unet"].ptr + i * 3 * n * 4
                lam_ptr = b["lam"].ptr + i * 2 * n * 4
                self.run(
                    "unet",
                    k,
                    io_shapes(self.specs["unet"], dims, k),
                    denoise.unet_ptrs(dims, k, b["x"].ptr, t_ptr, lam_ptr, kv),
                )
                step_name = f"step_{k}way"
                ptrs = {
                    "x": cur.ptr,
                    "eps": b["eps"].ptr,
                    "coef": b["coef"].ptr + i * 9 * 4,
                    "x_next": nxt.ptr,
                }
                self.run(step_name, "one", io_shapes(self.specs[step_name], dims, k), ptrs)

        if graph is None:
            work()  # eager first run: warms every context and shape up before capture
            graph = CudaGraph()
            copy_to_device(xs[0].ptr, x, self.stream)
            graph.capture(self.stream, work)
            self.graphs[key] = graph
        graph.launch(self.stream)
        return self.to_host(xs[len(steps) % 2])

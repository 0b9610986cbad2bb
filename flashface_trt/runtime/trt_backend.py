"""The TensorRT backend: engines on one stream, shared activation memory, CUDA-graphed steps. No torch.

Each denoising step is one body over static device buffers of the request shape: the k-way copy
of x, the UNet engine, the guidance + DDIM update engine (`step_2way`/`step_3way`, the exported
`runtime.guidance.step_update`), and the copy of x_next back into x. The current step's timesteps,
λ, coefficient row and reference K/V are copied into static buffers before the body runs, so one
captured graph per (shape, batch layout) serves every step of every request (`graphs.StepGraphs`).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .axes import LoopDims, io_shapes
from .buffers import check_kv_wiring, step_tables
from .cuda import DeviceBuffer, Stream, copy_device, copy_to_device, copy_to_host, device_info
from .engines import GpuIdentity, check_engine
from .errors import FlashFaceError, InputError, WeightsError
from .graphs import StepGraphs
from .guidance import STEP_COEFFICIENTS
from .identities import DEFAULT_KV_CACHE_BYTES, Identity, ReferenceKVCache, kv_key
from .layout import BatchLayout, context_table_rows
from .sampler import GuidanceParams, StepPlan
from .spec import NetworkSpec
from .tokenizer import ClipTokenizer
from .trt_engine import EAGER, DeviceTensor, Engine, TrtCapture

log = logging.getLogger(__name__)


class StepState:
    """Static buffers of one request shape: x, the k-way batch, eps, x_next, context, mask, the
    current step's t / λ / coefficients and reference K/V, and the request's per-step tables."""

    def __init__(self, backend: TrtBackend, dims: LoopDims) -> None:
        unet = backend.specs["unet"]
        shapes = io_shapes(unet, dims, 3)
        self.dims = dims
        self.key = dims
        n = dims.samples
        self.buf = {
            "x": DeviceTensor.empty(io_shapes(backend.specs["step_3way"], dims, 3)["x"], "float32"),
            "x_next": DeviceTensor.empty(io_shapes(backend.specs["step_3way"], dims, 3)["x"], "float32"),
            "x_rep": DeviceTensor.empty(shapes["x"], "float32"),
            "eps": DeviceTensor.empty(shapes["eps"], "float32"),
            "mask": DeviceTensor.empty(shapes["mask"], "float32"),
            "t": DeviceTensor.empty((BatchLayout(n, True).rows,), "float32"),
            "lam": DeviceTensor.empty((BatchLayout(n, False).ref_rows,), "float32"),
            "coef": DeviceTensor.empty(io_shapes(backend.specs["step_3way"], dims, 3)["coef"], "float32"),
        }
        ctx_row = shapes["context"][1:]
        for three in (False, True):  # one context buffer per layout: each starts 256-byte aligned
            self.buf[f"context{BatchLayout(n, three).k}"] = DeviceTensor.empty(
                (BatchLayout(n, three).rows, *ctx_row), "float32"
            )
        self.kv = {
            t.name: DeviceTensor.empty(shapes[t.name], t.dtype)
            for t in backend.specs["reference_net"].outputs
        }
        self.tables: dict[str, DeviceTensor] = {}
        self.owner: object = None  # the denoiser whose request the buffers hold


@dataclass
class TrtDenoiser:
    """`denoise(x, step) -> x_next` of one request: its values copied in, then the (graphed) step body."""

    backend: TrtBackend
    cond: DeviceTensor  # [1, 77, C]
    uncond: DeviceTensor
    identity: Identity  # latents: DeviceTensor [R, 4, hr, wr]
    mask: np.ndarray  # [1, 1, h, w]
    guidance: GuidanceParams
    steps: Sequence[StepPlan]
    uncond_key: str = ""

    def __post_init__(self) -> None:
        self.index = {s: i for i, s in enumerate(self.steps)}
        self.state: StepState | None = None
        self.out: DeviceTensor | None = None  # this request's x between steps (never a shared buffer)

    def reference_kv(self, t: int, dims: LoopDims) -> dict[str, DeviceTensor]:
        """Reference K/V of one timestep: from the identity cache, or the ReferenceNet engine."""
        b = self.backend
        key = kv_key(self.identity, t, self.uncond_key)
        kv = b.kv_cache.get(key)
        if kv is None:
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
            b.run("reference_net", EAGER, shapes, {**ptrs, **{k: v.ptr for k, v in kv.items()}})
            b.stream.synchronize()
            b.kv_cache.put(key, kv)
        return kv

    def _load(self, dims: LoopDims) -> StepState:
        """This request's tables, context rows and mask into the shape's buffers."""
        b = self.backend
        st = b.state(dims)
        tables = step_tables(list(self.steps), self.guidance, dims.samples)
        for name, table in tables.items():
            st.tables[name] = DeviceTensor.empty(table.shape, "float32")
            copy_to_device(st.tables[name].ptr, table, b.stream)
        copy_to_device(st.buf["mask"].ptr, self.mask, b.stream)
        text = (self.cond, self.uncond)
        for k in (2, 3):
            rows = context_table_rows(dims.samples)[BatchLayout(dims.samples, k == 3).context_offset :]
            dst = st.buf[f"context{k}"]
            row_bytes = self.cond.nbytes
            for r, which in enumerate(rows):
                copy_device(dst.ptr + r * row_bytes, text[which].ptr, row_bytes, b.stream)
        b.stream.synchronize()  # the host tables above must outlive their copies
        st.owner = self
        return st

    def __call__(self, x: np.ndarray | DeviceTensor, step: StepPlan) -> DeviceTensor:
        b = self.backend
        i = self.index.get(step)
        if i is None:
            raise InputError(f"step t={step.t} is not in the plan this denoiser was made for")
        n, _, h, w = x.shape
        dims = LoopDims(n, h, w, self.identity.num_refs, 1)  # shapes only: any step count shares them
        st = self.state
        if st is None or st.owner is not self or b.states.get(dims) is not st:
            st = self.state = self._load(dims)  # first step, or another request (or shape) used them
        b.states.move_to_end(dims)
        if self.out is None:
            self.out = DeviceTensor.empty(st.buf["x"].shape, "float32")
        if isinstance(x, DeviceTensor):
            copy_device(st.buf["x"].ptr, x.ptr, st.buf["x"].nbytes, b.stream)
        else:
            copy_to_device(st.buf["x"].ptr, np.ascontiguousarray(x, np.float32), b.stream)
        for name in ("t", "lam", "coef"):
            row = st.buf[name].nbytes
            copy_device(st.buf[name].ptr, st.tables[name].ptr + i * row, row, b.stream)
        for name, src in self.reference_kv(step.t, dims).items():
            copy_device(st.kv[name].ptr, src.ptr, src.nbytes, b.stream)
        b.graphs.run((dims, step.three_way), lambda: b.step_body(st, step.three_way))
        copy_device(self.out.ptr, st.buf["x"].ptr, self.out.nbytes, b.stream)
        if not isinstance(x, DeviceTensor):
            b.stream.synchronize()  # the host noise must outlive its copy
        return self.out


def check_step_rows(specs: dict[str, NetworkSpec]) -> None:
    """The update engines must take the coefficient row this runtime writes (`STEP_COEFFICIENTS`)."""
    for k in (2, 3):
        coef = next(t for t in specs[f"step_{k}way"].inputs if t.name == "coef")
        if tuple(coef.shape) != (len(STEP_COEFFICIENTS),):
            raise WeightsError(
                f"step_{k}way takes {list(coef.shape)} step coefficients, this runtime writes "
                f"{len(STEP_COEFFICIENTS)} ({', '.join(STEP_COEFFICIENTS)}): the engines come from another "
                "version's export; export and build again with this one"
            )


class TrtBackend:
    """FlashFace on TensorRT engines from `flashface-trt build` (fp16, one stream, CUDA graphs)."""

    name = "tensorrt"

    def __init__(
        self, engines_dir: str | Path, kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES, max_shapes: int = 4
    ) -> None:
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
        check_step_rows(self.specs)
        self.engines = {}
        for name, entry in self.manifest["engines"].items():
            check_engine(self.root / entry["file"], str(tensorrt.__version__), gpu)  # stale engines refused
            self.engines[name] = Engine(runtime, self.root / entry["file"], self.specs[name])
        # one activation memory for every engine: they run one after another on one stream
        self.memory = DeviceBuffer(max(e.memory_size for e in self.engines.values()))
        self.stream = Stream()
        self._tokenizer = ClipTokenizer(self.root / self.manifest["vocab"])
        self.kv_cache = ReferenceKVCache(kv_cache_bytes)
        self.max_shapes = max_shapes
        self.states: OrderedDict[LoopDims, StepState] = OrderedDict()
        self.graphs = StepGraphs(TrtCapture(self.stream), 2 * max_shapes)

    @property
    def tokenizer(self) -> ClipTokenizer:
        return self._tokenizer

    def state(self, dims: LoopDims) -> StepState:
        """The static buffers of a request shape, checked against the engines' profiles once."""
        st = self.states.pop(dims, None)
        if st is None:
            check_kv_wiring(self.specs["reference_net"], self.specs["unet"], dims)
            for name, k in (("unet", 2), ("unet", 3), ("step_2way", 2), ("step_3way", 3)):
                shapes = io_shapes(self.specs[name], dims, k)
                self.specs[name].check_shapes({t.name: shapes[t.name] for t in self.specs[name].inputs})
            st = StepState(self, dims)
        self.states[dims] = st
        while len(self.states) > self.max_shapes:
            old, _ = self.states.popitem(last=False)
            self.graphs.discard(old)  # they read its buffers
            for engine in self.engines.values():
                for ctx_key in [c for c in engine.contexts if c != EAGER and c[0] == old]:
                    del engine.contexts[ctx_key]
        return st

    def step_body(self, st: StepState, three_way: bool) -> None:
        """One denoising step on the static buffers: what a CUDA graph records."""
        dims, b = st.dims, st.buf
        layout = BatchLayout(dims.samples, three_way)
        row = b["x"].nbytes
        for j in range(layout.k):  # layout.sample_rows: x repeated k times
            copy_device(b["x_rep"].ptr + j * row, b["x"].ptr, row, self.stream)
        ptrs = {
            "x": b["x_rep"].ptr,
            "mask": b["mask"].ptr,
            "timestep": b["t"].ptr,
            "context": b[f"context{layout.k}"].ptr,
            "ref_scale": b["lam"].ptr,
            "eps": b["eps"].ptr,
            **{name: v.ptr for name, v in st.kv.items()},
        }
        key = (dims, three_way)
        self.run("unet", key, io_shapes(self.specs["unet"], dims, layout.k), ptrs)
        step = f"step_{layout.k}way"
        ptrs = {"x": b["x"].ptr, "eps": b["eps"].ptr, "coef": b["coef"].ptr, "x_next": b["x_next"].ptr}
        self.run(step, key, io_shapes(self.specs[step], dims, layout.k), ptrs)
        copy_device(b["x"].ptr, b["x_next"].ptr, row, self.stream)

    def run(self, name: str, key: Any, shapes: dict[str, tuple[int, ...]], ptrs: dict[str, int]) -> None:
        engine = self.engines[name]
        engine.enqueue(engine.context(key, self.memory), shapes, ptrs, self.stream)

    def _run_host(
        self, name: str, dims: LoopDims, **inputs: np.ndarray | DeviceTensor
    ) -> dict[str, DeviceTensor]:
        """One eager engine call: host arrays are copied in, device tensors bound as they are."""
        spec = self.specs[name]
        shapes = io_shapes(spec, dims)
        shapes.update({k: tuple(v.shape) for k, v in inputs.items()})
        spec.check_shapes({t.name: shapes[t.name] for t in spec.inputs})
        ptrs = {}
        for t in spec.inputs:
            value = inputs[t.name]
            if isinstance(value, DeviceTensor):
                ptrs[t.name] = value.ptr
                continue
            dev = DeviceTensor.empty(shapes[t.name], t.dtype)
            copy_to_device(dev.ptr, value.astype(t.dtype), self.stream)
            ptrs[t.name], inputs[t.name] = dev.ptr, dev  # keep the device copy alive until the sync
        outs = {t.name: DeviceTensor.empty(shapes[t.name], t.dtype) for t in spec.outputs}
        self.run(name, EAGER, shapes, {**ptrs, **{k: v.ptr for k, v in outs.items()}})
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
        self.stream.synchronize()
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
        steps: Sequence[StepPlan] = (),
        uncond_key: str = "",
    ) -> TrtDenoiser:
        c = cond[0] if isinstance(cond, list) else cond
        u = uncond[0] if isinstance(uncond, list) else uncond
        m = mask.astype(np.float32)[None, None]
        return TrtDenoiser(self, c, u, identity, m, guidance, list(steps), uncond_key)

    def decode(self, z: np.ndarray | DeviceTensor) -> np.ndarray:
        """Latents [N, 4, h, w] (host or device) -> uint8 images [N, 8h, 8w, 3]."""
        n, _, h, w = z.shape
        return self.to_host(self._run_host("vae_decoder", LoopDims(n, h, w, 1, 1), latents=z)["images"])

"""The TensorRT backend: engines on one stream, shared activation memory, CUDA-graphed batched steps.

A step is one body over static device buffers of a padded batch (`runtime.sampling.batch.pad_plan`): the
UNet engine gathers every row from the requests' latents, masks and prompt embeddings (the plan's
index arrays), attends each reference row to its group's K/V, and the update engine (`step`, the
exported `runtime.sampling.guidance.batched_update`) moves every sample to its next step; each request's
x_next is copied from there into its own buffer. Before the body runs, the batch's values
(latents, masks, texts, each group's K/V; the host index arrays, per-row timesteps and λ and
per-sample coefficients through pinned staging buffers) are copied into the static buffers, so
one captured graph per (bucket, image size, references) serves every step of every batch
(`graphs.StepGraphs`, one execution context per captured graph). The host does not wait for a
step: the stream orders the work, and a step waits only for the event recorded after the previous
step's copies before it rewrites staging buffers. No torch.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts.axes import LoopDims, groups_per_call, io_shapes
from ..artifacts.engines import GpuIdentity, check_engine, tensorrt_version
from ..artifacts.exports import reference_size
from ..artifacts.spec import NetworkSpec
from ..errors import WeightsError
from ..sampling.batch import (
    SHARED_ROWS,
    STEP_INPUTS,
    Member,
    PaddedPlan,
    cached_kv,
    pad_plan,
    plan_batch,
)
from ..sampling.guidance import STEP_COEFFICIENTS
from ..sampling.identities import DEFAULT_KV_CACHE_BYTES, DEFAULT_PREFETCH_IMAGES, ReferenceKVCache
from ..sampling.tokenizer import ClipTokenizer
from .buffers import check_kv_wiring
from .cuda import DeviceBuffer, Event, Stream, copy_device, copy_to_device, copy_to_host, device_info
from .cuda import free_device_memory as free_memory
from .graphs import StepGraphs
from .trt_engine import ALIGN, EAGER, DeviceTensor, Engine, TrtCapture


class BatchState:
    """Static buffers of one padded batch: every input and output of the UNet and update engines,
    and pinned staging (`host`) of its host inputs and x."""

    def __init__(self, backend: TrtBackend, dims: LoopDims) -> None:
        self.dims = dims
        self.buf: dict[str, DeviceTensor] = {}
        for name in ("unet", "step"):
            spec, shapes = backend.specs[name], io_shapes(backend.specs[name], dims)
            for t in (*spec.inputs, *spec.outputs):
                if t.name not in self.buf:  # x and eps are shared by the two engines
                    self.buf[t.name] = DeviceTensor.empty(shapes[t.name], t.dtype)
        self.kv_names = [t.name for t in backend.specs["reference_net"].outputs]
        staged = {n: self.buf[n] for n in (*STEP_INPUTS, *SHARED_ROWS, "x") if n in self.buf}
        sizes = [-(-t.nbytes // ALIGN) * ALIGN for t in staged.values()]
        self.pinned = DeviceBuffer(sum(sizes), pinned=True)
        starts = np.cumsum([0, *sizes[:-1]]).tolist()
        self.host = {
            n: self.pinned.host_array(o, t.shape, t.dtype) for (n, t), o in zip(staged.items(), starts)
        }


def _slot(t: DeviceTensor, index: int) -> int:
    """Address of row `index` of a device tensor (first axis)."""
    return t.ptr + index * (t.nbytes // t.shape[0])


class TrtBackend:
    """FlashFace on TensorRT engines from `flashface-trt build` (fp16, one stream, CUDA graphs)."""

    name = "tensorrt"
    free_memory = staticmethod(free_memory)  # the device's free bytes, for `Service.admission`
    prefetch_images = DEFAULT_PREFETCH_IMAGES  # reference images per ReferenceNet call on admission (0: off)

    def __init__(
        self, engines_dir: str | Path, kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES, max_shapes: int = 8
    ) -> None:
        self.root = Path(engines_dir)
        try:
            self.manifest = json.loads((self.root / "engines.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise WeightsError(
                f"{str(self.root)!r} has no readable engines.json; run `flashface-trt build`"
            ) from exc
        version = tensorrt_version()  # FlashFaceError without TensorRT (or with only its stubs)
        import tensorrt

        info = device_info(0)
        gpu = GpuIdentity(info.name, info.compute_capability)
        self.trt_logger = tensorrt.Logger(tensorrt.Logger.WARNING)
        runtime = tensorrt.Runtime(self.trt_logger)
        self.specs = {n: NetworkSpec.from_dict(e["spec"]) for n, e in self.manifest["engines"].items()}
        check_step_rows(self.specs)
        self.ref_size = reference_size(self.specs)  # the reference crop side the engines take
        self.engines = {}
        for name, entry in self.manifest["engines"].items():
            check_engine(self.root / entry["file"], version, gpu)  # stale engines refused
            self.engines[name] = Engine(runtime, self.root / entry["file"], self.specs[name])
        # one activation memory for every engine (they run one after another on one stream), grown to
        # the largest profile in use (`reserve`): a small bucket's step never pays for the largest
        self.memory = DeviceBuffer(max(e.memory_for(0) for e in self.engines.values()))
        self.stream = Stream()
        self.tokenizer = ClipTokenizer(self.root / self.manifest["vocab"])
        self.precision = str(self.manifest.get("precision", "fp16"))
        self.kv_cache = ReferenceKVCache(kv_cache_bytes)
        self.max_shapes = max_shapes
        self.states: OrderedDict[LoopDims, BatchState] = OrderedDict()
        self.graphs = StepGraphs(TrtCapture(self.stream), max_shapes)
        self.copied = Event()  # recorded after a step's copies from its staging buffers

    # ---------------------------------------------------------------- batched steps

    def state(self, dims: LoopDims) -> BatchState:
        """The static buffers of a padded batch, checked against the engines' profiles once."""
        st = self.states.pop(dims, None)
        if st is None:
            check_kv_wiring(self.specs["reference_net"], self.specs["unet"], dims)
            for name in ("unet", "step"):
                shapes = io_shapes(self.specs[name], dims)
                self.specs[name].check_shapes({t.name: shapes[t.name] for t in self.specs[name].inputs})
            st = BatchState(self, dims)
        self.states[dims] = st
        while len(self.states) > self.max_shapes:
            old, _ = self.states.popitem(last=False)
            self.graphs.discard(old)  # they read its buffers
            for engine in self.engines.values():
                engine.contexts.pop(old, None)
        return st

    def reference_groups(self, num_refs: int) -> int:
        """Timesteps per prefetch ReferenceNet call (`axes.groups_per_call`)."""
        return groups_per_call(self.specs["reference_net"], num_refs, self.prefetch_images)

    def reference_kv(self, ms: list[Member]) -> list[dict[str, DeviceTensor]]:
        """One ReferenceNet call for the groups of `ms` (one member each): each group's K/V."""
        first = ms[0].ctx.identity.latents
        r = first.shape[0]
        lat = DeviceTensor.empty((len(ms) * r, *first.shape[1:]), first.dtype)  # [G*R, 4, hr, wr]
        ctx = DeviceTensor.empty((len(ms), *ms[0].ctx.texts.shape[1:]), "float32")  # [G, 77, C]
        for g, m in enumerate(ms):
            src = m.ctx.identity.latents
            copy_device(_slot(lat, g * r), src.ptr, src.nbytes, self.stream)
            copy_device(_slot(ctx, g), _slot(m.ctx.texts, 1), ctx.nbytes // len(ms), self.stream)
        t = np.asarray([m.step.t for m in ms], np.float32)
        dims = LoopDims(1, 8, 8, r, groups=len(ms))
        fresh = self._run_host("reference_net", dims, ref_latents=lat, timestep=t, context=ctx)
        if len(ms) == 1:
            return [fresh]  # [1, R*L, C] already
        per_group = [
            {n: DeviceTensor.empty((1, *v.shape[1:]), v.dtype) for n, v in fresh.items()} for _ in ms
        ]
        for g, kv in enumerate(per_group):
            for name, value in kv.items():
                copy_device(value.ptr, _slot(fresh[name], g), value.nbytes, self.stream)
        return per_group

    def _load(self, st: BatchState, members: Sequence[Member], padded: PaddedPlan) -> None:
        """Copy a batch's values into the static buffers: device copies, and host values through the
        pinned staging buffers once the previous step's copies from them have run (no host sync)."""
        b, plan = st.buf, padded.plan
        self.copied.synchronize()  # the stream is in order: every earlier copy has run too
        for i, (m, first) in enumerate(zip(members, plan.offsets)):
            if isinstance(m.x, DeviceTensor):
                copy_device(_slot(b["x"], first), m.x.ptr, m.x.nbytes, self.stream)
            else:  # noise from the host: the first step
                staged = st.host["x"][first : first + m.samples]
                staged[...] = m.x
                copy_to_device(_slot(b["x"], first), staged, self.stream)
            copy_device(_slot(b["masks"], i), m.ctx.mask.ptr, m.ctx.mask.nbytes, self.stream)
            copy_device(_slot(b["texts"], 2 * i), m.ctx.texts.ptr, m.ctx.texts.nbytes, self.stream)
        for g, kv in enumerate(cached_kv(members, plan, self.kv_cache, self.reference_kv)):  # [1, R*L, C]
            for name in st.kv_names:
                copy_device(_slot(b[name], g), kv[name].ptr, kv[name].nbytes, self.stream)
        for name, values in padded.inputs().items():
            if name in st.host:  # the shared-row arrays of the engine's cuts only
                st.host[name][...] = values
                copy_to_device(b[name].ptr, st.host[name], self.stream)
        self.copied.record(self.stream)

    def step_body(self, st: BatchState, launch: bool) -> None:
        """One batched step on the static buffers: binding its contexts (before a capture), or launching
        them (what a CUDA graph records)."""
        for name in ("unet", "step"):
            engine, spec = self.engines[name], self.specs[name]
            if launch:
                engine.launch(engine.contexts[st.dims], self.stream)
            else:
                ptrs = {t.name: st.buf[t.name].ptr for t in (*spec.inputs, *spec.outputs)}
                self.bind(name, st.dims, io_shapes(spec, st.dims), ptrs)

    def step(self, members: Sequence[Member]) -> list[DeviceTensor]:
        """One batched step: every member's next x, copied from the step's output into its own buffer."""
        plan = plan_batch(members)
        padded = pad_plan(plan, len(members))
        _, _, h, w = members[0].x.shape
        dims = LoopDims.of(padded.key, h, w, members[0].ctx.identity.num_refs)
        st = self.state(dims)
        self._load(st, members, padded)
        self.graphs.run(
            dims, lambda: self.step_body(st, launch=True), lambda: self.step_body(st, launch=False)
        )
        outs = []
        for m, first in zip(members, plan.offsets):
            out = m.ctx.scratch.get("x")
            if out is None or out.shape != tuple(m.x.shape):
                out = m.ctx.scratch["x"] = DeviceTensor.empty(tuple(m.x.shape), "float32")
            copy_device(out.ptr, _slot(st.buf["x_next"], first), out.nbytes, self.stream)
            outs.append(out)
        return outs

    def bind(self, name: str, key: Any, shapes: dict[str, tuple[int, ...]], ptrs: dict[str, int]) -> Any:
        """The context of `key` bound to these shapes and addresses, with enough activation memory."""
        engine = self.engines[name]
        self.reserve(engine.memory_for(engine.profile_for(shapes)))
        ctx = engine.context(key, self.memory)
        engine.bind(ctx, shapes, ptrs, self.stream)
        return ctx

    def reserve(self, nbytes: int) -> None:
        """Grow the shared activation memory to `nbytes`: every context moves to the new block and the
        captured graphs, which recorded the old one, are dropped (their keys warm up again)."""
        if nbytes <= self.memory.nbytes:
            return
        self.stream.synchronize()
        self.memory = DeviceBuffer(nbytes)
        for key in list(self.states):
            self.graphs.discard(key)
        for engine in self.engines.values():
            for ctx in engine.contexts.values():
                ctx.set_device_memory(self.memory.ptr, self.memory.nbytes)

    def run(self, name: str, key: Any, shapes: dict[str, tuple[int, ...]], ptrs: dict[str, int]) -> None:
        self.engines[name].launch(self.bind(name, key, shapes, ptrs), self.stream)

    # ---------------------------------------------------------------- the other networks

    def _run_host(
        self, name: str, dims: LoopDims, **inputs: np.ndarray | DeviceTensor
    ) -> dict[str, DeviceTensor]:
        """One eager engine call: host arrays are copied in, device tensors bound as they are."""
        spec = self.specs[name]
        shapes = io_shapes(spec, dims)
        shapes.update({k: tuple(v.shape) for k, v in inputs.items()})
        spec.check_shapes({t.name: shapes[t.name] for t in spec.inputs})
        dev = {
            t.name: v if isinstance(v := inputs[t.name], DeviceTensor) else self.upload(v, t.dtype)
            for t in spec.inputs
        }
        outs = {t.name: DeviceTensor.empty(shapes[t.name], t.dtype) for t in spec.outputs}
        self.run(name, EAGER, shapes, {k: v.ptr for k, v in {**dev, **outs}.items()})
        self.stream.synchronize()
        return outs

    def to_host(self, t: DeviceTensor) -> np.ndarray:
        out = np.empty(t.shape, t.dtype)
        copy_to_host(out, t.ptr, self.stream)
        self.stream.synchronize()
        return out.astype(np.float32) if out.dtype == np.float16 else out

    def from_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.float32)

    def latents_from_host(self, latents: np.ndarray) -> DeviceTensor:
        """Stored reference latents [R, 4, hr, wr] onto the device (the VAE encoder's dtype)."""
        return self.upload(latents, next(t.dtype for t in self.specs["vae_encoder"].outputs))

    def upload(self, values: np.ndarray, dtype: str) -> DeviceTensor:
        """A host array in a new device tensor (a pageable source is staged at the call: it may go)."""
        out = DeviceTensor.empty(tuple(values.shape), dtype)
        copy_to_device(out.ptr, np.ascontiguousarray(values, dtype), self.stream)
        return out

    def encode_text(self, ids: np.ndarray) -> DeviceTensor:
        """Token ids [P, 77] -> hidden states [P, 77, C] on the device."""
        dims = LoopDims(1, 8, 8, 1, prompts=len(ids))
        return self._run_host("text_encoder", dims, input_ids=ids.astype(np.int32))["hidden"]

    def encode_references(self, images: np.ndarray) -> DeviceTensor:
        """Crops [R, 3, S, S] -> scaled latents [R, 4, S/8, S/8], kept on the device."""
        return self._run_host("vae_encoder", LoopDims(1, 8, 8, len(images)), images=images)["latents"]

    def mask_from_host(self, mask: np.ndarray) -> DeviceTensor:
        """A face mask [h, w] as the steps read it: [1, 1, h, w] float32, on the device once."""
        return self.upload(mask[None, None], "float32")

    def decode(self, z: np.ndarray | DeviceTensor) -> np.ndarray:
        """Latents [N, 4, h, w] (host or device) -> uint8 images [N, 8h, 8w, 3]."""
        n, _, h, w = z.shape
        return self.to_host(self._run_host("vae_decoder", LoopDims(n, h, w, 1), latents=z)["images"])


def check_step_rows(specs: dict[str, NetworkSpec]) -> None:
    """The update engine must take the coefficient row this runtime writes (`STEP_COEFFICIENTS`)."""
    coef = next(t for t in specs["step"].inputs if t.name == "coef")
    if tuple(coef.shape[1:]) != (len(STEP_COEFFICIENTS),):
        raise WeightsError(
            f"step takes {list(coef.shape)} step coefficients, this runtime writes "
            f"[samples, {len(STEP_COEFFICIENTS)}] ({', '.join(STEP_COEFFICIENTS)}): the engines come from "
            "another version's export; export and build again with this one"
        )

"""The TensorRT backend: engines on one stream, shared activation memory, CUDA-graphed batched steps.

A step is one body over static device buffers of a padded batch (`runtime.batch.pad_plan`): the
UNet engine gathers every row from the requests' latents, masks and prompt embeddings (the plan's
index arrays), attends each reference row to its group's K/V, and the update engine (`step`, the
exported `runtime.guidance.batched_update`) moves every sample to its next step; x_next is copied
back into x. Before the body runs, the batch's values (latents, masks, texts, index arrays, per-row
timesteps and λ, per-sample coefficients, each group's K/V) are copied into the static buffers,
so one captured graph per (bucket, image size, references) serves every step of every batch
(`graphs.StepGraphs`, one execution context per captured graph). No torch.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts.axes import LoopDims, io_shapes
from ..artifacts.engines import GpuIdentity, check_engine, tensorrt_version
from ..artifacts.exports import reference_size
from ..artifacts.spec import NetworkSpec
from ..errors import WeightsError
from ..sampling.batch import SHARED_ROWS, BatchPlan, Member, PaddedPlan, RequestContext, pad_plan, plan_batch
from ..sampling.guidance import STEP_COEFFICIENTS
from ..sampling.identities import DEFAULT_KV_CACHE_BYTES, Identity, ReferenceKVCache
from ..sampling.sampler import GuidanceParams, StepPlan
from ..sampling.tokenizer import ClipTokenizer
from .buffers import check_kv_wiring
from .cuda import DeviceBuffer, Stream, copy_device, copy_to_device, copy_to_host, device_info
from .graphs import StepGraphs
from .trt_engine import EAGER, DeviceTensor, Engine, TrtCapture

log = logging.getLogger(__name__)

INDEX_INPUTS = ("sample_rows", "member_rows", "text_rows", "ref_group", "guide")


class BatchState:
    """Static buffers of one padded batch: every input and output of the UNet and update engines."""

    def __init__(self, backend: TrtBackend, dims: LoopDims) -> None:
        self.dims = dims
        self.buf: dict[str, DeviceTensor] = {}
        for name in ("unet", "step"):
            spec, shapes = backend.specs[name], io_shapes(backend.specs[name], dims)
            for t in (*spec.inputs, *spec.outputs):
                if t.name not in self.buf:  # x and eps are shared by the two engines
                    self.buf[t.name] = DeviceTensor.empty(shapes[t.name], t.dtype)
        self.kv_names = [t.name for t in backend.specs["reference_net"].outputs]


def _slot(t: DeviceTensor, index: int) -> int:
    """Address of row `index` of a device tensor (first axis)."""
    return t.ptr + index * (t.nbytes // t.shape[0])


class BatchDenoiser:
    """One request's `denoise(x, step) -> x_next`: the batch of one, through `backend.step`."""

    def __init__(self, backend: Any, ctx: RequestContext) -> None:
        self.backend, self.ctx = backend, ctx

    def __call__(self, x: Any, step: StepPlan) -> Any:
        return self.backend.step([Member(self.ctx, x, step)])[0]


class TrtBackend:
    """FlashFace on TensorRT engines from `flashface-trt build` (fp16, one stream, CUDA graphs)."""

    name = "tensorrt"

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
        # one activation memory for every engine: they run one after another on one stream
        self.memory = DeviceBuffer(max(e.memory_size for e in self.engines.values()))
        self.stream = Stream()
        self._tokenizer = ClipTokenizer(self.root / self.manifest["vocab"])
        self.kv_cache = ReferenceKVCache(kv_cache_bytes)
        self.max_shapes = max_shapes
        self.states: OrderedDict[LoopDims, BatchState] = OrderedDict()
        self.graphs = StepGraphs(TrtCapture(self.stream), max_shapes)

    @property
    def tokenizer(self) -> ClipTokenizer:
        return self._tokenizer

    @property
    def precision(self) -> str:
        return str(self.manifest.get("precision", "fp16"))

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
                for ctx_key in [c for c in engine.contexts if c != EAGER and c[0] == old]:
                    del engine.contexts[ctx_key]
        return st

    def group_kv(self, members: Sequence[Member], plan: BatchPlan) -> list[dict[str, DeviceTensor]]:
        """Every group's K/V ({name: [1, R*L, C]}): cached, or one ReferenceNet call for the rest."""
        by_key = {m.kv_key: m for m in members}
        found = {key: self.kv_cache.get(key) for key in plan.groups}
        missing = [key for key in plan.groups if found[key] is None]
        if missing:
            ms = [by_key[key] for key in missing]
            first = ms[0].ctx.identity.latents
            r = first.shape[0]
            lat = DeviceTensor.empty((len(ms) * r, *first.shape[1:]), first.dtype)
            ctx = DeviceTensor.empty((len(ms), *ms[0].ctx.texts.shape[1:]), "float32")
            for g, m in enumerate(ms):
                copy_device(
                    _slot(lat, g * r), m.ctx.identity.latents.ptr, m.ctx.identity.latents.nbytes, self.stream
                )
                copy_device(_slot(ctx, g), _slot(m.ctx.texts, 1), ctx.nbytes // len(ms), self.stream)
            t = np.asarray([m.step.t for m in ms], np.float32)
            dims = LoopDims(1, 8, 8, r, groups=len(ms))
            fresh = self._run_host("reference_net", dims, ref_latents=lat, timestep=t, context=ctx)
            for g, key in enumerate(missing):
                kv = {}
                for name, value in fresh.items():
                    kv[name] = DeviceTensor.empty((1, *value.shape[1:]), value.dtype)
                    copy_device(kv[name].ptr, _slot(value, g), kv[name].nbytes, self.stream)
                self.stream.synchronize()
                self.kv_cache.put(key, kv)
                found[key] = kv
        return [found[key] for key in plan.groups]  # type: ignore[misc]

    def _load(self, st: BatchState, members: Sequence[Member], padded: PaddedPlan) -> None:
        """Copy a batch's values into the static buffers (device copies; host index arrays)."""
        b, plan = st.buf, padded.plan
        for i, (m, first) in enumerate(zip(members, plan.offsets)):
            if isinstance(m.x, DeviceTensor):
                copy_device(_slot(b["x"], first), m.x.ptr, m.x.nbytes, self.stream)
            else:
                copy_to_device(_slot(b["x"], first), np.ascontiguousarray(m.x, np.float32), self.stream)
            copy_device(_slot(b["masks"], i), m.ctx.mask.ptr, m.ctx.mask.nbytes, self.stream)
            copy_device(_slot(b["texts"], 2 * i), m.ctx.texts.ptr, m.ctx.texts.nbytes, self.stream)
        for g, kv in enumerate(self.group_kv(members, plan)):
            for name in st.kv_names:
                copy_device(_slot(b[name], g), kv[name].ptr, kv[name].nbytes, self.stream)
        host = {
            "sample_rows": padded.sample_rows,
            "member_rows": padded.member_rows,
            "text_rows": padded.text_rows,
            "timestep": padded.t,
            "ref_scale": padded.scale,
            "ref_group": padded.group,
            "guide": padded.guide,
            "coef": padded.coef,
            **{n: getattr(padded, n) for n in SHARED_ROWS if n in b},
        }
        for name, values in host.items():
            copy_to_device(b[name].ptr, np.ascontiguousarray(values, b[name].dtype), self.stream)
        self.stream.synchronize()  # the host arrays above (and the noise) must outlive their copies

    def step_body(self, st: BatchState) -> None:
        """One batched step on the static buffers: what a CUDA graph records."""
        key = (st.dims, None)
        for name in ("unet", "step"):
            spec = self.specs[name]
            self.run(
                name,
                key,
                io_shapes(spec, st.dims),
                {t.name: st.buf[t.name].ptr for t in (*spec.inputs, *spec.outputs)},
            )
        copy_device(st.buf["x"].ptr, st.buf["x_next"].ptr, st.buf["x"].nbytes, self.stream)

    def step(self, members: Sequence[Member]) -> list[DeviceTensor]:
        """One batched step: every member's next x, in a buffer of its request."""
        plan = plan_batch(members)
        padded = pad_plan(plan, len(members))
        _, _, h, w = members[0].x.shape
        dims = LoopDims.of(padded.key, h, w, members[0].ctx.identity.num_refs)
        st = self.state(dims)
        self._load(st, members, padded)
        self.graphs.run((dims, None), lambda: self.step_body(st))
        outs = []
        for m, first in zip(members, plan.offsets):
            out = m.ctx.scratch.get("x")
            if out is None or out.shape != tuple(m.x.shape):
                out = m.ctx.scratch["x"] = DeviceTensor.empty(tuple(m.x.shape), "float32")
            copy_device(out.ptr, _slot(st.buf["x"], first), out.nbytes, self.stream)
            outs.append(out)
        return outs

    def run(self, name: str, key: Any, shapes: dict[str, tuple[int, ...]], ptrs: dict[str, int]) -> None:
        engine = self.engines[name]
        engine.enqueue(engine.context(key, self.memory), shapes, ptrs, self.stream)

    # ---------------------------------------------------------------- the other networks

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
        return out.astype(np.float32) if out.dtype == np.float16 else out

    def from_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.float32)

    def latents_from_host(self, latents: np.ndarray) -> DeviceTensor:
        """Stored reference latents [R, 4, hr, wr] onto the device (the VAE encoder's dtype)."""
        dtype = next(t.dtype for t in self.specs["vae_encoder"].outputs)
        out = DeviceTensor.empty(tuple(latents.shape), dtype)
        copy_to_device(out.ptr, np.ascontiguousarray(latents, dtype), self.stream)
        self.stream.synchronize()
        return out

    def encode_text(self, ids: np.ndarray) -> DeviceTensor:
        """Token ids [P, 77] -> hidden states [P, 77, C] on the device."""
        dims = LoopDims(1, 8, 8, 1, prompts=len(ids))
        return self._run_host("text_encoder", dims, input_ids=ids.astype(np.int32))["hidden"]

    def encode_references(self, images: np.ndarray) -> DeviceTensor:
        """Crops [R, 3, S, S] -> scaled latents [R, 4, S/8, S/8], kept on the device."""
        return self._run_host("vae_encoder", LoopDims(1, 8, 8, len(images)), images=images)["latents"]

    def context(
        self,
        texts: DeviceTensor,
        identity: Identity,
        mask: np.ndarray,
        guidance: GuidanceParams,
        uncond_key: str,
    ) -> RequestContext:
        """What a request brings to every batched step; its mask goes to the device once."""
        m = DeviceTensor.empty((1, 1, *mask.shape), "float32")
        copy_to_device(m.ptr, np.ascontiguousarray(mask[None, None], np.float32), self.stream)
        self.stream.synchronize()
        return RequestContext(texts, identity, m, guidance, uncond_key)

    def denoiser(
        self,
        texts: DeviceTensor,
        identity: Identity,
        mask: np.ndarray,
        guidance: GuidanceParams,
        steps: Sequence[StepPlan] = (),
        uncond_key: str = "",
    ) -> BatchDenoiser:
        return BatchDenoiser(self, self.context(texts, identity, mask, guidance, uncond_key))

    def decode(self, z: np.ndarray | DeviceTensor) -> np.ndarray:
        """Latents [N, 4, h, w] (host or device) -> uint8 images [N, 8h, 8w, 3]."""
        n, _, h, w = z.shape
        images = self._run_host("vae_decoder", LoopDims(n, h, w, 1), latents=z)["images"]
        out = np.empty(images.shape, np.uint8)
        copy_to_host(out, images.ptr, self.stream)
        self.stream.synchronize()
        return out


def check_step_rows(specs: dict[str, NetworkSpec]) -> None:
    """The update engine must take the coefficient row this runtime writes (`STEP_COEFFICIENTS`)."""
    coef = next(t for t in specs["step"].inputs if t.name == "coef")
    if tuple(coef.shape[1:]) != (len(STEP_COEFFICIENTS),):
        raise WeightsError(
            f"step takes {list(coef.shape)} step coefficients, this runtime writes "
            f"[samples, {len(STEP_COEFFICIENTS)}] ({', '.join(STEP_COEFFICIENTS)}): the engines come from "
            "another version's export; export and build again with this one"
        )

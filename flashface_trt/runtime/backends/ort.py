"""The ONNX Runtime backend: FlashFace from an exported directory, without torch.

It implements the same small backend interface as the PyTorch backend (tokenizer, text, reference
encoding, the batched `step`, decode), so the pipeline and the sampler loop never ask which one they have.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts.axes import groups_per_call
from ..artifacts.exports import UNET_GRAPHS, export_specs, read_export, reference_size
from ..artifacts.spec import NetworkSpec
from ..errors import FlashFaceError, InputError, WeightsError
from ..faces.ort_detector import OrtDetector
from ..sampling.batch import BatchPlan, Member, cached_kv, plan_batch
from ..sampling.guidance import batched_update
from ..sampling.identities import DEFAULT_KV_CACHE_BYTES, DEFAULT_PREFETCH_IMAGES, ReferenceKVCache
from ..sampling.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


@dataclass(frozen=True)
class OrtSettings:
    """ONNX Runtime options.

    provider: 'cpu', 'cuda' (I/O binding: one group's reference K/V stay on the device between the
    ReferenceNet and UNet sessions, unverified: `OrtBackend.reference_kv`) or 'tensorrt' (ONNX Runtime's
    TensorRT provider, fp16, engine cache and profiles from the export's specs); threads: intra-op
    threads (0 = ONNX Runtime's choice); kv_cache_bytes: budget of the reference K/V cache;
    prefetch_images: reference images per ReferenceNet call on admission (`prepare.prefetch_kv`; 0: off).
    """

    provider: str = "cpu"
    threads: int = 0
    kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES
    prefetch_images: int = DEFAULT_PREFETCH_IMAGES

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise InputError(f"ONNX Runtime provider {self.provider!r} is not one of {sorted(PROVIDERS)}")


def trt_provider_options(spec: NetworkSpec, cache_dir: Path, fp16: bool = True) -> dict[str, Any]:
    """ONNX Runtime TensorRT provider options: fp16, engine cache and the spec's min/opt/max profile."""

    def shapes(which: str) -> str:
        return ",".join(f"{k}:{'x'.join(map(str, v))}" for k, v in spec.profile(which).items())

    return {
        "trt_fp16_enable": fp16,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_profile_min_shapes": shapes("min"),
        "trt_profile_opt_shapes": shapes("opt"),
        "trt_profile_max_shapes": shapes("max"),
    }


class Session:
    """One graph: an ONNX Runtime session plus its spec; `run(**feeds)` returns outputs by name."""

    def __init__(
        self, path: Path, spec: NetworkSpec, settings: OrtSettings, keep_on_device: tuple[str, ...] = ()
    ) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        wanted = PROVIDERS[settings.provider]
        if wanted[0] not in available:
            raise FlashFaceError(f"ONNX Runtime here has no {wanted[0]} (available: {available})")
        providers: list[Any] = [p for p in wanted if p in available]
        if settings.provider == "tensorrt":
            providers[0] = (providers[0], trt_provider_options(spec, path.parent / "trt_cache"))
        opts = ort.SessionOptions()
        if settings.threads:
            opts.intra_op_num_threads = settings.threads
        self.spec = spec
        self.device = "cpu" if settings.provider == "cpu" else "cuda"
        self.keep_on_device = keep_on_device  # outputs returned as device OrtValues (I/O binding)
        self.session = ort.InferenceSession(str(path), opts, providers=providers)

    def run(self, **feeds: Any) -> dict[str, Any]:
        """Host arrays (or device OrtValues on a GPU provider) in; host arrays out but `keep_on_device`."""
        host = {k: v for k, v in feeds.items() if isinstance(v, np.ndarray)}
        if len(host) == len(feeds):  # device OrtValues were produced by a checked graph
            self.spec.check_inputs(feeds, ranges=False)
        arrays = {
            t.name: np.ascontiguousarray(feeds[t.name], dtype=t.dtype) if t.name in host else feeds[t.name]
            for t in self.spec.inputs
        }
        if self.device == "cpu":
            outs = self.session.run(self.spec.output_names, arrays)
            return dict(zip(self.spec.output_names, outs))
        binding = self.session.io_binding()  # GPU providers: bind, keep chosen outputs on the device
        for name, value in arrays.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        for name in self.spec.output_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {
            n: v if n in self.keep_on_device else v.numpy() for n, v in zip(self.spec.output_names, values)
        }


class OrtBackend:
    """FlashFace on ONNX Runtime from `flashface-trt export`'s directory (no torch)."""

    name = "onnxruntime"

    def __init__(self, export_dir: str | Path, settings: OrtSettings | None = None) -> None:
        self.root = Path(export_dir)
        self.settings = settings or OrtSettings()
        self.manifest = read_export(self.root)
        nets = self.manifest["networks"]
        specs = export_specs(self.manifest)
        kv_names = tuple(specs["reference_net"].output_names)
        self.ref_size = reference_size(specs)  # the reference crop side the graphs take
        self.sessions = {
            name: Session(self.root / nets[name]["file"], specs[name], self.settings, kv_names)
            for name in UNET_GRAPHS
        }
        self.tokenizer = ClipTokenizer(self.root / self.manifest["vocab"])
        self.precision = str(self.manifest["precision"])
        self.kv_cache = ReferenceKVCache(self.settings.kv_cache_bytes)
        log.info("ONNX Runtime backend: %s (%s)", self.root, self.manifest["precision"])

    def detector(self) -> OrtDetector:
        """The exported face detector, if the export has one."""
        entry = self.manifest["networks"].get("detector")
        if entry is None:
            raise WeightsError(
                f"{str(self.root)!r} has no detector graph; export with the detector or pass --cropped"
            )
        return OrtDetector(self.root / entry["file"], PROVIDERS[self.settings.provider])

    def from_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.float32)

    def to_host(self, x: np.ndarray) -> np.ndarray:
        """A backend array (latents, images) as a float32 NumPy array."""
        return np.asarray(x, dtype=np.float32)

    latents_from_host = from_numpy  # stored reference latents [R, 4, hr, wr] as the backend keeps them

    def encode_text(self, ids: np.ndarray) -> np.ndarray:
        """Token ids [P, 77] -> hidden states [P, 77, C]."""
        return self.sessions["text_encoder"].run(input_ids=ids.astype(np.int32))["hidden"]

    def encode_references(self, images: np.ndarray) -> np.ndarray:
        """Crops [R, 3, S, S] in [-1, 1] -> scaled latents [R, 4, S/8, S/8]."""
        return self.sessions["vae_encoder"].run(images=images)["latents"]

    def mask_from_host(self, mask: np.ndarray) -> np.ndarray:
        """A face mask [h, w] as the steps read it: [1, 1, h, w] float32."""
        return mask.astype(np.float32)[None, None]

    def reference_kv(self, members: list[Member]) -> list[dict[str, Any]]:
        """One ReferenceNet call for one member per K/V group: each group's K/V [1, R*L, C] by name (a GPU
        provider keeps one group's on the device by I/O binding, unverified; several split on the host)."""
        fresh = self.sessions["reference_net"].run(
            ref_latents=np.concatenate([m.ctx.identity.latents for m in members]),
            timestep=np.asarray([m.step.t for m in members], np.float32),
            context=np.concatenate([m.ctx.texts[1:2] for m in members]),
        )
        if len(members) == 1:
            return [fresh]
        return [{name: _host(v)[g : g + 1].copy() for name, v in fresh.items()} for g in range(len(members))]

    def reference_groups(self, num_refs: int) -> int:
        """Timesteps per prefetch ReferenceNet call (`axes.groups_per_call`); one on a GPU provider, whose
        outputs stay on the device only whole (ONNX Runtime's Python API cannot split them there)."""
        if self.settings.provider != "cpu":
            return min(1, self.settings.prefetch_images)
        return groups_per_call(self.sessions["reference_net"].spec, num_refs, self.settings.prefetch_images)

    def group_kv(self, members: Sequence[Member], plan: BatchPlan) -> dict[str, Any]:
        """Every group's reference K/V stacked per tensor [G, R*L, C]: cached, or computed now."""
        groups = cached_kv(members, plan, self.kv_cache, self.reference_kv)
        if len(groups) == 1:
            return groups[0]
        return {name: np.concatenate([_host(g[name]) for g in groups]) for name in groups[0]}

    def batch_eps(self, members: Sequence[Member], plan: BatchPlan) -> np.ndarray:
        """Raw model output of every row of a batched step [B, 4, h, w]."""
        unet = self.sessions["unet"]
        out = unet.run(
            x=np.concatenate([m.x for m in members]),
            masks=np.concatenate([m.ctx.mask for m in members]),
            texts=np.concatenate([m.ctx.texts for m in members]),
            **{name: v for name, v in plan.inputs().items() if name in unet.spec.input_names},
            **self.group_kv(members, plan),
        )
        return out["eps"]

    def step(self, members: Sequence[Member]) -> list[np.ndarray]:
        """One batched step: every member's next x (the UNet graph, then the batched update)."""
        plan = plan_batch(members)
        eps = self.batch_eps(members, plan)
        x = np.concatenate([m.x for m in members]).astype(np.float32)
        return plan.split(batched_update(x, eps, plan.guide, plan.coef))

    def decode(self, z: np.ndarray) -> np.ndarray:
        """Scaled latents [N, 4, h, w] -> uint8 images [N, 8h, 8w, 3]."""
        return self.sessions["vae_decoder"].run(latents=z)["images"]


def _host(value: Any) -> np.ndarray:
    """A NumPy array of a host array or an ONNX Runtime device value."""
    return value if isinstance(value, np.ndarray) else value.numpy()

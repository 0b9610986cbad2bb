"""The torch and engine parts of `benchmarks.gpu_check`, each one function of a `Sizes` returning its record.

Each runs at the real sizes on a GPU (W768 fp16) or, with `--dry-run`, at tiny sizes on the CPU,
reusing the benchmarks that measure the same thing (`suite`, `batching`, `official`).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

TOP_KERNELS = 15
KINDS = {  # kernel-name fragments of each share in the profile table (first match wins)
    "attention": ("attention", "flash", "fmha", "sdpa", "softmax", "bmm"),
    "groupnorm": ("group_norm", "groupnorm", "native_layer_norm", "layer_norm"),
    "conv": ("conv", "cudnn", "winograd", "implicit"),
    "gemm": ("gemm", "addmm", "matmul", "aten::mm", "cutlass", "xmma", "sm90"),
}


@dataclass(frozen=True)
class Sizes:
    """What the parts run: the model preset, device, precision, image side, steps, reference
    crops, timing repeats, the PyTorch presets compared, and the official checkout (None: not given)."""

    dry: bool
    preset: str
    device: str
    precision: str
    size: int
    steps: int
    ref_size: int
    repeats: int
    variants: tuple[str, ...]
    official: Path | None
    work: Path

    @classmethod
    def make(cls, dry: bool, official: Path | None, work: Path) -> Sizes:
        if dry:
            return cls(
                True,
                "tiny",
                "cpu",
                "fp16",
                64,
                2,
                64,
                1,
                ("eager", "static", "channels-last"),
                official,
                work,
            )
        variants = ("eager", "static", "channels-last")  # `compiled` is its own part: compiling takes minutes
        return cls(False, "sd15-random", "cuda", "fp16", 768, 20, 224, 2, variants, official, work)

    def workload_args(self) -> list[str]:
        return [
            *("--preset", self.preset, "--device", self.device, "--precision", self.precision),
            *("--height", str(self.size), "--width", str(self.size), "--steps", str(self.steps)),
            *("--ref-size", str(self.ref_size)),
        ]


def needs_cuda(s: Sizes) -> dict[str, Any] | None:
    """A `skipped` record where a real (not dry) part finds no CUDA device for torch."""
    import torch

    if not s.dry and not torch.cuda.is_available():
        return {"status": "skipped", "reason": "torch sees no CUDA device (run with --dry-run on a CPU)"}
    return None


def w768(s: Sizes) -> dict[str, Any]:
    """The official implementation (when a checkout is given) against ours in each PyTorch preset:
    loop and end to end, fresh and cached identity (`benchmarks.suite`, whose record this keeps)."""
    from . import suite

    if (skip := needs_cuda(s)) is not None:
        return skip
    path = s.work / "w768.json"
    args = [*s.workload_args(), "--repeats", str(s.repeats), "--variants", ",".join(s.variants)]
    args += ["--json", str(path)] + (["--official-src", str(s.official)] if s.official else [])
    if suite.main(args) != 0:
        return {"status": "failed", "reason": "benchmarks.suite refused its numerics (see its stderr)"}
    record = json.loads(path.read_text())
    out = {"status": "ok", "official": "timed" if s.official else "no checkout given (--official PATH)"}
    out["variants_elsewhere"] = {"compiled": "the compiled part (compilation may outlast this part's limit)"}
    keys = ("device", "baseline", "speedup_loop", "speedup_loop_cached_identity", "speedup_end_to_end")
    out.update({k: record[k] for k in keys})
    out["ms_per_step"] = {
        name: 1e3 * v["loop_seconds"] / s.steps for name, v in record["variants"].items()
    } | {
        name: 1e3 * (b.get("reference_net", 0.0) + b["loop"]) / s.steps
        for name, b in record["seconds"].items()
        if name.startswith("official")
    }
    return out | {"record": record}


def compiled(s: Sizes) -> dict[str, Any]:
    """The compiled preset at W768 (torch.compile of the static step; compilation and capture happen in
    its untimed check run), apart from `w768` so that a slow compilation costs only this part."""
    from . import suite

    if s.dry:
        return {"status": "skipped", "reason": "torch.compile on the CPU takes minutes; the GPU run times it"}
    if (skip := needs_cuda(s)) is not None:
        return skip
    path = s.work / "compiled.json"
    args = [*s.workload_args(), "--repeats", "1", "--variants", "compiled", "--json", str(path)]
    if suite.main(args) != 0:
        return {"status": "failed", "reason": "benchmarks.suite refused its numerics (see its stderr)"}
    v = json.loads(path.read_text())["variants"]["compiled"]
    keys = ("seconds", "cached_identity", "loop_percent_of_peak", "peak_memory_bytes")
    return {"status": "ok", "ms_per_step": 1e3 * v["loop_seconds"] / s.steps, **{k: v[k] for k in keys}}


def numerics(s: Sizes) -> dict[str, Any]:
    """fp16 vs fp32 (eps, image) and ours vs the official pattern from the W768 run, and whether the
    official UNet loads our weights (the same-weights comparison needs that)."""
    path = s.work / "w768.json"
    if not path.is_file():
        return {"status": "failed", "reason": "the w768 part wrote no record to read its numerics from"}
    out: dict[str, Any] = {"status": "ok", **json.loads(path.read_text())["numerics"]}
    if s.official is None:
        out["official_same_weights"] = "no checkout given"
        return out
    import torch

    from flashface_trt.models.loading import tiny_models

    from .bench_torch import sd15_random
    from .official import import_official, official_unet

    models = tiny_models("cpu") if s.dry else sd15_random("cpu", torch.float32)
    theirs = official_unet(import_official(s.official)[0], models.config, "cpu")
    mine, shapes = models.unet.state_dict(), {k: v.shape for k, v in theirs.state_dict().items()}
    fits = {k: v for k, v in mine.items() if k in shapes and shapes[k] == v.shape}
    result = theirs.load_state_dict(fits, strict=False)
    out["official_same_weights"] = {
        "loaded": len(fits),
        "shape_mismatch": sorted(k for k in mine if k in shapes and k not in fits),
        "missing_keys": len(result.missing_keys),
        "unexpected_keys": len(set(mine) - set(shapes)),
        "examples": [*result.missing_keys[:3], *sorted(set(mine) - set(shapes))[:3]],
        "note": "key match only; eps at the same weights is compared by the oracle tests (CPU fixtures)",
    }
    return out


def peak(s: Sizes) -> dict[str, Any]:
    """The measured fp16 matmul rate and each preset's loop as a share of it (loop FLOPs counted)."""
    import torch

    from .workload import matmul_peak_tflops

    if (skip := needs_cuda(s)) is not None:
        return skip
    dtype = torch.float16 if s.precision == "fp16" else torch.float32
    size = 256 if s.dry else 8192
    out: dict[str, Any] = {"status": "ok", "matmul": f"{size}^3 {s.precision}"}
    out["matmul_peak_tflops_per_s"] = matmul_peak_tflops(torch.device(s.device), dtype, size)
    path = s.work / "w768.json"
    if path.is_file():
        variants = json.loads(path.read_text())["variants"]
        out["loop_tflops_per_s"] = {n: v["loop_tflops_per_s"] for n, v in variants.items()}
        out["loop_percent_of_peak"] = {
            n: 100 * v["loop_tflops_per_s"] / out["matmul_peak_tflops_per_s"] for n, v in variants.items()
        }
    return out


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k, parts in KINDS.items() if any(p in low for p in parts)), "other")


def profile(s: Sizes) -> dict[str, Any]:
    """torch.profiler over one 3-way step of the eager preset: the top kernels and each kind's share."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from flashface_trt.models.backend import TorchBackend
    from flashface_trt.models.settings import TORCH_PRESETS

    from .suite import load_models
    from .workload import Workload, make_denoiser, sync

    if (skip := needs_cuda(s)) is not None:
        return skip
    args = type("Args", (), {"device": s.device, "preset": s.preset})
    dtype = torch.float16 if s.precision == "fp16" else torch.float32
    backend = TorchBackend(load_models(args, dtype), TORCH_PRESETS["eager"])
    den, _, prepared = make_denoiser(backend, Workload(s.size, s.size, 4, s.steps, 1, s.ref_size), False)
    step = next(st for st in prepared.steps if st.three_way)
    device = torch.device(s.device)
    with torch.inference_mode():
        den(prepared.x, step)  # warm-up: kernels chosen, K/V cached
        sync(device)
        cuda = device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with torch_profile(activities=activities) as prof:
            den(prepared.x, step)
            sync(device)
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [
        e for e in prof.key_averages() if getattr(e, attr, 0) > 0 and (cuda or e.key.startswith("aten::"))
    ]
    total = sum(getattr(e, attr) for e in events) or 1.0
    shares: dict[str, float] = {}
    for e in events:
        shares[kind(e.key)] = shares.get(kind(e.key), 0.0) + getattr(e, attr) / total
    top = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:TOP_KERNELS]
    table = [
        {
            "name": e.key[:120],
            "kind": kind(e.key),
            "us": getattr(e, attr),
            "share": getattr(e, attr) / total,
            "calls": e.count,
        }
        for e in top
    ]
    clock = "device kernels" if cuda else "CPU aten ops (dry run: no CUDA kernels)"
    return {"status": "ok", "timed": clock, "step_us": total, "shares": shares, "top": table}


def batching(s: Sizes) -> dict[str, Any]:
    """Step-level batching of 1, 2, 4, 8 concurrent requests against one after another (images/s, p95);
    the executor's row budget is 24, so 8 one-sample 3-way requests share a step."""
    from . import batching as bench

    if (skip := needs_cuda(s)) is not None:
        return skip
    path = s.work / "batching.json"
    levels = "1,2" if s.dry else "1,2,4,8"
    steps = s.steps if s.dry else 10
    args = [*s.workload_args(), "--steps", str(steps), "--concurrency", levels, "--max-batch-rows", "24"]
    if bench.main([*args, "--json", str(path)]) != 0:
        return {"status": "failed", "reason": "batched latents differ from alone (see its stderr)"}
    levels_rec = json.loads(path.read_text())["levels"]
    return {"status": "ok", "steps": steps, "max_batch_rows": 24, "levels": levels_rec}


def tensorrt(s: Sizes) -> dict[str, Any]:
    """`TrtBackend` on the torch-module TensorRT double (`cuda_trt`): real CUDA on a GPU, the CUDA
    double in a dry run; its images against ONNX Runtime's on the same tiny export."""
    import torch

    from flashface_trt.engine.build import build_engines
    from flashface_trt.export.exporter import ExportSettings, export_models
    from flashface_trt.models.loading import tiny_models
    from flashface_trt.runtime.artifacts.spec import TINY_SHAPES
    from flashface_trt.runtime.backends.cuda import device_count
    from flashface_trt.runtime.backends.ort import OrtBackend
    from flashface_trt.runtime.faces.images import synthetic_face
    from flashface_trt.runtime.sampling.executor import StepExecutor, Task
    from flashface_trt.runtime.sampling.pipeline import generate, register_identity
    from flashface_trt.runtime.sampling.request import GenerationRequest
    from flashface_trt.runtime.sampling.sampler import GuidanceParams

    from . import cuda_trt

    real = not s.dry
    if real and (not torch.cuda.is_available() or device_count() == 0):
        return {"status": "skipped", "reason": "no CUDA device for torch and cuda.bindings"}
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # ORT's fp32 is exact
    root = Path(tempfile.mkdtemp(prefix="gpu_check_trt_", dir=s.work))
    t0 = time.perf_counter()
    export_models(tiny_models(), root / "onnx", ExportSettings(shapes=TINY_SHAPES))
    export_s = time.perf_counter() - t0
    ort = OrtBackend(root / "onnx")
    faces = [synthetic_face(200, seed=0)]
    steps = 4 if s.dry else 6
    reqs = [
        GenerationRequest(
            f"person {i}",
            steps=steps,
            seed=i,
            height=64,
            width=64,
            guidance=GuidanceParams(step_to_launch=500),
        )
        for i in range(3)
    ]
    with pytest.MonkeyPatch.context() as mp:
        fakes = cuda_trt.install(mp, tiny_models("cuda" if real else "cpu"), real_cuda=real)
        from flashface_trt.runtime.backends.trt import TrtBackend

        t0 = time.perf_counter()
        manifest = build_engines(root / "onnx", root / "engines")
        build_s = time.perf_counter() - t0
        be = TrtBackend(root / "engines")
        ident = register_identity(be, faces)
        alone = [generate(be, r, ident) for r in reqs[:1]]
        ex = StepExecutor(be, max_batch_rows=12)
        tasks = [ex.submit(Task(r, ident)) for r in reqs]
        ex.run()
        want = [generate(ort, r, faces) for r in reqs]
        diff = [_max_diff(t.images, w) for t, w in zip(tasks, want)]
        diff_alone = _max_diff(alone[0], want[0])
        used = sorted({c.active_optimization_profile for c in be.engines["unet"].contexts.values()})
        faults = list(getattr(fakes.cuda, "faults", []))
        out = {
            "status": "ok"
            if max(diff + [diff_alone]) <= 2 and not faults and not be.graphs.failed
            else "failed",
            "cuda": "real (cuda.bindings), kernels from the exported PyTorch modules"
            if real
            else "the CUDA double",
            "max_pixel_diff_vs_onnxruntime": {"alone": diff_alone, "batched": diff},
            "errors": [str(t.error) for t in tasks if t.error is not None],
            "batch_sizes_max": max(ex.batch_sizes),
            "graphs": {
                "captured": be.graphs.captures,
                "capture_failed": {str(k): v for k, v in be.graphs.failed.items()},
            },
            "unet_profiles_used": used,
            "activation_memory_bytes": be.memory.nbytes,
            "engine_estimates": manifest["estimates"],
            "seconds": {"export": export_s, "build_with_double": build_s},
            "faults": faults[:5],
        }
    return out


def _max_diff(a: list, b: list) -> int:
    pa = np.stack([np.asarray(im, np.int16) for im in a])
    pb = np.stack([np.asarray(im, np.int16) for im in b])
    return int(np.abs(pa - pb).max())


PARTS = {
    "w768": w768,
    "numerics": numerics,
    "peak": peak,
    "profile": profile,
    "batching": batching,
    "tensorrt": tensorrt,
    "compiled": compiled,
}
SECONDS = {
    "compiled": 240,
    "w768": 270,
    "numerics": 40,
    "peak": 25,
    "profile": 60,
    "batching": 120,
    "tensorrt": 150,
}

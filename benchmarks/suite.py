"""Speed of our PyTorch path against the official computation pattern, measured side by side.

For one workload (default W768: 768x768, 4 references, 30 steps, 1 sample) it reports per-stage
times, end-to-end latency, images/s, peak GPU memory, counted FLOPs, achieved TFLOP/s against the
device's measured dense matmul rate, the baseline's numbers, and a repeated request for a cached
identity. Numerics are checked before any timing: our denoiser and the baseline must agree, and
with `--precision fp16` the float16 eps is compared with float32 on the same inputs.

    python -m benchmarks.suite --preset tiny --device cpu --height 128 --width 128 --steps 10
    python -m benchmarks.suite --preset sd15-random --device cuda --precision fp16   # W768 on a GPU
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from flashface_trt.models.backend import TorchBackend, TorchModels
from flashface_trt.models.loading import tiny_models
from flashface_trt.models.settings import TORCH_PRESETS
from flashface_trt.runtime.identities import identity_from_crops
from flashface_trt.runtime.sampler import sample

from .bench_torch import sd15_random
from .workload import (
    Workload,
    encode_prompts,
    make_denoiser,
    matmul_peak_tflops,
    meta_loop_flops,
    sync,
)

RESULTS = Path(__file__).resolve().parent / "results"


def timed(device: torch.device, fn, *args):
    """(result, seconds): CUDA events on a GPU, wall clock after a sync on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(*args)
        end.record()
        end.synchronize()
        return out, start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def run(
    backend: TorchBackend, workload: Workload, official: bool, identity=None
) -> tuple[dict, torch.Tensor, object]:
    """One generation with per-stage seconds (text, faces, reference_net, loop, decode, end_to_end).

    `identity` given: a repeated request for a registered person (no face encoding, cached K/V).
    The official pattern has no separate ReferenceNet stage: it runs inside every step of its loop.
    """
    device = backend.device
    sync(device)
    t0 = time.perf_counter()
    if not official and identity is None:
        backend.kv_cache.clear()
    text, t_text = timed(device, encode_prompts, backend, workload)
    ident, t_faces = identity, 0.0
    if ident is None:
        ident, t_faces = timed(device, identity_from_crops, backend.encode_references, workload.crops())
    den, x, steps, ident = make_denoiser(backend, workload, official, ident, text)
    t_ref = 0.0
    if not official:  # ours: K/V of every step up front (cache hits for a registered identity)
        _, t_ref = timed(device, lambda: [den.reference_kv(s.t) for s in steps])
    # ours: the backend's denoiser (static step buffers, a CUDA-graph replay per step on a GPU)
    z0, t_loop = timed(device, lambda: torch.inference_mode()(sample)(den, x, steps))
    _, t_dec = timed(device, backend.decode, z0)
    sync(device)
    stages = {"text": t_text, "faces": t_faces, "reference_net": t_ref, "loop": t_loop, "decode": t_dec}
    return {**stages, "end_to_end": time.perf_counter() - t0}, z0, ident


def median_runs(fn, repeats: int) -> dict[str, float]:
    runs = [fn() for _ in range(repeats)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def check_numerics(backend: TorchBackend, workload: Workload, args, z_ours: torch.Tensor) -> dict:
    """Before timing: ours vs the official pattern (same result), and float16 vs float32 eps.

    z_ours: the plain sampler's z0 for `workload` on `backend` (float16 image vs float32 image).
    """
    with torch.inference_mode():
        ours, x, steps, _ = make_denoiser(backend, workload, official_pattern=False)
        base, _, _, _ = make_denoiser(backend, workload, official_pattern=True)
        step = next((s for s in steps if s.three_way), steps[0])
        a, b = ours.eps(x, step).float(), base.eps(x, step).float()
    out = {"ours_vs_official_pattern_eps_rel_err": float((a - b).abs().max() / b.abs().max())}
    if backend.dtype == torch.float16:
        ref = TorchBackend(load_models(args, torch.float32), TORCH_PRESETS["eager"])
        with torch.inference_mode():
            d32, x32, _, _ = make_denoiser(ref, workload, official_pattern=False)
            e32 = d32.eps(x32, step).float()
            z16 = z_ours
            z32 = sample(d32, x32, steps)
        i16, i32 = backend.decode(z16).astype(np.float64), ref.decode(z32).astype(np.float64)
        mse = float(((i16 - i32) ** 2).mean())
        out["fp16_vs_fp32_eps_rel_err"] = float((a - e32).abs().max() / e32.abs().max())
        out["fp16_vs_fp32_image_psnr_db"] = float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)
    return out


def check_loop(backend: TorchBackend, workload: Workload, reference: torch.Tensor) -> float:
    """Before timing a variant: its loop (static, CUDA-graph replay, compiled) against the plain sampler.

    This first run is also the variant's warm-up: compilation and graph capture happen here.
    """
    _, z0, _ = run(backend, workload, official=False)
    ref = reference.float()
    return float((z0.float() - ref).abs().max() / ref.abs().max())


def load_models(args, dtype: torch.dtype) -> TorchModels:
    device = torch.device(args.device)
    return tiny_models(device, dtype) if args.preset == "tiny" else sd15_random(device, dtype)


def variant_backend(models: TorchModels, name: str) -> TorchBackend:
    """The backend of one `TORCH_PRESETS` entry; channels-last converts its own copy of the UNet."""
    settings = TORCH_PRESETS[name]
    if settings.channels_last:
        models = dataclasses.replace(models, unet=copy.deepcopy(models.unet))
    return TorchBackend(models, settings)


def time_variant(backend: TorchBackend, workload: Workload, repeats: int, base: dict, rates: dict) -> dict:
    """Median stage seconds of fresh and cached-identity requests, the peak GPU memory of one, and
    rates against the baseline's seconds `base` and `rates` (loop FLOPs, matmul peak TFLOP/s)."""
    ours = median_runs(lambda: run(backend, workload, official=False)[0], repeats)
    _, _, identity = run(backend, workload, official=False)
    cached = median_runs(lambda: run(backend, workload, official=False, identity=identity)[0], repeats)
    peak_mem = None
    if backend.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(backend.device)
        run(backend, workload, official=False)
        peak_mem = torch.cuda.max_memory_allocated(backend.device)
    loop_seconds = ours["reference_net"] + ours["loop"]  # the loop's FLOPs include the ReferenceNet's
    tflops = rates["loop_flops"] / loop_seconds / 1e12
    return {
        "seconds": ours,
        "cached_identity": cached,
        "peak_memory_bytes": peak_mem,
        "loop_seconds": loop_seconds,
        "loop_tflops_per_s": tflops,
        "loop_percent_of_peak": 100 * tflops / rates["peak"],
        "speedup_end_to_end": base["end_to_end"] / ours["end_to_end"],
        "speedup_cached_identity": base["end_to_end"] / cached["end_to_end"],
        "images_per_second": workload.samples / ours["end_to_end"],
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=["tiny", "sd15-random"], default="sd15-random")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--precision", choices=["fp32", "fp16"], default="fp16" if torch.cuda.is_available() else "fp32"
    )
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--refs", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--samples", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--variants",
        type=lambda text: [v for v in text.split(",") if v],
        default=["auto"],
        help=f"comma-separated PyTorch backend presets timed in this run ({', '.join(TORCH_PRESETS)})",
    )
    p.add_argument(
        "--matmul-size", type=int, help="square matmul size for the peak (default 8192 GPU, 1024 CPU)"
    )
    p.add_argument(
        "--json", type=Path, help="result record (default: benchmarks/results/<device>-<commit>.json)"
    )
    p.add_argument(
        "--official-src", type=Path, help="a checkout of ali-vilab/FlashFace: also time its own loop"
    )
    args = p.parse_args(argv)

    unknown = [v for v in args.variants if v not in TORCH_PRESETS]
    if unknown or not args.variants:
        p.error(f"--variants {','.join(args.variants)!r}: each must be one of {', '.join(TORCH_PRESETS)}")
    dtype = torch.float16 if args.precision == "fp16" else torch.float32
    models = load_models(args, dtype)
    plain = TorchBackend(models, TORCH_PRESETS["eager"])  # the baseline, and the reference loop
    device = plain.device
    workload = Workload(args.height, args.width, args.refs, args.steps, args.samples)
    with torch.inference_mode():
        den, x, steps, _ = make_denoiser(plain, workload, official_pattern=False)
        reference_z0 = sample(den, x, steps)
    numerics = check_numerics(plain, workload, args, reference_z0)
    fp16 = dtype == torch.float16
    if not numerics["ours_vs_official_pattern_eps_rel_err"] <= (1e-2 if fp16 else 1e-4):
        print(f"numerics check failed: {numerics}", file=sys.stderr)
        return 1
    run(plain, workload, official=True)  # warm-up
    base = median_runs(lambda: run(plain, workload, official=True)[0], args.repeats)
    cfg = models.config  # counted on the meta device: the same counts as a real run, in seconds
    flops, flops_base = meta_loop_flops(cfg, workload), meta_loop_flops(cfg, workload, official_pattern=True)
    size = args.matmul_size or (8192 if device.type == "cuda" else 1024)
    peak = matmul_peak_tflops(device, dtype, size)
    rates = {"loop_flops": flops["loop"], "peak": peak}
    variants = {}
    for name in args.variants:
        backend = variant_backend(models, name)
        err = check_loop(backend, workload, reference_z0)
        numerics[f"loop_{name}_vs_plain_sampler_z0_rel_err"] = err
        if not err <= (5e-2 if fp16 else 1e-3):
            print(f"variant {name}: loop differs from the plain sampler (rel err {err:.2e})", file=sys.stderr)
            return 1
        variants[name] = time_variant(backend, workload, args.repeats, base, rates)
        del backend
    first = variants[args.variants[0]]
    ours = first["seconds"]
    record = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "commit": git_commit(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "numerics": numerics,
        "seconds": {"ours": ours, "official_pattern": base, "ours_cached_identity": first["cached_identity"]},
        "images_per_second": {
            "ours": first["images_per_second"],
            "official_pattern": args.samples / base["end_to_end"],
        },
        "speedup_end_to_end": first["speedup_end_to_end"],
        "speedup_cached_identity": first["speedup_cached_identity"],
        "tflop": {
            "ours": {k: v / 1e12 for k, v in flops.items()},
            "official_pattern": {k: v / 1e12 for k, v in flops_base.items()},
        },
        "loop_tflops_per_s": first["loop_tflops_per_s"],
        "matmul_peak_tflops_per_s": peak,
        "loop_percent_of_peak": first["loop_percent_of_peak"],
        "peak_memory_bytes": first["peak_memory_bytes"],
        "variants": variants,
    }
    if args.official_src:
        from .official import time_official

        official = time_official(args.official_src, models.config, workload, args.device, args.repeats)
        record["seconds"]["official_implementation"] = {"loop": official["loop_seconds_median"]}
        record["speedup_loop_vs_official_implementation"] = (
            official["loop_seconds_median"] / first["loop_seconds"]
        )
    print(f"device {record['device']}, {args.preset}, {args.precision}, {workload}")
    print(f"  {'official_pattern':40s} " + "  ".join(f"{k} {v * 1000:8.1f} ms" for k, v in base.items()))
    if args.official_src:
        print(f"  {'official_implementation':40s} loop {official['loop_seconds_median'] * 1000:8.1f} ms")
    for name, v in variants.items():
        for label, sec in ((name, v["seconds"]), (f"{name} (cached identity)", v["cached_identity"])):
            print(f"  {label:40s} " + "  ".join(f"{k} {t * 1000:8.1f} ms" for k, t in sec.items()))
        print(
            f"  {'':40s} speedup {v['speedup_end_to_end']:.2f}x "
            f"(cached {v['speedup_cached_identity']:.2f}x), "
            f"{v['images_per_second']:.3f} images/s, loop {v['loop_tflops_per_s']:.2f} TFLOP/s = "
            f"{v['loop_percent_of_peak']:.1f}% of peak"
        )
    if args.official_src:
        vs_official = record["speedup_loop_vs_official_implementation"]
        print(f"  loop vs the official implementation itself: {vs_official:.2f}x")
    print(
        f"  loop {flops['loop'] / 1e12:.3f} TFLOP (official pattern {flops_base['loop'] / 1e12:.3f}), "
        f"measured matmul peak {peak:.1f} TFLOP/s"
    )
    device_tag = re.sub(r"[^A-Za-z0-9.-]+", "_", record["device"]).strip("_")
    out = args.json or RESULTS / f"{device_tag}-{args.preset}-{record['commit']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"  record -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

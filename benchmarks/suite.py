"""Speed of our PyTorch path against the official implementation, or our re-implementation of its pattern.

For one workload (default W768: 768x768, 4 references, 30 steps, 1 sample) it reports per-stage
times, end-to-end latency, images/s, peak GPU memory, counted FLOPs, achieved TFLOP/s against the
device's measured dense matmul rate, the baselines' numbers, and a repeated request for a cached
identity. The headline is the loop against the official implementation itself (ali-vilab/FlashFace,
`--official-src`) when it is given, else against the official pattern: our own modules run in the
official computation pattern (a re-implementation, more work by construction). Numerics are
checked before any timing: our step and the official pattern must agree, and with
`--precision fp16` the float16 eps is compared with float32 on the same inputs.

    python -m benchmarks.suite --preset tiny --device cpu --height 128 --width 128 --steps 10
    python -m benchmarks.suite --preset sd15-random --device cuda --precision fp16   # W768 on a GPU
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from flashface_trt.models.backend import TorchBackend, TorchModels
from flashface_trt.models.loading import tiny_models
from flashface_trt.models.settings import TORCH_PRESETS
from flashface_trt.runtime.sampling.identities import Identity, identity_from_crops
from flashface_trt.runtime.sampling.prepare import prefetch_kv
from flashface_trt.runtime.sampling.request import REFERENCE_SIZE
from flashface_trt.runtime.sampling.sampler import sample

from .bench_torch import sd15_random
from .records import cpu_name, git_commit, write_record
from .workload import (
    PATTERN_FLOPS_NOTE,
    PATTERN_NOTE,
    Workload,
    make_denoiser,
    matmul_peak_tflops,
    meta_loop_flops,
    sync,
)

NOTES = {
    "official_pattern": PATTERN_NOTE,
    "official_implementation": (
        "ali-vilab/FlashFace's own sampling loop (ContextGaussianDiffusion.sample) imported from "
        "--official-src with its own random weights at the same sizes (so its numbers are not compared "
        "with ours); only its loop is timed, so the end-to-end speedups against it are null"
    ),
    "flops": PATTERN_FLOPS_NOTE,
}
LABELS = {
    "official_pattern": "the official pattern (our re-implementation of the official computation pattern)",
    "official_implementation": "the official implementation (ali-vilab/FlashFace, its own sampling loop)",
}


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
    ident, t_faces = identity, 0.0
    if ident is None:
        ident, t_faces = timed(device, identity_from_crops, backend.encode_references, workload.crops())
    (den, _, prepared), t_text = timed(device, make_denoiser, backend, workload, official, ident)
    x, steps = prepared.x, prepared.steps
    t_ref = 0.0
    if not official:  # ours: every step's K/V on admission as the executor does (prefetch off: in the loop)
        _, t_ref = timed(device, prefetch_kv, backend, prepared)
    # ours: the backend's step (static step buffers, a CUDA-graph replay per step on a GPU)
    z0, t_loop = timed(device, lambda: torch.inference_mode()(sample)(den, x, steps))
    _, t_dec = timed(device, backend.decode, z0)
    sync(device)
    stages = {"text": t_text, "faces": t_faces, "reference_net": t_ref, "loop": t_loop, "decode": t_dec}
    return {**stages, "end_to_end": time.perf_counter() - t0}, z0, ident


def median(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per stage, the median seconds of `runs`."""
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| / max|ref|."""
    out, ref = out.float(), ref.float()
    return float((out - ref).abs().max() / ref.abs().max())


def check_numerics(
    backend: TorchBackend, workload: Workload, args, image: np.ndarray, identity: Identity
) -> dict:
    """Before timing: ours vs the official pattern (same eps), and float16 vs float32 (eps and image).

    Both kinds of step the plan has (2-way, 3-way) are compared; the worst error is recorded.
    image: the plain sampler's image for `workload` on `backend` with `identity` (its references).
    These official-pattern calls are also its warm-up, at the shapes that its timed runs use.
    """
    with torch.inference_mode():
        _, ours, prepared = make_denoiser(backend, workload, False, identity)
        _, base, _ = make_denoiser(backend, workload, True, identity)
        x, steps = prepared.x, prepared.steps
        kinds = list({s.three_way: s for s in reversed(steps)}.values())  # the first step of each kind
        eps = [ours(x, s) for s in kinds]
        err = max(rel_err(e, base(x, s)) for e, s in zip(eps, kinds))
    out = {"ours_vs_official_pattern_eps_rel_err": err}
    if backend.dtype == torch.float16:
        ref = TorchBackend(load_models(args, torch.float32), TORCH_PRESETS["eager"])
        with torch.inference_mode():
            d32, eps32, p32 = make_denoiser(ref, workload, official_pattern=False)
            out["fp16_vs_fp32_eps_rel_err"] = max(rel_err(e, eps32(p32.x, s)) for e, s in zip(eps, kinds))
            z32 = sample(d32, p32.x, steps)
        i16, i32 = image.astype(np.float64), ref.decode(z32).astype(np.float64)
        mse = float(((i16 - i32) ** 2).mean())
        out["fp16_vs_fp32_image_psnr_db"] = float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)
    return out


def check_loop(
    backend: TorchBackend, workload: Workload, reference: torch.Tensor, identity: Identity
) -> float:
    """Before timing a variant: its loop (static, CUDA-graph replay, compiled) against the plain sampler.

    This first run is also the variant's warm-up: compilation and graph capture happen here. It
    reuses the reference run's `identity` (the shared VAE encoder is warm; the variant's own
    ReferenceNet runs, its cache being empty).
    """
    _, z0, _ = run(backend, workload, official=False, identity=identity)
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


def speedups(variant: dict, baseline: dict[str, float]) -> dict[str, float | None]:
    """`variant`'s speedups over one baseline's median seconds; end-to-end ones only where it was timed.

    The loop is the ReferenceNet K/V plus the denoising loop (the official pattern and the official
    implementation run the ReferenceNet inside their loops).
    """
    base_loop = baseline.get("reference_net", 0.0) + baseline["loop"]
    e2e = baseline.get("end_to_end")
    return {
        "loop": base_loop / variant["loop_seconds"],
        "loop_cached_identity": base_loop / variant["loop_seconds_cached_identity"],
        "end_to_end": None if e2e is None else e2e / variant["seconds"]["end_to_end"],
        "cached_identity": None if e2e is None else e2e / variant["cached_identity"]["end_to_end"],
    }


def time_variant(
    backend: TorchBackend, workload: Workload, repeats: int, baselines: dict[str, dict], rates: dict
) -> dict:
    """Median stage seconds of fresh and cached-identity requests, peak GPU memory, speedups and rates.

    Speedups are over each baseline's seconds in `baselines`; TFLOP/s come from `rates` (loop
    FLOPs, matmul peak TFLOP/s). The last fresh request registers the identity the cached ones use.
    """
    fresh = [run(backend, workload, official=False) for _ in range(repeats)]
    ours, identity = median([r[0] for r in fresh]), fresh[-1][2]  # its K/V are cached now
    cached = median([run(backend, workload, official=False, identity=identity)[0] for _ in range(repeats)])
    peak_mem = None
    if backend.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(backend.device)
        run(backend, workload, official=False)
        peak_mem = torch.cuda.max_memory_allocated(backend.device)
    loop_seconds = ours["reference_net"] + ours["loop"]  # the loop's FLOPs include the ReferenceNet's
    tflops = rates["loop_flops"] / loop_seconds / 1e12
    out = {
        "seconds": ours,
        "cached_identity": cached,
        "peak_memory_bytes": peak_mem,
        "loop_seconds": loop_seconds,
        "loop_seconds_cached_identity": cached["reference_net"] + cached["loop"],
        "loop_tflops_per_s": tflops,
        "loop_percent_of_peak": 100 * tflops / rates["peak"],
        "images_per_second": workload.samples / ours["end_to_end"],
    }
    out["speedup"] = {name: speedups(out, base) for name, base in baselines.items()}
    return out


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The model and workload flags the benchmarks share (defaults: W768 on the best device)."""
    p.add_argument("--preset", choices=["tiny", "sd15-random"], default="sd15-random")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--precision", choices=["fp32", "fp16"], default="fp16" if torch.cuda.is_available() else "fp32"
    )
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--refs", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--ref-size", type=int, default=REFERENCE_SIZE, help="reference crop side (official: 224)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(p)
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
    workload = Workload(args.height, args.width, args.refs, args.steps, args.samples, args.ref_size)
    with torch.inference_mode():
        den, _, prepared = make_denoiser(plain, workload, official_pattern=False)
        reference_z0, identity = sample(den, prepared.x, prepared.steps), prepared.ctx.identity
    numerics = check_numerics(plain, workload, args, plain.decode(reference_z0), identity)
    fp16 = dtype == torch.float16
    if not numerics["ours_vs_official_pattern_eps_rel_err"] <= (1e-2 if fp16 else 1e-4):
        print(f"numerics check failed: {numerics}", file=sys.stderr)
        return 1
    # warm: the reference run made every call but the official pattern's, which check_numerics made
    base = median([run(plain, workload, official=True)[0] for _ in range(args.repeats)])
    baselines = {"official_pattern": base}
    official = None
    if args.official_src:
        from .official import time_official

        official = time_official(args.official_src, models.config, workload, args.device, args.repeats)
        baselines["official_implementation"] = {"loop": official["loop_seconds_median"]}
    headline = "official_implementation" if official else "official_pattern"
    cfg = models.config  # counted on the meta device: the same counts as a real run, in seconds
    counts = meta_loop_flops(cfg, workload)
    flops, flops_base = counts["ours"], counts["official_pattern"]
    size = args.matmul_size or (8192 if device.type == "cuda" else 1024)
    peak = matmul_peak_tflops(device, dtype, size)
    variants = {}
    for name in args.variants:  # a preset without the UNet cuts is rated by the uncut count
        rates = {
            "loop_flops": counts["ours" if TORCH_PRESETS[name].cuts else "ours_uncut"]["loop"],
            "peak": peak,
        }
        backend = variant_backend(models, name)
        err = check_loop(backend, workload, reference_z0, identity)
        numerics[f"loop_{name}_vs_plain_sampler_z0_rel_err"] = err
        if not err <= (5e-2 if fp16 else 1e-3):
            print(f"variant {name}: loop differs from the plain sampler (rel err {err:.2e})", file=sys.stderr)
            return 1
        variants[name] = time_variant(backend, workload, args.repeats, baselines, rates)
        del backend
    first = variants[args.variants[0]]
    top = first["speedup"][headline]
    record = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "commit": git_commit(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "numerics": numerics,
        "baseline": headline,
        "notes": {k: v for k, v in NOTES.items() if official or k != "official_implementation"},
        "speedup_loop": top["loop"],
        "speedup_loop_cached_identity": top["loop_cached_identity"],
        "speedup_end_to_end": top["end_to_end"],
        "speedup_cached_identity": top["cached_identity"],
        "seconds": {
            "ours": first["seconds"],
            "ours_cached_identity": first["cached_identity"],
            **{name: dict(sec) for name, sec in baselines.items()},
        },
        "images_per_second": {
            "ours": first["images_per_second"],
            "official_pattern": args.samples / base["end_to_end"],
        },
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
    if official:
        record["official_implementation_runs"] = official["runs"]
        record["official_commit"] = git_commit(args.official_src)

    def rates_line(sp: dict) -> str:
        text = f"loop {sp['loop']:.2f}x (cached identity {sp['loop_cached_identity']:.2f}x)"
        if sp["end_to_end"] is None:
            return text + ", end-to-end not timed for it"
        return text + f", end-to-end {sp['end_to_end']:.2f}x (cached identity {sp['cached_identity']:.2f}x)"

    print(f"device {record['device']}, {args.preset}, {args.precision}, {workload}")
    print(f"  headline ({args.variants[0]}) vs {LABELS[headline]}: speedup {rates_line(top)}")
    print(f"  {'official_pattern':40s} " + "  ".join(f"{k} {v * 1000:8.1f} ms" for k, v in base.items()))
    print(f"  {'':40s} ({NOTES['official_pattern']})")
    if official:
        print(f"  {'official_implementation':40s} loop {official['loop_seconds_median'] * 1000:8.1f} ms")
    for name, v in variants.items():
        for label, sec in ((name, v["seconds"]), (f"{name} (cached identity)", v["cached_identity"])):
            print(f"  {label:40s} " + "  ".join(f"{k} {t * 1000:8.1f} ms" for k, t in sec.items()))
        for base_name, sp in v["speedup"].items():
            print(f"  {'':40s} vs {base_name.replace('_', ' ')}: {rates_line(sp)}")
        print(
            f"  {'':40s} {v['images_per_second']:.3f} images/s, loop {v['loop_tflops_per_s']:.3g} TFLOP/s = "
            f"{v['loop_percent_of_peak']:.1f}% of peak"
        )
        if name != args.variants[0]:  # e.g. `eager-uncut` after `eager`: what the UNet cuts gain
            ratio = v["loop_seconds"] / first["loop_seconds"]
            print(f"  {'':40s} ReferenceNet + loop: {args.variants[0]} is {ratio:.3f}x faster than {name}")
    print(
        f"  loop {flops['loop'] / 1e12:.3f} TFLOP, official pattern {flops_base['loop'] / 1e12:.3f} TFLOP "
        f"({NOTES['flops']}); measured matmul peak {peak:.3g} TFLOP/s"
    )
    write_record(record, args.preset, args.json, indent="  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())

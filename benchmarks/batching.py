"""Step-level batching against one request after another: images/s and per-request latency.

For each concurrency c (default 1, 2, 4, 8) the same c requests (different identities, seeds and
prompts, one size) run twice in one process: one after another (each alone: the single-request
path), and together through the step-level executor (requests arrive at once and share each
UNet call), each starting with an empty reference K/V cache. Before timing, every request's
latents from the batched run are compared with the same request alone (relative error, recorded;
above the bound the run aborts). Latency is a request's time from submission to its images;
throughput counts images over the wall time.

    python -m benchmarks.batching --preset sd15-random --height 256 --width 256 --steps 4
    python -m benchmarks.batching --preset sd15-random --device cuda --precision fp16   # W768, GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from flashface_trt.models.backend import TorchBackend
from flashface_trt.models.loading import tiny_models
from flashface_trt.runtime.faces.images import synthetic_face
from flashface_trt.runtime.sampling.executor import StepExecutor, Task
from flashface_trt.runtime.sampling.identities import identity_from_crops
from flashface_trt.runtime.sampling.pipeline import prepare_references
from flashface_trt.runtime.sampling.request import GenerationRequest

from .bench_torch import sd15_random
from .records import cpu_name, git_commit, write_record
from .suite import add_workload_args


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks (NumPy's default)."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def requests(n: int, args: argparse.Namespace) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            f"person {i}, a portrait", steps=args.steps, seed=100 + i, height=args.height, width=args.width
        )
        for i in range(n)
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_sequential(backend, reqs, idents) -> tuple[list[float], float, list]:
    """Each request alone, one after another: (latencies from the common start, wall, z0s)."""
    ex = StepExecutor(backend, max_batch_rows=3 * max(r.num_samples for r in reqs))
    sync(backend.device)
    t0 = time.perf_counter()
    latencies, z0s = [], []
    for req, ident in zip(reqs, idents):
        task = ex.submit(Task(req, ident))
        ex.run()
        sync(backend.device)
        latencies.append(time.perf_counter() - t0)  # every request arrived at t0
        z0s.append(task.z0)
    return latencies, time.perf_counter() - t0, z0s


def run_batched(backend, reqs, idents, max_rows: int) -> tuple[list[float], float, list, list[int]]:
    """All requests submitted at once to the step-level executor."""
    ex = StepExecutor(backend, max_batch_rows=max_rows)
    done: dict[int, float] = {}
    sync(backend.device)
    t0 = time.perf_counter()
    tasks = [ex.submit(Task(req, ident, name=str(i))) for i, (req, ident) in enumerate(zip(reqs, idents))]
    while ex.busy:
        ex.run_once()
        for i, task in enumerate(tasks):
            if task.done.is_set() and i not in done:
                sync(backend.device)
                done[i] = time.perf_counter() - t0
    return (
        [done[i] for i in range(len(tasks))],
        time.perf_counter() - t0,
        [t.z0 for t in tasks],
        ex.batch_sizes,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_workload_args(p)
    p.add_argument("--concurrency", default="1,2,4,8", help="comma-separated numbers of concurrent requests")
    p.add_argument("--max-batch-rows", type=int, help="executor row budget (default: 3 x concurrency)")
    p.add_argument(
        "--bound", type=float, help="z0 rel. error bound batched vs alone (default 1e-4 fp32, 5e-2 fp16)"
    )
    p.add_argument(
        "--json", type=Path, help="record (default benchmarks/results/<device>-batching-<commit>.json)"
    )
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c]
    dtype = torch.float16 if args.precision == "fp16" else torch.float32
    models = tiny_models(args.device, dtype) if args.preset == "tiny" else sd15_random(args.device, dtype)
    backend = TorchBackend(models)
    bound = args.bound if args.bound is not None else (5e-2 if args.precision == "fp16" else 1e-4)
    crops = [
        prepare_references([synthetic_face(seed=10 * i + j) for j in range(args.refs)], args.ref_size)
        for i in range(max(levels))
    ]
    idents = [identity_from_crops(backend.encode_references, c) for c in crops]
    warm = requests(1, args)
    run_sequential(backend, warm, idents[:1])  # warm-up: kernels and allocator
    rows: dict[str, dict] = {}
    for c in levels:
        reqs = requests(c, args)
        # both runs start without cached reference K/V: each computes every request's ReferenceNet
        # steps (the batched one over all requests that need them at once)
        backend.kv_cache.clear()
        seq_lat, seq_wall, seq_z = run_sequential(backend, reqs, idents[:c])
        backend.kv_cache.clear()
        bat_lat, bat_wall, bat_z, sizes = run_batched(backend, reqs, idents[:c], args.max_batch_rows or 3 * c)
        errs = [
            float((b.float() - s.float()).abs().max() / s.float().abs().max()) for b, s in zip(bat_z, seq_z)
        ]
        if max(errs) > bound:
            print(
                f"concurrency {c}: batched z0 differs from alone by {max(errs):.2e} > {bound:g}",
                file=sys.stderr,
            )
            return 1
        images = sum(r.num_samples for r in reqs)
        solo = statistics.median(seq_lat[i] - (seq_lat[i - 1] if i else 0.0) for i in range(c))
        rows[str(c)] = {
            "z0_rel_err_max": max(errs),
            "batch_sizes_max": max(sizes),
            "sequential": {
                "images_per_s": images / seq_wall,
                "p50_s": percentile(seq_lat, 50),
                "p95_s": percentile(seq_lat, 95),
            },
            "batched": {
                "images_per_s": images / bat_wall,
                "p50_s": percentile(bat_lat, 50),
                "p95_s": percentile(bat_lat, 95),
            },
            "solo_latency_s": solo,
            "throughput_ratio": seq_wall / bat_wall,
            "p95_over_solo": percentile(bat_lat, 95) / solo,
        }
        r = rows[str(c)]
        print(
            f"{c} concurrent: batched {r['batched']['images_per_s']:.3f} img/s vs sequential "
            f"{r['sequential']['images_per_s']:.3f} ({r['throughput_ratio']:.2f}x), p50/p95 "
            f"{r['batched']['p50_s']:.2f}/{r['batched']['p95_s']:.2f} s vs "
            f"{r['sequential']['p50_s']:.2f}/{r['sequential']['p95_s']:.2f} s, "
            f"p95 / solo {r['p95_over_solo']:.2f}, z0 err {r['z0_rel_err_max']:.1e}"
        )
    record = {
        "device": torch.cuda.get_device_name(backend.device) if backend.device.type == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "commit": git_commit(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "levels": rows,
    }
    write_record(record, "batching", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

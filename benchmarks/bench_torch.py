"""Per-stage timing of the PyTorch path (text, references, ReferenceNet K/V, UNet loop, decode).

Correctness is checked before timing: the run is repeated from the same seed and must give
finite, identical latents. Times are wall-clock medians over `--repeats` runs after those two.

    python -m benchmarks.bench_torch --preset tiny --height 128 --width 128 --steps 10
    python -m benchmarks.bench_torch --preset sd15-random --device cuda --precision fp16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from flashface_trt.models.backend import TorchBackend, TorchModels
from flashface_trt.models.config import SD15
from flashface_trt.models.loading import load_models, random_models, tiny_models
from flashface_trt.runtime.sampling.identities import identity_from_crops
from flashface_trt.runtime.sampling.prepare import prefetch_kv, prepare, stepper
from flashface_trt.runtime.sampling.request import GenerationRequest
from flashface_trt.runtime.sampling.sampler import sample

from .workload import Workload


def sd15_random(device: str, dtype: torch.dtype) -> TorchModels:
    """Full-size networks with deterministic random weights: speed needs no real weights."""
    return random_models(SD15, device, dtype)


class Clock:
    """Wall-clock stage timer that synchronises the device around each stage."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: dict[str, float] = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, name: str, fn, *args):
        self.sync()
        t0 = time.perf_counter()
        out = fn(*args)
        self.sync()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
        return out


def run_once(backend: TorchBackend, req: GenerationRequest, refs: np.ndarray, clock: Clock):
    identity = clock("references", identity_from_crops, backend.encode_references, refs)
    backend.kv_cache.clear()  # every run pays for the ReferenceNet
    p = clock("text", prepare, backend, req, identity)
    clock("reference_kv", prefetch_kv, backend, p)  # every timestep's K/V on admission, as the executor does
    z0 = clock("unet_loop", sample, stepper(backend, p.ctx), p.x, p.steps)
    clock("decode", backend.decode, z0)
    return z0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=["tiny", "sd15-random"])
    src.add_argument("--weights", type=Path)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--refs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, help="write the result record here")
    args = p.parse_args(argv)

    dtype = torch.float16 if args.precision == "fp16" else torch.float32
    load = {
        "tiny": lambda: tiny_models(args.device, dtype),
        "sd15-random": lambda: sd15_random(args.device, dtype),
    }
    models = load[args.preset]() if args.preset else load_models(args.weights, args.device, dtype)
    backend = TorchBackend(models)
    workload = Workload(args.height, args.width, args.refs, args.steps, args.num_samples)
    req, refs = workload.request(), workload.crops()

    # correctness before timing (and warm-up): finite and reproducible latents
    warm = Clock(backend.device)
    z_a, z_b = run_once(backend, req, refs, warm), run_once(backend, req, refs, warm)
    if not torch.isfinite(z_a).all() or not torch.equal(z_a, z_b):
        print("correctness check failed: latents are not finite or not reproducible", file=sys.stderr)
        return 1

    runs = []
    for _ in range(args.repeats):
        clock = Clock(backend.device)
        t0 = time.perf_counter()
        run_once(backend, req, refs, clock)
        clock.times["end_to_end"] = time.perf_counter() - t0
        runs.append(clock.times)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    record = {
        "device": torch.cuda.get_device_name()
        if backend.device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "config": vars(args) | {"weights": str(args.weights) if args.weights else None, "json": None},
        "seconds_median": med,
        "images_per_second": args.num_samples / med["end_to_end"],
    }
    for k, v in med.items():
        print(f"{k:>14}: {v * 1000:9.1f} ms")
    print(f"{'images/s':>14}: {record['images_per_second']:9.3f}")
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One GPU check that fits one 10-minute device call; writes a JSON record (`$OUT/gpu_check.json`).

Parts, each recorded as ok / failed / skipped (with the reason), in this order:
  cuda   the project's `runtime/backends/cuda.py` against the real driver: buffers and copies, a captured
         graph whose replays read a table refilled between them, the error of a failing capture,
         replay latency and copy bandwidth (no torch; CI runs this part through the CUDA double)
  tiny   the PyTorch static step as CUDA graphs on the tiny model (fp32): loop vs plain sampler
  w768   the same at W768 (sd15-random, 768x768, 4 references, 30 steps, fp16), with timings

    bash benchmarks/gpu.sh wheels                      # here, once (the GPU image lacks ftfy)
    bash benchmarks/gpu.sh check                       # on the GPU: python -m benchmarks.gpu_check
    python -m benchmarks.gpu_check --out /tmp          # anywhere: without CUDA each part skips
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

LOOP_BOUND = {"fp32": 1e-3, "fp16": 5e-2}  # static loop vs plain sampler, max|dz| / max|z| (suite's)


def cuda_layer(rows: int = 8, row_floats: int = 4096, replays: int = 200, mib: int = 64) -> dict[str, Any]:
    """runtime/backends/cuda.py on device 0: copies, a graph replaying a refilled table, a capture error."""
    from flashface_trt.runtime.backends import cuda

    if cuda.device_count() == 0:
        return {"status": "skipped", "reason": "no CUDA device or driver (cudaGetDeviceCount)"}
    info = cuda.device_info(0)
    stream, rng = cuda.Stream(), np.random.default_rng(0)
    a = rng.standard_normal((257, 33)).astype(np.float32)  # a size that is no multiple of anything
    d1, d2, back = cuda.DeviceBuffer(a.nbytes), cuda.DeviceBuffer(a.nbytes), np.empty_like(a)
    cuda.copy_to_device(d1.ptr, a, stream)
    cuda.copy_device(d2.ptr, d1.ptr, a.nbytes, stream)
    cuda.copy_to_host(back, d2.ptr, stream)
    stream.synchronize()
    checks: dict[str, Any] = {"copies_roundtrip_exact": bool(np.array_equal(back, a))}

    row = row_floats * 4  # the runtime's pattern: a step's row is copied into a static buffer
    table, cur, static, out = (cuda.DeviceBuffer(n) for n in (rows * row, row, row, row))

    def body() -> None:  # what the graph records: it reads `cur`, whatever it holds at launch
        cuda.copy_device(static.ptr, cur.ptr, row, stream)
        cuda.copy_device(out.ptr, static.ptr, row, stream)

    graph = cuda.CudaGraph(stream)
    graph.capture(body)
    wrong = 0
    for _ in range(2):  # the table is refilled between the two passes; the graph is not re-captured
        host = rng.standard_normal((rows, row_floats)).astype(np.float32)
        cuda.copy_to_device(table.ptr, host, stream)
        for i in range(rows):
            cuda.copy_device(cur.ptr, table.ptr + i * row, row, stream)
            graph.replay()
            got = np.empty(row_floats, np.float32)
            cuda.copy_to_host(got, out.ptr, stream)
            stream.synchronize()
            wrong += not np.array_equal(got, host[i])
    checks["replays_reading_refilled_table"] = {"rows": 2 * rows, "wrong": wrong}
    try:
        cuda.CudaGraph(stream).capture(stream.synchronize)  # illegal inside a capture
        checks["capture_error_reported"] = "no error raised"
    except cuda.CudaError as exc:
        checks["capture_error_reported"] = str(exc)
    stream.synchronize()  # the stream is usable after the failed capture

    t0 = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    stream.synchronize()
    replay_us = (time.perf_counter() - t0) / replays * 1e6
    graph.destroy()
    big = np.ones(mib << 18, np.float32)
    dev = cuda.DeviceBuffer(big.nbytes)
    t0 = time.perf_counter()
    cuda.copy_to_device(dev.ptr, big, stream)
    stream.synchronize()
    h2d = time.perf_counter() - t0
    t0 = time.perf_counter()
    cuda.copy_to_host(big, dev.ptr, stream)
    stream.synchronize()
    d2h = time.perf_counter() - t0
    ok = (
        checks["copies_roundtrip_exact"]
        and wrong == 0
        and "cudaStreamSynchronize" in checks["capture_error_reported"]
    )
    return {
        "status": "ok" if ok else "failed",
        "device": info.name,
        "compute_capability": info.compute_capability,
        "checks": checks,
        "timings": {
            "graph_replay_us": replay_us,
            "h2d_gib_per_s": big.nbytes / h2d / 2**30,
            "d2h_gib_per_s": big.nbytes / d2h / 2**30,
        },
    }


def torch_static(preset: str, size: int, refs: int, steps: int, precision: str, repeats: int = 2) -> dict:
    """The static step (CUDA graphs) against the plain sampler: a capture run, a replay-only run
    with another identity, and loop timings of both backends (CUDA events, median of `repeats`)."""
    import torch

    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "torch sees no CUDA device"}
    from flashface_trt.models.backend import TorchBackend
    from flashface_trt.models.loading import tiny_models
    from flashface_trt.models.settings import TORCH_PRESETS
    from flashface_trt.runtime.faces.images import synthetic_face
    from flashface_trt.runtime.sampling.identities import identity_from_crops
    from flashface_trt.runtime.sampling.pipeline import prepare_references
    from flashface_trt.runtime.sampling.sampler import sample

    from .bench_torch import sd15_random
    from .workload import Workload, make_denoiser

    dtype = torch.float16 if precision == "fp16" else torch.float32
    t0 = time.perf_counter()
    models = tiny_models("cuda", dtype) if preset == "tiny" else sd15_random("cuda", dtype)
    build_s = time.perf_counter() - t0
    plain, static = (
        TorchBackend(models, TORCH_PRESETS["eager"]),
        TorchBackend(models, TORCH_PRESETS["static"]),
    )
    workload = Workload(size, size, refs, steps)
    other = prepare_references([synthetic_face(seed=100 + i) for i in range(refs)])

    def loop(backend: TorchBackend, second: bool) -> tuple[Any, float]:
        ident = identity_from_crops(backend.encode_references, other) if second else None
        den, _, prepared = make_denoiser(backend, workload, False, ident)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.inference_mode():
            start.record()
            z = sample(den, prepared.x, prepared.steps)
            end.record()
        end.synchronize()
        return z.float(), start.elapsed_time(end) / 1e3

    def rel(z: Any, ref: Any) -> float:
        return float((z - ref).abs().max() / ref.abs().max())

    errors = {}
    for second, label in ((False, "capture_run"), (True, "replay_run_other_identity")):
        errors[label] = rel(loop(static, second)[0], loop(plain, second)[0])
    captures_after_two = static.graphs.captures
    times = {
        name: statistics.median(loop(backend, True)[1] for _ in range(repeats))
        for name, backend in (("plain", plain), ("static", static))
    }
    bound = LOOP_BOUND[precision]
    ok = all(e <= bound for e in errors.values()) and captures_after_two == 2
    return {
        "status": "ok" if ok else "failed",
        "workload": {"preset": preset, "size": size, "refs": refs, "steps": steps, "precision": precision},
        "z0_rel_err_vs_plain_sampler": errors,
        "bound": bound,
        "captures": captures_after_two,
        "seconds": {"model_build": build_s, **{f"loop_{k}": v for k, v in times.items()}},
        "ms_per_step": {k: 1e3 * v / steps for k, v in times.items()},
        "loop_speedup": times["plain"] / times["static"],
        "peak_memory_bytes": torch.cuda.max_memory_allocated(),
    }


PARTS = {
    "cuda": lambda: cuda_layer(),
    "tiny": lambda: torch_static("tiny", 128, 4, 10, "fp32"),
    "w768": lambda: torch_static("sd15-random", 768, 4, 30, "fp16"),
}
MIN_SECONDS = {"cuda": 5, "tiny": 30, "w768": 240}  # a part starts only with this much budget left


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine()}
    for name in ("torch", "cuda.bindings", "cupy", "tensorrt", "onnxruntime"):
        try:
            module = __import__(name, fromlist=["__version__"])
            env[name] = str(getattr(module, "__version__", "?"))
        except ImportError:
            env[name] = None
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")), help="folder of the record"
    )
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--budget-s", type=float, default=540.0, help="parts that would not fit are skipped")
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        p.error(f"unknown parts {unknown}; known: {', '.join(PARTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gpu_check.json"
    record: dict[str, Any] = {"environment": environment(), "parts": {}}
    t0 = time.perf_counter()
    for name in parts:
        left = args.budget_s - (time.perf_counter() - t0)
        if left < MIN_SECONDS[name]:
            result: dict[str, Any] = {"status": "skipped", "reason": f"{left:.0f} s of the budget left"}
        else:
            start = time.perf_counter()
            try:
                result = PARTS[name]()
            except Exception as exc:  # recorded, and the other parts still run
                result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
            result["wall_s"] = time.perf_counter() - start
        record["parts"][name] = result
        record["wall_s"] = time.perf_counter() - t0
        path.write_text(json.dumps(record, indent=1))  # written after every part: a timeout keeps the rest
        print(f"{name:5s} {result['status']:8s} {result.get('reason', '')}", flush=True)
    print(f"record -> {path}")
    return 1 if any(r["status"] == "failed" for r in record["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())

"""The one GPU check that decides: every part in one 10-minute device call, a JSON record rewritten
after each part.

Parts, in order of value, each in its own process with its own time limit (a failing part keeps
its traceback, a part past its limit is stopped, and the next one runs):
  w768      W768 fp16: the official implementation (`--official`: a checkout of ali-vilab/FlashFace)
            against ours in each PyTorch preset (eager, static graph, compiled, channels-last), loop
            and end to end, fresh and cached identity (`benchmarks.suite`)
  numerics  fp16 vs fp32 (eps, image PSNR), ours vs the official pattern, the official UNet loading ours
  peak      the measured fp16 matmul rate and each preset's loop as a share of it
  profile   torch.profiler's top kernels of one step, with attention / GroupNorm / conv / GEMM shares
  batching  1, 2, 4, 8 concurrent W768 requests, step-level batched vs one after another (rows 24)
  tensorrt  `TrtBackend` on real CUDA through a TensorRT double whose kernels are the exported
            PyTorch modules (`benchmarks.cuda_trt`): allocation, alignment, K/V, capture, replay,
            profiles; its images against ONNX Runtime's
  cuda      `runtime/backends/cuda.py` against the driver: copies, refilled-table replays, capture error
  compiled  the compiled preset at W768 (last: its compilation may take what budget is left)

`--dry-run` rehearses every part on the CPU at tiny sizes (the `cuda` and `tensorrt` parts through
the NumPy doubles of tests/fakes); without it and without CUDA each part records `skipped`.

    bash benchmarks/gpu.sh wheels /work/official       # here, once: .whl/ and .official/ to carry
    bash benchmarks/gpu.sh check                       # on the GPU (carry .whl and .official)
    python -m benchmarks.gpu_check --dry-run --json /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ORDER = ("w768", "numerics", "peak", "profile", "batching", "tensorrt", "cuda", "compiled")
SECONDS = {"cuda": 30}  # each part's time limit (the others: gpu_parts.SECONDS)
MIN_START_S = 15  # a part starts only with this much of the budget left


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


def cuda_part(dry: bool) -> dict[str, Any]:
    """`cuda_layer` on the driver, or in a dry run through the CUDA double (tests/fakes)."""
    if not dry:
        return cuda_layer()
    import pytest

    from tests.fakes import install

    with pytest.MonkeyPatch.context() as mp:
        install(mp)
        return {**cuda_layer(rows=3, row_floats=64, replays=5, mib=1), "cuda": "the CUDA double"}


def run_part(name: str, dry: bool, official: Path | None, work: Path) -> dict[str, Any]:
    """One part in this process: its record, or `failed` with the traceback."""
    try:
        if name == "cuda":
            return cuda_part(dry)
        from .gpu_parts import PARTS, Sizes

        return PARTS[name](Sizes.make(dry, official, work))
    except Exception as exc:  # recorded: the other parts still run
        return {
            "status": "failed",
            "reason": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine()}
    for name in (
        "torch",
        "cuda.bindings",
        "cupy",
        "tensorrt",
        "onnxruntime",
        "ftfy",
        "polygraphy",
        "onnxslim",
    ):
        try:
            module = __import__(name, fromlist=["__version__"])
            env[name] = str(getattr(module, "__version__", "?"))
        except ImportError:
            env[name] = None
    return env


def device_name() -> str:
    from flashface_trt.runtime.backends.cuda import device_count, device_info

    return device_info(0).name if device_count() else f"no CUDA device ({platform.processor() or 'CPU'})"


def write_atomic(path: Path, record: dict[str, Any]) -> None:
    """The record as JSON, replacing the file in one rename (a reader never sees half of it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, path)


def child(name: str, limit: float, dry: bool, official: Path | None, work: Path) -> dict[str, Any]:
    """Run one part in a child process within `limit` seconds; its record (or why there is none)."""
    out = work / f"{name}.part.json"
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--run-part", name, "--work", str(work)]
    cmd += (["--dry-run"] if dry else []) + (["--official", str(official)] if official else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-2000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"status": "failed", "reason": f"stopped at its {limit:.3g} s limit", "stderr_tail": tail}
    if not out.is_file():
        return {
            "status": "failed",
            "reason": f"exit code {proc.returncode}, no record",
            "stderr_tail": proc.stderr[-2000:],
        }
    result = json.loads(out.read_text())
    if proc.stdout.strip():
        result["stdout_tail"] = proc.stdout[-1500:]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=Path(os.environ.get("OUT", "/tmp")) / "gpu_check.json")
    p.add_argument("--parts", default=",".join(ORDER), help=f"comma-separated, of {', '.join(ORDER)}")
    p.add_argument("--dry-run", action="store_true", help="every part on the CPU at tiny sizes (CI)")
    p.add_argument("--official", type=Path, help="a checkout of ali-vilab/FlashFace (the official baseline)")
    p.add_argument(
        "--budget-s", type=float, default=450.0, help="the whole check's time (under 8 min on an H200)"
    )
    p.add_argument("--run-part", choices=ORDER, help=argparse.SUPPRESS)  # the child process of one part
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_part:
        result = run_part(args.run_part, args.dry_run, args.official, args.work)
        write_atomic(args.work / f"{args.run_part}.part.json", result)
        return 0
    parts = [x for x in args.parts.split(",") if x]
    unknown = [x for x in parts if x not in ORDER]
    if unknown:
        p.error(f"unknown parts {unknown}; known: {', '.join(ORDER)}")
    if args.official is not None and not (args.official / "flashface").is_dir():
        p.error(f"--official {str(args.official)!r} is no checkout of ali-vilab/FlashFace (no flashface/)")
    from .gpu_parts import SECONDS as PART_SECONDS

    limits = {**PART_SECONDS, **SECONDS}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    record: dict[str, Any] = {
        "device": device_name(),
        "dry_run": args.dry_run,
        "environment": environment(),
        "limits_s": {n: limits[n] for n in parts},
        "parts": {},
    }
    t0 = time.perf_counter()
    for name in sorted(parts, key=ORDER.index):
        left = args.budget_s - (time.perf_counter() - t0)
        if left < MIN_START_S:
            result: dict[str, Any] = {"status": "skipped", "reason": f"{left:.0f} s of the budget left"}
        else:
            start = time.perf_counter()
            result = child(name, min(limits[name], left), args.dry_run, args.official, work)
            result["wall_s"] = time.perf_counter() - start
        record["parts"][name] = result
        record["wall_s"] = time.perf_counter() - t0
        write_atomic(args.json, record)  # after every part: a stopped call keeps what was done
        print(
            f"{name:9s} {result['status']:8s} {result.get('wall_s', 0):6.1f} s {result.get('reason', '')}",
            flush=True,
        )
    print(f"record -> {args.json}")
    return 1 if any(r["status"] == "failed" for r in record["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())

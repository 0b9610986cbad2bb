"""Open-loop load on `flashface-trt serve`: throughput, latency, queueing delay, overhead vs `generate()`.

Against a running service (`--url`, `--api-key`), or, without `--url`, one started in this
process (uvicorn in a thread on 127.0.0.1, the backend named by the model flags; default the
tiny preset). The direct calls run the same backend settings and request: on the in-process
service's own backend (on its worker thread, while no job runs), else on a backend loaded here
from the same model flags, so `--url` needs the flags the service was started with.

    python -m benchmarks.serve_load --jobs 40 --rate 1x --rate 2x     # tiny preset, in-process
    python -m benchmarks.serve_load --url http://gpu-box:8000 --api-key KEY --engines engines/ --rate 4
    python -m benchmarks.serve_load --deployments local,ray:1,ray:2 --rate 1x --rate 2x   # Ray Serve too

Order of a run:
1. register `--identities` drawn, already-cropped faces;
2. correctness before timing: the first service job's image must equal a direct `generate()` of
   the same request and seed, pixel for pixel (else exit 1, nothing recorded);
3. one warm-up job per identity, then `--direct-repeats` direct calls on a registered identity;
4. low load: `--low-load-jobs` jobs one after another: the service's per-job time, its overhead
   against the direct median (ms and ratio), and the capacity (1 / worker time per job);
5. for each `--rate` (jobs/s, or `<k>x` of that capacity): `--jobs` jobs arriving open-loop
   (Poisson or fixed inter-arrival, identities in turn), each followed to its end.

Every job is followed with `POST ?wait=true` (the answer comes the moment the job ends), so a
job's latency is submit -> succeeded as its client sees it; the queueing delay comes from the
job's record (started - created, the service's clock). The record, with every job's times, goes
to benchmarks/results/<device>-serve-<commit>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from flashface_trt.runtime.faces.images import synthetic_face
from flashface_trt.runtime.faces.references import load_references
from flashface_trt.runtime.sampling.pipeline import generate, register_identity
from flashface_trt.runtime.sampling.request import make_request

from .records import cpu_name, git_commit, write_record

PROMPT = "a handsome young man, with a cowboy hat, in the forest"
TERMINAL = ("succeeded", "failed", "cancelled")


# ---------------------------------------------------------------- statistics


def percentiles(values: list[float], qs: tuple[int, ...]) -> dict[str, float | None]:
    """`p<q>` of `values` (linear interpolation between order statistics); None when empty."""
    if not values:
        return {f"p{q}": None for q in qs}
    return {f"p{q}": float(v) for q, v in zip(qs, np.percentile(values, qs))}


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def summarize(jobs: list[dict[str, Any]], samples: int) -> dict[str, Any]:
    """Counts, throughput over the window (first submit to last end), latency and queueing delay."""
    done = [j for j in jobs if j["state"] == "succeeded"]
    ended = [j["completed_s"] for j in jobs if j["completed_s"] is not None]
    window = max(ended) - min(j["submitted_s"] for j in jobs) if ended else None
    images = sum(j["images"] for j in done)
    busy = busy_seconds([(j["started"], j["finished"]) for j in done])
    return {
        "submitted": len(jobs),
        "succeeded": len(done),
        "rejected": sum(j["status"] == 429 for j in jobs),
        "failed": sum(j["state"] not in ("succeeded", "rejected") for j in jobs),
        "window_s": window,
        "throughput_jobs_per_s": len(done) / window if window else None,
        "throughput_images_per_s": images / window if window else None,
        "latency_s": percentiles([j["latency_s"] for j in done], (50, 95, 99)),
        "queue_delay_s": percentiles([j["queue_delay_s"] for j in done], (50, 95)),
        "run_s_median": statistics.median(j["run_s"] for j in done) if done else None,
        # the share of the window with at least one job running (jobs that share steps overlap, so
        # their intervals are merged): near 1 means saturated
        "worker_utilization": busy / window if window else None,
        # jobs running at once on average while any ran (above 1: jobs shared denoising steps)
        "jobs_running_mean": sum(j["run_s"] for j in done) / busy if busy else None,
        "submit_lateness_s_max": max(j["submitted_s"] - j["scheduled_s"] for j in jobs),
        "images_per_job": samples,
    }


def arrivals(n: int, rate: float, kind: str, rng: np.random.Generator) -> list[float]:
    """Arrival offsets in seconds: the first at 0, then fixed 1/rate gaps or exponential ones."""
    if n == 0:
        return []
    gaps = np.full(n - 1, 1.0 / rate) if kind == "fixed" else rng.exponential(1.0 / rate, n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


# ---------------------------------------------------------------- the service


@contextmanager
def in_process_service(
    load: Callable[[], Any], data_dir: Path, size: tuple[int, int], **settings: Any
) -> Iterator[tuple[str, Any]]:
    """The service in this process: uvicorn in a thread on 127.0.0.1:<free port>; (url, Service)."""
    import uvicorn

    from flashface_trt.serve.app import create_app
    from flashface_trt.serve.config import ServeSettings
    from flashface_trt.serve.server import bind
    from flashface_trt.serve.service import Service

    cfg = ServeSettings(host="127.0.0.1", port=0, data_dir=data_dir, **settings)
    service = Service(cfg, load, size).start()
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_config=None, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", service
    finally:
        service.shutdown("cancel", 0.0)
        server.should_exit = True
        thread.join(30)
        sock.close()


@contextmanager
def ray_deployment(
    load: Callable[[], Any],
    data_dir: Path,
    size: tuple[int, int],
    config: Any,
    num_cpus: int | None = None,
    **settings: Any,
) -> Iterator[tuple[str, Any]]:
    """The service on a local Ray cluster (`num_cpus`: its CPUs, default all) on 127.0.0.1, deployed
    with `config` (a `serve.ray_config.RayConfig`; each model replica loads its backend with `load`);
    (url, None). The tests' Ray deployment is this one too."""
    import socket

    import ray
    from ray import serve

    from flashface_trt.serve.config import ServeSettings
    from flashface_trt.serve.ray_app import build_app

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = ServeSettings(host="127.0.0.1", port=port, data_dir=data_dir, **settings)
        serve.run(build_app(cfg, load, size, config), name=config.app_name, route_prefix="/")
        yield f"http://127.0.0.1:{port}", None
    finally:
        serve.shutdown()
        ray.shutdown()


def wait_ready(client: httpx.Client, timeout: float) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            r = client.get("/readyz")
            if r.status_code == 200:
                return r.json()
            if r.json().get("load_error"):
                raise RuntimeError(f"the service failed to load: {r.json()['load_error']}")
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{client.base_url} was not ready within {timeout} s")


def _torch_threads() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.get_num_threads()


def loader(args: argparse.Namespace) -> Callable[[], Any]:
    """The backend the model flags name, loaded as `flashface-trt serve` loads it."""
    from flashface_trt.backends import load_backend

    ns = argparse.Namespace(
        preset=args.preset,
        weights=args.weights,
        onnx=args.onnx,
        engines=args.engines,
        device=args.device,
        precision=args.precision,
        torch_preset=args.torch_preset,
        provider=args.provider,
    )

    threads = _torch_threads()

    def load() -> Any:
        if threads is not None:  # Ray workers start with one thread; the same count gives the same sums
            import torch

            torch.set_num_threads(threads)
        return load_backend(ns)

    return load


def face_files(n: int, root: Path) -> list[Path]:
    """`n` drawn faces (one per identity) as PNG files, uploaded as already-cropped faces."""
    paths = []
    for k in range(n):
        path = root / f"face{k}.png"
        synthetic_face(seed=100 + k).save(path, format="PNG")
        paths.append(path)
    return paths


def register(client: httpx.Client, path: Path) -> dict[str, Any]:
    files = [("photos", (path.name, path.read_bytes(), "image/png"))]
    r = client.post("/v1/identities", files=files, data={"cropped": "true"})
    if r.status_code != 200:
        raise RuntimeError(f"registering {path.name}: {r.status_code} {r.text}")
    return r.json()


# ---------------------------------------------------------------- one run


class Bench:
    """The service (URL, client), the direct path and the request every job and direct call uses."""

    def __init__(self, args: argparse.Namespace, url: str, service: Any, backend: Any) -> None:
        self.args, self.url, self.service, self.backend = args, url, service, backend
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.headers = headers
        self.client = httpx.Client(base_url=url, headers=headers, timeout=args.timeout_s + 30)
        self.fields = {
            "steps": args.steps,
            "height": args.height,
            "width": args.width,
            "num_samples": args.samples,
        }

    def body(self, identity: str, seed: int) -> dict[str, Any]:
        return {"identity": identity, "prompt": PROMPT, "seed": seed, **self.fields}

    def request(self, seed: int) -> Any:
        return make_request(PROMPT, "identity", seed=seed, **self.fields)

    def on_backend(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` where the service's backend lives (its worker thread), or on the local backend."""
        if self.service is not None:
            return self.service.worker.call(fn).result(timeout=self.args.timeout_s)
        return fn()

    def job(self, identity: str, seed: int) -> tuple[dict[str, Any], float]:
        """One job followed to its end with ?wait=true; (record, client seconds submit -> end)."""
        t0 = time.perf_counter()
        r = self.client.post("/v1/generations", params={"wait": "true"}, json=self.body(identity, seed))
        seconds = time.perf_counter() - t0
        if r.status_code != 200 or r.json()["state"] != "succeeded":
            raise RuntimeError(f"job failed: {r.status_code} {r.text}")
        return r.json(), seconds

    def image(self, url: str) -> np.ndarray:
        r = self.client.get(url)
        r.raise_for_status()
        return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))

    async def load_run(self, identities: list[str], offsets: list[float]) -> list[dict[str, Any]]:
        """Open loop: job i is sent at offsets[i] whatever the state of the others."""
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        timeout = httpx.Timeout(self.args.timeout_s + 30)
        async with httpx.AsyncClient(
            base_url=self.url, headers=self.headers, timeout=timeout, limits=limits
        ) as client:
            t0 = time.perf_counter()

            async def one(i: int, at: float) -> dict[str, Any]:
                await asyncio.sleep(max(at - (time.perf_counter() - t0), 0.0))
                identity = identities[i % len(identities)]
                sent = time.perf_counter() - t0
                job: dict[str, Any] = {
                    "index": i,
                    "identity": identity,
                    "scheduled_s": at,
                    "submitted_s": sent,
                }
                try:
                    r = await client.post(
                        "/v1/generations",
                        params={"wait": "true"},
                        json=self.body(identity, self.args.seed + 1000 + i),
                    )
                except httpx.HTTPError as exc:
                    return {**job, **_ended(None, None, "error", str(exc))}
                end = time.perf_counter() - t0
                if r.status_code != 200:
                    state = "rejected" if r.status_code == 429 else "error"
                    return {**job, **_ended(r.status_code, None, state, r.text)}
                record = r.json()
                out = {**job, **_ended(200, end, record["state"], record.get("error"))}
                out.update(latency_s=end - sent, images=len(record.get("images", [])), job_id=record["id"])
                out.update({k: record[k] for k in ("created", "started", "finished")})
                if record["started"] is not None:
                    out["queue_delay_s"] = record["started"] - record["created"]
                    out["run_s"] = record["finished"] - record["started"]
                return out

            return list(await asyncio.gather(*(one(i, at) for i, at in enumerate(offsets))))


def _ended(status: int | None, end: float | None, state: str, error: str | None) -> dict[str, Any]:
    return {
        "status": status,
        "completed_s": end,
        "state": state,
        "error": error,
        "latency_s": None,
        "images": 0,
        "queue_delay_s": None,
        "run_s": None,
    }


def measure(bench: Bench, paths: list[Path]) -> dict[str, Any] | None:
    """Every phase of the run; the record, or None when the correctness check fails."""
    args, backend = bench.args, bench.backend
    identities = [register(bench.client, p)["id"] for p in paths]
    refs = [[r.crop for r in load_references([p], None)] for p in paths]  # the CLI's --cropped faces

    # correctness before timing: the first job against a direct call of the same request and seed
    first, _ = bench.job(identities[0], args.seed)
    served = [bench.image(u) for u in first["images"]]
    direct = bench.on_backend(lambda: generate(backend, bench.request(args.seed), refs[0]))
    direct_px = [np.asarray(img.convert("RGB")) for img in direct]
    equal = len(served) == len(direct_px) and all(np.array_equal(a, b) for a, b in zip(served, direct_px))
    diff = max(
        (int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(served, direct_px)), default=-1
    )
    correctness = {"first_job_equals_direct": equal, "max_abs_pixel_diff": diff, "seed": args.seed}
    if not equal:
        print(f"correctness check failed: the service's image differs from generate() ({correctness})")
        return None
    print(f"correctness: the first job's {len(served)} image(s) equal generate()'s for seed {args.seed}")

    for k, identity in enumerate(identities[1:], 1):  # warm every identity (latents, K/V cache)
        bench.job(identity, args.seed + k)
    registered = bench.on_backend(lambda: register_identity(backend, refs[0]))

    def direct_call() -> dict[str, Any]:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        generate(backend, bench.request(args.seed), registered, timings=timings)
        return {"seconds": time.perf_counter() - t0, "timings": {k: round(v, 4) for k, v in timings.items()}}

    bench.on_backend(direct_call)  # warm-up: the registered identity's K/V enter the cache
    direct, low = [], []
    for i in range(max(args.direct_repeats, args.low_load_jobs)):  # interleaved: both see the same load
        if i < args.direct_repeats:
            direct.append(bench.on_backend(direct_call))
        if i < args.low_load_jobs:
            record, seconds = bench.job(identities[0], args.seed)
            t0 = time.perf_counter()
            bench.image(record["images"][0])
            low.append(
                {
                    "latency_s": seconds,
                    "image_fetch_s": time.perf_counter() - t0,
                    "queue_delay_s": record["started"] - record["created"],
                    "run_s": record["finished"] - record["started"],
                    "timings": record["timings"],
                }
            )
    direct_s = [d["seconds"] for d in direct]
    direct_med = statistics.median(direct_s)
    service_med = statistics.median(j["latency_s"] for j in low)
    run_med = statistics.median(j["run_s"] for j in low)
    capacity = 1.0 / run_med
    low_load = {
        "jobs": low,
        "latency_median_s": service_med,
        "run_median_s": run_med,
        "image_fetch_median_s": statistics.median(j["image_fetch_s"] for j in low),
    }
    overhead = {
        "direct_median_s": direct_med,
        "service_median_s": service_med,
        "per_job_ms": (service_med - direct_med) * 1000,
        "ratio_service_over_direct": service_med / direct_med,
        "worker_run_ratio_over_direct": run_med / direct_med,
    }
    print(
        f"direct generate() {direct_med * 1000:.1f} ms, service at low load {service_med * 1000:.1f} ms "
        f"(worker {run_med * 1000:.1f} ms): overhead {overhead['per_job_ms']:.1f} ms per job, "
        f"ratio {overhead['ratio_service_over_direct']:.3f}; capacity {capacity:.2f} jobs/s"
    )

    rng = np.random.default_rng(args.seed)
    runs = []
    for spec in args.rate:
        rate = capacity * float(spec[:-1]) if spec.endswith("x") else float(spec)
        offsets = arrivals(args.jobs, rate, args.arrivals, rng)
        jobs = asyncio.run(bench.load_run(identities, offsets))
        run = {
            "rate_spec": spec,
            "rate_jobs_per_s": rate,
            "arrivals": args.arrivals,
            **summarize(jobs, args.samples),
        }
        runs.append({**run, "jobs": jobs})
        lat, qd = run["latency_s"], run["queue_delay_s"]
        print(
            f"rate {spec} = {rate:.2f} jobs/s ({args.arrivals}): "
            f"{run['succeeded']}/{run['submitted']} succeeded, {run['rejected']} rejected; "
            f"{_num(run['throughput_jobs_per_s'])} jobs/s, {_num(run['throughput_images_per_s'])} images/s; "
            f"latency p50 {_ms(lat['p50'])} p95 {_ms(lat['p95'])} p99 {_ms(lat['p99'])}; "
            f"queueing p50 {_ms(qd['p50'])} p95 {_ms(qd['p95'])}; "
            f"worker {_ms(run['run_s_median'])} per job, busy {100 * (run['worker_utilization'] or 0):.0f}%"
        )
    return {
        "correctness": correctness,
        "direct": direct,
        "low_load": low_load,
        "overhead": overhead,
        "capacity_jobs_per_s": capacity,
        "runs": runs,
    }


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f} ms"


def rate_spec(text: str) -> str:
    try:
        ok = float(text[:-1] if text.endswith("x") else text) > 0
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"{text!r}: a positive rate in jobs/s, or '<k>x' of the capacity")
    return text


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running service (default: start one in this process)")
    p.add_argument("--api-key", help="bearer key for the service")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=["tiny"], help="the tiny model (the default)")
    src.add_argument("--weights", type=Path)
    src.add_argument("--onnx", type=Path)
    src.add_argument("--engines", type=Path)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=["auto", "fp32", "fp16"], default="auto")
    p.add_argument("--torch-preset", default="auto")
    p.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu")
    p.add_argument("--torch-threads", type=int, help="torch.set_num_threads in this process")
    p.add_argument("--jobs", type=int, default=40, help="jobs per rate (default 40)")
    p.add_argument(
        "--rate",
        type=rate_spec,
        action="append",
        help="jobs/s, or '<k>x' of the capacity (repeat; default 1x)",
    )
    p.add_argument("--arrivals", choices=["poisson", "fixed"], default="poisson")
    p.add_argument("--identities", type=int, default=3, help="registered identities, used in turn")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--samples", type=int, default=1, help="images per job")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--low-load-jobs", type=int, default=5)
    p.add_argument("--direct-repeats", type=int, default=5)
    p.add_argument("--timeout-s", type=float, default=600.0, help="longest wait for one job")
    p.add_argument("--max-queue", type=int, help="in-process service's queue (default: room for --jobs)")
    p.add_argument(
        "--deployments",
        default="local",
        help="without --url, what to start and measure in turn, comma-separated: 'local' (the service "
        "in this process) and 'ray:N' (a local Ray Serve cluster with N model replicas; the `ray` "
        "extra), e.g. local,ray:1,ray:2 (default local)",
    )
    p.add_argument(
        "--json", type=Path, help="record (default benchmarks/results/<device>-serve-<commit>.json)"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="the service's INFO logs")
    args = p.parse_args(argv)
    if not (args.weights or args.onnx or args.engines):
        args.preset = "tiny"
    args.rate = args.rate or ["1x"]
    args.deployments = [d.strip() for d in args.deployments.split(",") if d.strip()]
    for d in args.deployments:
        if d != "local" and not (d.startswith("ray:") and d[4:].isdigit() and int(d[4:]) >= 1):
            p.error(f"--deployments: {d!r} is neither 'local' nor 'ray:N' with N >= 1")
    for name in ("jobs", "identities", "steps", "samples", "low_load_jobs", "direct_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def device_name(backend: Any) -> str:
    device = getattr(backend, "device", None)
    if getattr(device, "type", None) == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return cpu_name()


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    load = loader(args)
    load_before = _loadavg()
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        paths = face_files(args.identities, Path(tmp))
        results: dict[str, dict[str, Any]] = {}
        if args.url:
            backend = load()[0]
            bench = Bench(args, args.url.rstrip("/"), None, backend)
            status = wait_ready(bench.client, args.timeout_s)
            result = measure(bench, paths)
            bench.client.close()
            if result is None:
                return 1
            results["url"] = result
        local_backend = None
        for name in [] if args.url else args.deployments:
            queue = args.max_queue or max(64, args.jobs)
            size = (args.height, args.width)
            data = Path(tmp) / f"data-{name.replace(':', '')}"
            opts = {"max_queue": queue, "warmup_steps": args.steps}
            if name == "local":
                deployment = in_process_service(load, data, size, **opts)
            else:
                from flashface_trt.serve.ray_config import RayConfig

                n = int(name[4:])
                config = RayConfig(n, n, num_gpus=0, num_cpus=0, app_name="serve-load")
                deployment = ray_deployment(load, data, size, config, **opts)
            print(f"-- {name}")
            with deployment as (url, service):
                if service is None and local_backend is None:
                    local_backend = load()[0]  # the direct calls run here, beside the replicas
                bench = Bench(args, url, service, local_backend)
                status = wait_ready(bench.client, args.timeout_s)
                if service is not None:
                    bench.backend = service.worker.backend
                result = measure(bench, paths)
                bench.client.close()
            if result is None:
                return 1
            results[name] = result
    result = next(iter(results.values()))
    try:
        import torch

        torch_version: str | None = torch.__version__
        threads: int | None = torch.get_num_threads()
    except ImportError:
        torch_version, threads = None, None
    record = {
        "benchmark": "serve_load",
        "device": device_name(bench.backend),
        "service_backend": status.get("backend"),
        "in_process": next(iter(results)) == "local",
        "cpu_count": os.cpu_count(),
        "loadavg_1min": {"before": load_before, "after": _loadavg()},  # other tenants of a shared machine
        "torch": torch_version,
        "torch_threads": threads,
        "commit": git_commit(),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "api_key"},
        **result,
    }
    if len(results) > 1:  # each deployment's figures, and Ray's cost per job against the local service
        record["deployments"] = results
        if "local" in results:
            local = results["local"]["low_load"]["latency_median_s"]
            record["overhead_vs_local_ms"] = {
                name: (r["low_load"]["latency_median_s"] - local) * 1000
                for name, r in results.items()
                if name != "local"
            }
            for name, ms in record["overhead_vs_local_ms"].items():
                print(f"{name}: {ms:.1f} ms per job over the local service at low load")
    write_record(record, "serve", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

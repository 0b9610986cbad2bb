"""Running the HTTP service in tests: a real uvicorn server on 127.0.0.1 and an ephemeral port.

`ServerHandle` is what the API tests talk to (a base URL and an httpx client); it is made by
`start_service` (in-process: uvicorn in a thread, the tiny preset on the CPU) here, and by other
deployments (a subprocess, Ray Serve) elsewhere, so that one set of test functions checks them all.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from flashface_trt.runtime.faces.images import synthetic_face

SIZE = (64, 64)  # the tiny preset's smallest output: seconds-long jobs on the CPU
KEYS = ("alpha-key", "beta-key")
RAY_APP = "flashface-test"
# the API tests' deployment: two keys, small limits (the tests reach each of them), one job at a
# time (a 3-row batch), so that queue positions and priorities are deterministic
API_SETTINGS = {
    "api_keys": KEYS,
    "max_queue": 3,
    "max_upload_mb": 1.0,
    "max_pixels": 200 * 200,
    "max_batch_rows": 3,
}


@dataclass
class ServerHandle:
    """A running deployment of the API: its URL, a client, and how to stop it."""

    url: str
    stop: Callable[[], None]
    service: Any = None  # the in-process Service, where there is one
    keys: tuple[str, ...] = ()
    clients: list[httpx.Client] = field(default_factory=list)

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        c = httpx.Client(base_url=self.url, headers=headers, timeout=60.0)
        self.clients.append(c)
        return c

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.stop()


def tiny_loader(
    detector=None, threads: int | None = None
) -> Callable[[], tuple[Any, Callable[[], Any] | None]]:
    """The service's backend loader: the tiny preset on the CPU (one instance per process).

    `threads`: torch's intra-op threads in the loading process. Ray starts its workers with
    OMP_NUM_THREADS=1; giving them this process's count makes their float32 sums, and so their
    images, bit for bit this process's.
    """

    def load():
        import torch

        from flashface_trt.models.backend import TorchBackend
        from flashface_trt.models.loading import tiny_models

        if threads is not None:
            torch.set_num_threads(threads)
        return TorchBackend(tiny_models()), (lambda: detector) if detector is not None else None

    return load


def photo_detector():
    """A detector for drawn photos: black centre -> no face, white centre -> two faces, else one."""
    from .scripted import scripted_detector

    one, _ = scripted_detector((180.0, 160.0, 420.0, 460.0))
    other, _ = scripted_detector((40.0, 40.0, 140.0, 150.0))
    from flashface_trt.runtime.faces.detection import DETECTOR

    mean = np.float32(DETECTOR.mean).reshape(3, 1)

    def run(images):
        logits, boxes, marks = one(images)
        k2 = int(np.argmax(other(images[:1])[0][0, :, 1]))
        extra = other(images)
        for b in range(len(images)):
            centre = (images[b][:, 320, 320:321] + mean).mean()
            if centre < 10:
                logits[b, :] = [5.0, -5.0]
            elif centre > 245:
                logits[b, k2], boxes[b, k2], marks[b, k2] = extra[0][b, k2], extra[1][b, k2], extra[2][b, k2]
        return logits, boxes, marks

    return run


def start_ray(data_dir: Path, replicas: int = 2, **settings: Any) -> ServerHandle:
    """The API on a local Ray Serve deployment (127.0.0.1): an ingress and `replicas` model replicas
    (the load benchmark's deployment, on 2 CPUs)."""
    from contextlib import ExitStack

    import torch

    from benchmarks.serve_load import ray_deployment
    from flashface_trt.serve.config import ServeSettings
    from flashface_trt.serve.ray_config import RayConfig

    settings.setdefault("warmup_steps", 1)
    config = RayConfig(
        replicas, replicas, num_gpus=0, num_cpus=0, identities_per_replica=2, app_name=RAY_APP,
        health_check_period_s=1.0,  # a killed replica is noticed (and replaced) within a second
    )
    load = tiny_loader(photo_detector(), threads=torch.get_num_threads())
    stack = ExitStack()
    url, _ = stack.enter_context(ray_deployment(load, data_dir, SIZE, config, num_cpus=2, **settings))
    wait_ready(url, 300)
    keys = ServeSettings(data_dir=data_dir, **settings).api_keys
    return ServerHandle(url, stack.close, None, keys)


class RayDeployment:
    """The tests' Ray Serve deployment (`start_ray`, 2 replicas, `API_SETTINGS`), started on first use.

    An idle local cluster still takes about a fifth of a core (measured: 0.2 CPU-seconds a
    second), so the conftest stops it after its process's last Ray test; a later one starts it again.
    """

    service = None  # no in-process Service

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.handle: ServerHandle | None = None

    def running(self) -> ServerHandle:
        if self.handle is None:
            self.handle = start_ray(self.data_dir, replicas=2, **API_SETTINGS)
        return self.handle

    @property
    def url(self) -> str:
        return self.running().url

    def client(self, key: str | None = None) -> httpx.Client:
        return self.running().client(key)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def start_service(data_dir: Path, load=None, **settings: Any) -> ServerHandle:
    """The service in this process: uvicorn in a thread, bound to 127.0.0.1:<free port>."""
    import uvicorn

    from flashface_trt.serve.app import create_app
    from flashface_trt.serve.config import ServeSettings
    from flashface_trt.serve.server import bind
    from flashface_trt.serve.service import Service

    settings.setdefault("warmup_steps", 1)
    cfg = ServeSettings(host="127.0.0.1", port=0, data_dir=data_dir, **settings)
    service = Service(cfg, load or tiny_loader(), SIZE).start()
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_config=None, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_ready(url, 300)

    def stop() -> None:
        service.shutdown("cancel", 0.0)
        server.should_exit = True
        thread.join(30)
        sock.close()

    return ServerHandle(url, stop, service, cfg.api_keys)


def serve_process(data_dir: Path, *flags: str) -> tuple[subprocess.Popen, str, list[str], threading.Thread]:
    """`flashface-trt serve --preset tiny` as a process on 127.0.0.1, ready; its stderr lines collected
    by the thread returned (it ends when the process does)."""
    from .conftest import REPO

    args = [sys.executable, "-m", "flashface_trt.cli", "serve", "--preset", "tiny", "--port", "0"]
    args += ["--data-dir", str(data_dir), "--warmup-steps", "0", *flags]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, cwd=REPO, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    try:
        for line in proc.stderr:  # type: ignore[union-attr]
            lines.append(line)
            found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            if found:
                break
        assert found, "the service never said where it listens:\n" + "".join(lines)
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
        reader.start()
        wait_ready(found.group(1), 300)
    except BaseException:
        proc.kill()
        raise
    return proc, found.group(1), lines, reader


def wait_ready(url: str, timeout: float, key: str | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} was not ready within {timeout} s")


@contextmanager
def service(data_dir: Path, **kwargs: Any) -> Iterator[ServerHandle]:
    handle = start_service(data_dir, **kwargs)
    try:
        yield handle
    finally:
        handle.close()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def face_png(seed: int = 0, size: int = 160) -> bytes:
    return png_bytes(synthetic_face(size, seed=seed))


def register(client: httpx.Client, *seeds: int, **form: Any) -> dict:
    """Register drawn, already-cropped faces; the identity's record."""
    files = [("photos", (f"face{s}.png", face_png(s), "image/png")) for s in seeds or (0,)]
    r = client.post("/v1/identities", files=files, data={"cropped": "true", **form})
    assert r.status_code == 200, r.text
    return r.json()


def generation(identity: str, **fields: Any) -> dict:
    return {
        "identity": identity,
        "prompt": "a man",
        "steps": 2,
        "height": SIZE[0],
        "width": SIZE[1],
        **fields,
    }


def wait_job(client: httpx.Client, job_id: str, timeout: float = 120.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = client.get(f"/v1/generations/{job_id}")
        assert r.status_code == 200, r.text
        if r.json()["state"] in ("succeeded", "failed", "cancelled"):
            return r.json()
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} did not end within {timeout} s")


def wait_record(
    client: httpx.Client, job_id: str, done: Callable[[dict], bool], what: str, timeout: float = 60.0
) -> dict:
    """The job's record once `done(record)` holds, polled until `timeout` seconds have passed."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        record = client.get(f"/v1/generations/{job_id}").json()
        if done(record):
            return record
        time.sleep(0.02)
    raise TimeoutError(f"job {job_id}: {what} not seen within {timeout} s (last record {record})")


def wait_state(client: httpx.Client, job_id: str, state: str, timeout: float = 60.0) -> dict:
    return wait_record(client, job_id, lambda r: r["state"] == state, f"state {state!r}", timeout)


def events(client: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    """The job's server-sent events, read to the end of the stream."""
    out = []
    with client.stream("GET", f"/v1/generations/{job_id}/events") as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind:
                out.append((kind, json.loads(line[6:])))
    return out


def metric(client: httpx.Client, name: str) -> float:
    """One sample of the Prometheus text at /metrics (0 when absent)."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))

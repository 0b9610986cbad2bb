"""Storage faults, shutdown and connection hygiene (issue 22 part A).

Every storage case runs twice: on a small tmpfs mounted as the data directory, filled to ENOSPC
and remounted read-only (where this process may mount: root in CI), and through an injected layer
(`tempfile.mkstemp` in the data directory hands out /dev/full, or refuses with EROFS), so that the
cases never only skip.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from flashface_trt.cli import main  # noqa: E402
from flashface_trt.runtime.sampling.request import GenerationRequest  # noqa: E402
from flashface_trt.serve.jobs import Job, JobBook  # noqa: E402
from flashface_trt.serve.records import STORAGE_DOWN, State  # noqa: E402

from .serving import (  # noqa: E402  # noqa: E402
    face_png,
    generation,
    register,
    serve_process,
    service,
    wait_job,
    wait_state,
)

REAL_MKSTEMP = tempfile.mkstemp


class Disk:
    """A data directory that can be filled and made read-only: a 2 MiB tmpfs, or an injected layer."""

    def __init__(self, root: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root, self.kind, self.full, self.ro = root, kind, False, False
        root.mkdir(parents=True)
        if kind == "tmpfs":
            mounted = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(root)], capture_output=True
            )
            if mounted.returncode != 0:
                pytest.skip(
                    f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); the injected layer runs"
                )
        else:
            monkeypatch.setattr(tempfile, "mkstemp", self._mkstemp)

    def _mkstemp(self, *args, **kwargs):
        inside = (
            Path(kwargs.get("dir") or tempfile.gettempdir()).resolve().is_relative_to(self.root.resolve())
        )
        if inside and self.ro:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        fd, name = REAL_MKSTEMP(*args, **kwargs)
        if inside and self.full:  # the temporary file exists; every write to it fails with ENOSPC
            os.close(fd)
            fd = os.open("/dev/full", os.O_WRONLY)
        return fd, name

    def fill(self) -> None:
        if self.kind == "injected":
            self.full = True
            return
        with open(self.root / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC

    def free(self) -> None:
        self.full = False
        (self.root / "filler").unlink(missing_ok=True)

    def read_only(self, on: bool) -> None:
        self.ro = on
        if self.kind == "tmpfs":
            mode = "remount,ro" if on else "remount,rw"
            subprocess.run(["mount", "-o", mode, str(self.root)], check=True)

    def close(self) -> None:
        if self.kind == "tmpfs":
            subprocess.run(["umount", "-l", str(self.root)], check=False)

    def leftovers(self) -> list[Path]:
        """Temporary files anywhere under the data directory (none may be left)."""
        return [p for p in self.root.rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(params=["tmpfs", "injected"])
def disk(request, tmp_path, monkeypatch):
    d = Disk(tmp_path / "data", request.param, monkeypatch)
    yield d
    d.close()


def _ready_becomes(c: httpx.Client, ready: bool, timeout: float = 10.0) -> httpx.Response:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = c.get("/readyz")
        if (r.status_code == 200) == ready:
            return r
        time.sleep(0.1)
    raise AssertionError(f"/readyz did not become {'ready' if ready else 'not ready'}: {r.text}")


def test_disk_full_mid_job_fails_that_job_and_the_worker_lives(disk):
    with service(disk.root, warmup_steps=0) as api:
        c = api.client()
        ident = register(c, 0)["id"]
        job = c.post("/v1/generations", json=generation(ident, steps=300)).json()
        wait_state(c, job["id"], "running")
        disk.fill()
        record = wait_job(c, job["id"])
        assert record["state"] == "failed" and record["error_kind"] == "storage", record
        assert "No space left" in record["error"] and str(disk.root) not in record["error"], record
        assert api.service.worker.is_alive()
        assert not list((disk.root / "jobs" / job["id"]).glob("*.png")) and not disk.leftovers()
        down = _ready_becomes(c, False)
        assert down.json()["reason"] == STORAGE_DOWN and str(disk.root) not in down.text
        refused = c.post("/v1/generations", json=generation(ident))
        assert refused.status_code == 503 and "not writable" in refused.json()["error"]
        disk.free()
        _ready_becomes(c, True)
        again = wait_job(c, c.post("/v1/generations", json=generation(ident)).json()["id"])
        assert again["state"] == "succeeded" and c.get(again["images"][0]).status_code == 200
        assert not disk.leftovers()


def test_read_only_data_dir_refuses_work_as_json_and_recovers(disk, monkeypatch):
    with service(disk.root, warmup_steps=0) as api:
        c = api.client()
        ident = register(c, 0)["id"]
        before = set((disk.root / "jobs").iterdir())
        disk.read_only(True)
        try:
            down = _ready_becomes(c, False)
            assert down.json()["reason"] == STORAGE_DOWN and str(disk.root) not in down.text
            for r in (
                c.post("/v1/generations", json=generation(ident)),
                c.post("/v1/identities", files=[("photos", ("f.png", b"x", "image/png"))]),
            ):
                assert r.status_code == 503 and "not writable" in r.json()["error"], r.text
            # a write failing after the probe said writable: the same JSON 503, nothing left behind
            monkeypatch.setattr(api.service.book.records, "writable", lambda: True)
            r = c.post("/v1/generations", json=generation(ident))
            assert r.status_code == 503 and set(r.json()) == {"error"}, r.text
            r = c.post(
                "/v1/identities",
                files=[("photos", ("g.png", face_png(7), "image/png"))],
                data={"cropped": "true"},
            )
            assert r.status_code == 503 and "not writable" in r.json()["error"], r.text
            assert sorted(p.name for p in (disk.root / "identities").iterdir()) == [ident]
            monkeypatch.undo()
        finally:
            disk.read_only(False)
        assert set((disk.root / "jobs").iterdir()) - before <= {disk.root / "jobs" / ".probe"}
        assert [j["state"] for j in c.get("/v1/generations").json()["jobs"]] == []  # none created
        _ready_becomes(c, True)
        assert (
            wait_job(c, c.post("/v1/generations", json=generation(ident)).json()["id"])["state"]
            == "succeeded"
        )
        assert not disk.leftovers()


def test_progress_does_not_rewrite_the_record(tmp_path):
    """Shared data directories (Ray replicas): steps go to progress.json, which readers merge; the
    record (with the prompt) is written at acceptance and at the end only."""
    book = JobBook(tmp_path, max_queue=4, max_jobs=10, recover=False)
    job = Job("j1", "o", "i", GenerationRequest(prompt="p" * 10000, steps=5, height=64, width=64))
    book.submit(job)
    path = tmp_path / "j1" / "record.json"
    first = path.stat()
    assert book.records.read("j1")["position"] == 0
    assert book.take(0.0) is job
    for k in range(1, 5):
        job.step = k
        book.progress(job)
        seen = book.records.read("j1")
        assert (seen["state"], seen["step"]) == ("running", k)
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    book.finish(job, State.SUCCEEDED)
    assert (
        book.records.read("j1")["state"] == "succeeded" and not (tmp_path / "j1" / "progress.json").exists()
    )
    single = JobBook(tmp_path / "single", max_queue=4, max_jobs=10)
    job2 = Job("j2", "o", "i", GenerationRequest(prompt="p", steps=5, height=64, width=64))
    single.submit(job2)
    single.take(0.0)
    job2.step = 3
    single.progress(job2)  # a single node keeps progress in memory: nothing written
    assert sorted(p.name for p in (tmp_path / "single" / "j2").iterdir()) == ["record.json"]


def test_the_job_list_survives_a_restart(tmp_path):
    with service(tmp_path, warmup_steps=0, api_keys=("k1", "k2")) as first:
        c = first.client("k1")
        ident = register(c, 0)["id"]
        done = wait_job(c, c.post("/v1/generations", json=generation(ident)).json()["id"])
    with service(tmp_path, warmup_steps=0, api_keys=("k1", "k2")) as second:
        listed = second.client("k1").get("/v1/generations").json()["jobs"]
        assert [j["id"] for j in listed] == [done["id"]] and listed[0]["state"] == "succeeded"
        assert "owner" not in listed[0] and "request" not in listed[0]
        assert second.client("k2").get("/v1/generations").json()["jobs"] == []


def test_cli_reports_full_and_unwritable_destinations(disk, capsys):
    out = disk.root / "o.png"
    tiny = [
        "generate",
        "--preset",
        "tiny",
        "--prompt",
        "x",
        "--height",
        "64",
        "--width",
        "64",
        "--steps",
        "1",
    ]
    disk.fill()
    assert main([*tiny, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and str(out) in errors[0] and "No space left" in errors[0], err
    assert not out.exists() and not disk.leftovers()
    disk.free()
    disk.read_only(True)
    try:
        t0 = time.monotonic()
        assert main([*tiny, "--out", str(disk.root / "sub" / "o.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert "not writable" in err and str(disk.root) in err and time.monotonic() - t0 < 5, err
    finally:
        disk.read_only(False)


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--preset", "tiny", "--prompt", "x", "--out", "/proc/e13.png"],
        ["detect", "--preset", "tiny", "PHOTO", "--out-dir", "/proc/faces"],
    ],
)
def test_cli_refuses_unwritable_destinations_before_the_work(tmp_path, capsys, args):
    from PIL import Image

    photo = tmp_path / "p.png"
    Image.new("RGB", (64, 64)).save(photo)
    t0 = time.monotonic()
    assert main([str(photo) if a == "PHOTO" else a for a in args]) == 2
    err = capsys.readouterr().err
    assert "/proc" in err and "not writable" in err and "Traceback" not in err, err
    assert time.monotonic() - t0 < 5  # before any model loads


def test_header_and_idle_timeouts_and_the_connection_cap():
    """uvicorn with `guarded_protocol`: a half-sent request head and an idle connection are closed
    after the header timeout, connections over the cap at once; whole requests are served."""
    import uvicorn

    from flashface_trt.serve.server import bind, guarded_protocol

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, http=guarded_protocol(0.5, 3), log_config=None, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=5).text == "ok"

        def closed_after(payload: bytes) -> float:
            s = socket.create_connection(("127.0.0.1", port))
            s.settimeout(10)
            t0 = time.monotonic()
            s.sendall(payload)
            assert s.recv(100) == b""  # closed by the server, no response
            s.close()
            return time.monotonic() - t0

        assert 0.3 < closed_after(b"GET / HTTP/1.1\r\nHost: x\r\n") < 3  # half-sent head
        assert 0.3 < closed_after(b"") < 3  # idle from the start
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        time.sleep(0.1)
        assert closed_after(b"") < 0.3  # over the cap: closed at once
        for s in held:
            s.close()
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_mid_step_exits_promptly_and_the_job_reads_interrupted(tmp_path, sig):
    """A real `serve --preset tiny` with a slow job (seconds per step): SIGTERM mid-step exits 0
    within --drain-s plus a few seconds, no traceback; after a restart the job reads cancelled."""
    drain = 1.0
    proc, url, lines, reader = serve_process(tmp_path, "--drain-s", str(drain))
    try:
        c = httpx.Client(base_url=url, timeout=60)
        ident = register(c, 0)["id"]
        job = c.post("/v1/generations", json=generation(ident, steps=50, height=1024, width=1024)).json()
        wait_state(c, job["id"], "running")
        time.sleep(2.0)  # inside a step (each takes several seconds at this size on the CPU)
        t0 = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(60)
        took = time.monotonic() - t0
        reader.join(5)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = "".join(lines)
    print(f"{sig.name} to exit mid-step: {took:.1f} s")
    assert code == 0 and took < drain + 8, (code, took, err[-3000:])
    assert "Traceback" not in err and "CancelledError" not in err and "KeyboardInterrupt" not in err, err
    with service(tmp_path, warmup_steps=0) as again:
        record = again.client().get(f"/v1/generations/{job['id']}").json()
        assert record["state"] in ("cancelled", "failed") and record["error_kind"] in (
            "interrupted",
            "cancelled",
        )
        assert record["step"] < 50


def _serve_ray(tmp_path: Path, *flags: str) -> tuple[subprocess.Popen, str, list[str]]:
    """`flashface-trt serve --ray --preset tiny` as a process on a free port; (process, url, its stderr)."""
    from .conftest import REPO

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    args = [sys.executable, "-m", "flashface_trt.cli", "serve", "--ray", "--preset", "tiny"]
    args += ["--port", str(port), "--data-dir", str(tmp_path), "--warmup-steps", "0", *flags]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ""}
    proc = subprocess.Popen(args, cwd=REPO, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
    return proc, f"http://127.0.0.1:{port}", lines


def _stop(proc: subprocess.Popen, lines: list[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(90)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = "".join(lines)
    assert code == 0 and "Traceback" not in err, (code, err[-3000:])


def _readyz(url: str) -> httpx.Response | None:
    try:
        return httpx.get(f"{url}/readyz", timeout=5)
    except httpx.HTTPError:
        return None


@pytest.mark.ray
def test_serve_ray_on_a_cpu_machine_runs_without_flags(tmp_path):
    """No GPU: `serve --ray --preset tiny` starts its replicas as is (auto: no GPU asked), serves,
    and SIGTERM exits 0; asked for a GPU it cannot get, the console and /readyz say why and how to
    fix it, and SIGTERM still exits 0."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc, url, lines = _serve_ray(tmp_path / "gpu", "--gpus-per-replica", "1")
    try:
        end = time.monotonic() + 240
        while time.monotonic() < end and "--gpus-per-replica 0" not in "".join(lines):
            time.sleep(0.5)
        assert "WARNING" in "".join(lines) and "--gpus-per-replica 0" in "".join(lines), "".join(lines)[
            -3000:
        ]
        r = None
        while time.monotonic() < end and (r is None or r.status_code == 200):
            time.sleep(1.0)
            r = _readyz(url)
        assert r is not None and r.status_code == 503 and r.json()["replicas"] == 0 and r.json()["reason"]
    finally:
        _stop(proc, lines)
    proc, url, lines = _serve_ray(tmp_path / "cpu")
    try:
        end = time.monotonic() + 300
        while time.monotonic() < end and ((r := _readyz(url)) is None or r.status_code != 200):
            time.sleep(1.0)
        assert r is not None and r.status_code == 200 and r.json()["replicas"] == 1, "".join(lines)[-3000:]
        c = httpx.Client(base_url=url, timeout=120)
        ident = register(c, 0)["id"]
        assert (
            wait_job(c, c.post("/v1/generations", json=generation(ident)).json()["id"])["state"]
            == "succeeded"
        )
    finally:
        _stop(proc, lines)


def test_unfinished_jobs_on_a_read_only_data_dir_at_start_up(disk):
    """A run died mid-job and the data directory is read-only at the next start: the service still
    starts, and the job reads failed (interrupted) from memory, listed too."""
    from flashface_trt.serve.config import ServeSettings
    from flashface_trt.serve.service import Service

    from .serving import SIZE, tiny_loader

    old = JobBook(disk.root / "jobs", max_queue=4, max_jobs=10, recover=False)
    old.submit(Job("j1", "public", "i", GenerationRequest(prompt="p", steps=5, height=64, width=64)))
    (disk.root / "identities").mkdir()
    disk.read_only(True)
    try:
        svc = Service(ServeSettings(host="127.0.0.1", port=0, data_dir=disk.root), tiny_loader(), SIZE)
        r = svc.job("public", "j1")
        assert (r["state"], r["error_kind"]) == ("failed", "interrupted"), r
        assert [j["id"] for j in svc.jobs("public")["jobs"]] == ["j1"]
        assert old.records.read("j1")["state"] == "queued"  # nothing could be written
    finally:
        disk.read_only(False)

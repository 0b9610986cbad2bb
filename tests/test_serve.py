"""The HTTP service end to end: a real uvicorn server on 127.0.0.1, the tiny preset on the CPU.

The API tests take a `ServerHandle` from the `api` fixture, so that another deployment (Ray Serve)
runs the very same functions.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from flashface_trt.runtime.sampling.executor import Stopped  # noqa: E402
from flashface_trt.serve.records import QueueFull, error_kind  # noqa: E402

from .serving import (  # noqa: E402
    API_SETTINGS,
    KEYS,
    SIZE,
    events,
    face_png,
    generation,
    metric,
    photo_detector,
    pixels,
    png_bytes,
    register,
    service,
    tiny_loader,
    wait_job,
    wait_record,
    wait_state,
)

LONG = 400  # steps of a job that runs long enough to be cancelled, queued behind, or timed out


@pytest.fixture(scope="module", params=["local", pytest.param("ray", marks=pytest.mark.ray)])
def api(request, tmp_path_factory):
    """The API under test: the single-node service, then the Ray Serve deployment (2 replicas),
    both with two keys, small limits and a detector with known answers (`API_SETTINGS`)."""
    if request.param == "ray":
        yield request.getfixturevalue("ray_api")
        return
    with service(
        tmp_path_factory.mktemp("serve"), load=tiny_loader(photo_detector()), **API_SETTINGS
    ) as handle:
        yield handle


def _cancel_all(client, ids):
    for job_id in ids:
        client.delete(f"/v1/generations/{job_id}")
    for job_id in ids:
        wait_job(client, job_id)


def test_health_and_auth(api):
    anon = api.client()
    assert anon.get("/healthz").status_code == 200 and anon.get("/readyz").status_code == 200
    for method, path in (("GET", "/v1/generations"), ("POST", "/v1/generations"), ("GET", "/metrics")):
        r = anon.request(method, path, json={} if method == "POST" else None)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.text)
    assert api.client("wrong").get("/v1/generations").status_code == 401


def test_register_generate_events_and_the_cli_image(api, tmp_path):
    """Same seed and inputs: the service's PNG is byte for byte the CLI's."""
    from flashface_trt.cli import main

    a = api.client(KEYS[0])
    ident = register(a, 3)
    assert ident["num_refs"] == 4 and ident["faces"] == [{"photo": "face3.png", "box": None, "score": None}]
    assert register(a, 3)["id"] == ident["id"]  # same photos, same id
    r = a.post("/v1/generations", json=generation(ident["id"], steps=3, seed=7, prompt="a woman"))
    assert r.status_code == 202, r.text
    job = r.json()
    seen = events(a, job["id"])
    progress = [e for kind, e in seen if kind == "progress"]
    assert progress == [{"step": k, "steps": 3} for k in range(1, 4)]
    assert seen[-1][0] == "state" and seen[-1][1]["state"] == "succeeded"
    record = a.get(f"/v1/generations/{job['id']}").json()
    assert record["seed"] == 7 and set(record["timings"]) >= {"text", "denoise", "decode"}
    png = a.get(record["images"][0])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    face = tmp_path / "face3.png"
    face.write_bytes(face_png(3))
    out = tmp_path / "cli.png"
    args = ["generate", "--preset", "tiny", "--face", str(face), "--cropped", "--prompt", "a woman"]
    args += [
        "--steps",
        "3",
        "--seed",
        "7",
        "--height",
        str(SIZE[0]),
        "--width",
        str(SIZE[1]),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert png.content == out.read_bytes()


def test_identities_belong_to_their_key(api):
    a, b = api.client(KEYS[0]), api.client(KEYS[1])
    ident = register(a, 5)
    assert a.get(f"/v1/identities/{ident['id']}").json() == ident
    assert b.get(f"/v1/identities/{ident['id']}").status_code == 404
    assert b.post("/v1/generations", json=generation(ident["id"])).status_code == 404
    job = a.post("/v1/generations", json=generation(ident["id"])).json()
    assert b.get(f"/v1/generations/{job['id']}").status_code == 404
    assert b.delete(f"/v1/generations/{job['id']}").status_code == 404
    assert wait_job(a, job["id"])["state"] == "succeeded"
    assert b.get(f"/v1/generations/{job['id']}/images/0").status_code == 404
    theirs = register(b, 5)
    assert theirs["id"] != ident["id"]  # the same photos under another key: its own identity
    # each key lists its own identities (the records GET /v1/identities/{id} gives), no other key's
    listed = [c.get("/v1/identities").json()["identities"] for c in (a, b)]
    assert ident in listed[0] and theirs not in listed[0], listed
    assert theirs in listed[1] and ident not in listed[1], listed
    assert b.delete(f"/v1/identities/{ident['id']}").status_code == 404
    assert a.delete(f"/v1/identities/{ident['id']}").status_code == 204
    assert a.get(f"/v1/identities/{ident['id']}").status_code == 404
    assert ident not in a.get("/v1/identities").json()["identities"]


def test_cancel_queue_priority_and_429(api):
    a = api.client(KEYS[0])
    ident = register(a, 1)["id"]
    if api.service is None:  # Ray: one job first, so that the router knows which replica holds the
        # identity before the queue fills (else a job may go to the idle replica: no queue position)
        warm = a.post("/v1/generations", json=generation(ident)).json()
        assert wait_job(a, warm["id"])["state"] == "succeeded"
    long = a.post("/v1/generations", json=generation(ident, steps=LONG)).json()
    wait_state(a, long["id"], "running")
    low = a.post("/v1/generations", json=generation(ident, priority=0)).json()
    high = a.post("/v1/generations", json=generation(ident, priority=5)).json()
    assert high["position"] == 0 and a.get(f"/v1/generations/{low['id']}").json()["position"] == 1
    spare = a.post("/v1/generations", json=generation(ident)).json()
    full = a.post("/v1/generations", json=generation(ident))
    assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
    cancelled = a.delete(f"/v1/generations/{spare['id']}").json()  # queued: removed at once
    assert cancelled["state"] == "cancelled"
    assert a.get(f"/v1/generations/{spare['id']}").json()["state"] == "cancelled"
    wait_record(a, long["id"], lambda r: r["step"] >= 1, "a first step")
    a.delete(f"/v1/generations/{long['id']}")  # running: stops at the next step boundary
    stopped = wait_job(a, long["id"])
    assert stopped["state"] == "cancelled" and 0 < stopped["step"] < LONG, stopped
    done_low, done_high = wait_job(a, low["id"]), wait_job(a, high["id"])
    assert done_low["state"] == done_high["state"] == "succeeded"
    assert done_high["started"] < done_low["started"]  # higher priority first


@pytest.mark.parametrize(
    "body, status, field",
    [
        ({"steps": 0}, 422, "steps"),
        ({"steps": 1.5}, 422, "steps"),
        ({"height": 100}, 422, "height"),
        ({"guide_rescale": 2}, 422, "guide_rescale"),
        ({"face_bbox": [0.6, 0.2, 0.3, 0.5]}, 422, "face_bbox"),
        ({"recipe": "fastest"}, 422, "recipe"),
        ({"priority": 1000}, 422, "priority"),
        ({"steps": True}, 422, "steps"),  # strict types: no bool for an integer, no string for a number
        ({"priority": "1"}, 422, "priority"),
        ({"timeout_s": "10"}, 422, "timeout_s"),
        ({"sampler": "euler"}, 422, "sampler"),
        ({"identity": "no-such-identity"}, 404, None),
    ],
)
def test_bad_generation_requests(api, body, status, field):
    a = api.client(KEYS[0])
    ident = register(a, 0)["id"]
    r = a.post("/v1/generations", json={**generation(ident), **body})
    assert r.status_code == status, r.text
    assert r.json().get("field") == field and r.json()["error"]
    if field and field in body and field not in ("sampler",):
        assert str(body[field]).split(".")[0].strip("[") in r.json()["error"]


def test_bad_uploads(api):
    a = api.client(KEYS[0])
    post = a.post

    def upload(name, data, **form):
        return post("/v1/identities", files=[("photos", (name, data, "image/png"))], data=form)

    r = upload("notes.png", b"not an image")
    assert r.status_code == 422 and "notes.png" in r.json()["error"]
    truncated = face_png(1)[:300]
    r = upload("cut.png", truncated)
    assert r.status_code == 422 and "cut.png" in r.json()["error"]
    from PIL import Image

    r = upload("big.png", png_bytes(Image.new("RGB", (300, 300), (90, 90, 90))))
    assert r.status_code == 413 and "big.png" in r.json()["error"]  # the pixel guard
    r = upload("huge.png", b"\0" * (2 << 20))
    assert r.status_code == 413  # over --max-upload-mb, refused before it is parsed
    r = upload("dark.png", png_bytes(Image.new("RGB", (120, 150), (0, 0, 0))))
    assert r.status_code == 422 and "no face found in 'dark.png'" in r.json()["error"]
    group = png_bytes(Image.new("RGB", (150, 120), (255, 255, 255)))
    r = upload("group.png", group)
    assert r.status_code == 422 and "2 faces found in 'group.png'" in r.json()["error"]
    r = upload("group.png", group, largest_face="true")
    assert r.status_code == 200 and r.json()["faces"][0]["box"] is not None
    person = upload("person.png", face_png(2, size=150))
    assert person.status_code == 200 and person.json()["faces"][0]["score"] > 0.9
    assert post("/v1/identities", data={"cropped": "true"}).status_code == 422  # no photos


def test_one_failed_job_does_not_take_the_service_down(api):
    a = api.client(KEYS[0])
    ident = register(a, 0)["id"]
    if api.service is None:
        pytest.skip("fault injection needs the service in this process")
    backend = api.service.worker.backend
    decode, calls = backend.decode, []

    def out_of_memory(z):
        if not calls:
            calls.append(z)
            raise MemoryError("CUDA out of memory (simulated)")
        return decode(z)

    backend.decode = out_of_memory
    try:
        failed = wait_job(a, a.post("/v1/generations", json=generation(ident)).json()["id"])
        ok = wait_job(a, a.post("/v1/generations", json=generation(ident)).json()["id"])
    finally:
        backend.decode = decode
    assert (
        failed["state"] == "failed"
        and failed["error_kind"] == "out_of_memory"
        and "out of memory" in failed["error"]
    )
    assert ok["state"] == "succeeded"
    late = wait_job(a, a.post("/v1/generations", json=generation(ident, timeout_s=0.001)).json()["id"])
    assert late["state"] == "failed" and late["error_kind"] == "timeout" and "deadline" in late["error"]
    assert metric(a, 'flashface_errors_total{kind="out_of_memory"}') >= 1


def test_wait_returns_the_finished_job(api):
    a = api.client(KEYS[0])
    ident = register(a, 0)["id"]
    r = a.post("/v1/generations?wait=true", json=generation(ident))
    assert r.status_code == 200 and r.json()["state"] == "succeeded" and len(r.json()["images"]) == 1


def test_restart_keeps_identities_and_jobs(tmp_path):
    # one job at a time: 'running' is said from a job's first step on, and a second job that fits the
    # batch would run (and finish) beside the long one instead of staying queued
    with service(tmp_path, warmup_steps=0, max_batch_rows=3) as first:
        c = first.client()
        ident = register(c, 4)
        done = wait_job(c, c.post("/v1/generations", json=generation(ident["id"])).json()["id"])
        image = c.get(done["images"][0]).content
        long = c.post("/v1/generations", json=generation(ident["id"], steps=LONG)).json()
        wait_state(c, long["id"], "running")
        queued = c.post("/v1/generations", json=generation(ident["id"])).json()
    with service(tmp_path, warmup_steps=0) as second:  # the first was stopped with 'cancel'
        c = second.client()
        assert c.get(f"/v1/identities/{ident['id']}").json() == ident
        again = c.get(f"/v1/generations/{done['id']}").json()
        assert again["state"] == "succeeded" and c.get(again["images"][0]).content == image
        for job in (long, queued):
            record = c.get(f"/v1/generations/{job['id']}").json()
            assert record["state"] == "cancelled" and "shut down" in record["error"], record
        new = wait_job(c, c.post("/v1/generations", json=generation(ident["id"])).json()["id"])
        assert new["state"] == "succeeded"  # the stored latents serve the new process


def test_identities_with_crops_of_another_size_are_refused_by_name(tmp_path):
    """Identities stored by networks that take 224 px crops, then served by the tiny preset's 64 px
    ones: a job for one fails naming the identity and both sizes; registering again serves."""

    def load_224():
        from dataclasses import replace

        from flashface_trt.models.backend import TorchBackend
        from flashface_trt.models.loading import tiny_models

        return TorchBackend(replace(tiny_models(), ref_size=224)), None

    with service(tmp_path, warmup_steps=0, load=load_224) as first:
        old = register(first.client(), 4)["id"]
    with service(tmp_path, warmup_steps=0) as second:
        c = second.client()
        failed = wait_job(c, c.post("/v1/generations", json=generation(old)).json()["id"])
        assert failed["state"] == "failed", failed
        assert old in failed["error"] and "224 px" in failed["error"] and "64 px" in failed["error"], failed
        new = register(c, 4)["id"]
        assert new != old  # crops of another size: another identity
        again = c.post("/v1/generations", json=generation(new)).json()
        assert wait_job(c, again["id"])["state"] == "succeeded"


def test_a_stopped_worker_leaves_no_job_running(tmp_path):
    """A job the worker holds when its loop stops without the job having been cancelled (one taken
    from the queue after `shutdown`'s cancellations) ends cancelled, not 'running' on disk."""
    with service(tmp_path, warmup_steps=0) as api:
        c = api.client()
        ident = register(c, 4)["id"]
        job = c.post("/v1/generations", json=generation(ident, steps=LONG)).json()
        wait_state(c, job["id"], "running")
        api.service.worker.stopping.set()
        api.service.worker.join(60)
        assert not api.service.worker.is_alive()
        record = c.get(f"/v1/generations/{job['id']}").json()
        assert record["state"] == "cancelled" and "shut down" in record["error"], record
        assert record["step"] < LONG


@pytest.mark.slow
def test_bounded_load(tmp_path):
    """8 clients, 60 jobs of two sizes and three identities, some cancelled: every job ends."""
    import resource

    with service(tmp_path, max_queue=64, warmup_steps=0) as api:
        admin = api.client()
        idents = [register(admin, s)["id"] for s in range(3)]
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        results, statuses = [], []
        lock = threading.Lock()

        def client(worker: int) -> None:
            c = api.client()
            for i in range(worker, 60, 8):
                size = (64, 64) if i % 2 else (64, 128)
                body = generation(idents[i % 3], steps=1 + i % 2, height=size[0], width=size[1], seed=i)
                r = c.post("/v1/generations", json=body)
                with lock:
                    statuses.append(r.status_code)
                if r.status_code != 202:
                    continue
                job = r.json()
                if i % 7 == 0:
                    c.delete(f"/v1/generations/{job['id']}")
                record = wait_job(c, job["id"], 300)
                with lock:
                    results.append((i, record))

        threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert all(s == 202 for s in statuses) and len(results) == 60
        states = [r["state"] for _, r in results]
        assert set(states) <= {"succeeded", "cancelled"} and states.count("succeeded") >= 45, states
        assert all(r["state"] == "cancelled" for i, r in results if i % 7 == 0 and r["state"] != "succeeded")
        hits, misses = (
            metric(admin, "flashface_kv_cache_hits_total"),
            metric(admin, "flashface_kv_cache_misses_total"),
        )
        print(
            f"\nload: {states.count('succeeded')} succeeded, K/V cache {hits:.0f} hits / {misses:.0f} misses"
        )
        assert hits > misses > 0  # three identities, repeated: most steps skip the ReferenceNet
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        assert grown_mb < 300, grown_mb
        assert metric(admin, "flashface_queue_depth") == 0 and metric(admin, "flashface_running_jobs") == 0


@pytest.mark.slow
def test_sigterm_drains_then_exits_zero(tmp_path):
    """`flashface-trt serve` as a process: SIGTERM stops admissions (503), finishes the accepted jobs,
    exits 0; a new process serves their results."""
    import signal

    from .serving import serve_process

    proc, url, _, _ = serve_process(tmp_path, "--height", "64", "--width", "64", "--drain-s", "600")
    try:
        import httpx

        c = httpx.Client(base_url=url, timeout=60)
        ident = register(c, 2)["id"]
        long = c.post("/v1/generations", json=generation(ident, steps=100)).json()
        wait_state(c, long["id"], "running")
        queued = c.post("/v1/generations", json=generation(ident)).json()
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while c.get("/readyz").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = c.post("/v1/generations", json=generation(ident))
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]
        assert c.get(f"/v1/generations/{long['id']}").status_code == 200  # reads still work while draining
        assert proc.wait(300) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    with service(tmp_path, warmup_steps=0) as again:
        c = again.client()
        for job in (long, queued):
            assert wait_job(c, job["id"])["state"] == "succeeded"  # --shutdown finish (the default)


def test_jobs_share_denoising_steps(tmp_path):
    """Jobs of one size run in one batch, step by step (step-level batching); each image is the one the
    job gets alone, and the progress of each is its own."""
    with service(tmp_path, max_batch_rows=9, warmup_steps=0) as api:
        c = api.client()
        idents = [register(c, s)["id"] for s in (51, 52, 53)]
        bodies = [generation(idents[i], steps=3 + i, seed=60 + i) for i in range(3)]
        worker = api.service.worker
        before = len(worker.executor.batch_sizes)
        held, release = threading.Event(), threading.Event()
        gate = worker.call(lambda: (held.set(), release.wait(120)))  # the worker waits here...
        assert held.wait(60)
        jobs = [c.post("/v1/generations", json=b).json()["id"] for b in bodies]  # ...while all 3 queue
        release.set()
        gate.result(60)
        done = [wait_job(c, j) for j in jobs]
        assert all(r["state"] == "succeeded" and r["step"] == r["steps"] for r in done)
        assert max(worker.executor.batch_sizes[before:]) == 3  # every step of the first 3 shared
        together = [c.get(r["images"][0]).content for r in done]
        alone = []
        for body in bodies:  # now one at a time: each alone in its batch
            alone.append(
                c.get(wait_job(c, c.post("/v1/generations", json=body).json()["id"])["images"][0]).content
            )
        for a, b in zip(together, alone):
            diff = np.abs(pixels(a).astype(int) - pixels(b))
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # float32 sums of a larger batch


def _named(name: str, base: type = Exception) -> BaseException:
    """An exception of a class called `name` (how Ray's errors are told apart without importing Ray)."""
    return type(name, (base,), {})("lost")


@pytest.mark.parametrize(
    "make, kind",
    [
        (lambda: Stopped("cancelled", "by the client"), "cancelled"),
        (lambda: Stopped("timeout", "past its deadline"), "timeout"),
        (lambda: ValueError("bug"), "internal"),
        (lambda: MemoryError(), "out_of_memory"),
        (lambda: _named("OutOfMemoryError", RuntimeError), "out_of_memory"),
        (lambda: _named("GetTimeoutError"), "timeout"),
        (lambda: _named("ActorDiedError", type("RayActorError", (Exception,), {})), "replica_died"),
        (lambda: _named("ReplicaUnavailableError"), "replica_died"),
    ],
)
def test_one_map_of_error_kinds(make, kind):
    """The worker and the Ray ingress classify a failure by the same map."""
    assert error_kind(make()) == kind


def test_error_kinds_of_the_package_errors():
    from flashface_trt.runtime.errors import InputError, WeightsError

    assert error_kind(InputError("bad", "steps")) == "input"
    assert error_kind(WeightsError("corrupt")) == "model"
    assert error_kind(QueueFull("full", 3)) == "timeout"  # an accepted job that found no room in time

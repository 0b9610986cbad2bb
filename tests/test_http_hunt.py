"""Hostile HTTP input never gets a 500: every route with malformed ids, methods, bodies and uploads.

Every answer is below 500 and, for an error, the documented `{"error": message, "field": name}`
shape; HEAD on a GET route answers as GET without a body. Also: the async `?wait=true` and event
streams hold no thread per client (40 waiters), the per-key stream cap, SSE delivers every step.
"""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from .serving import (  # noqa: E402
    API_SETTINGS,
    KEYS,
    events,
    face_png,
    generation,
    photo_detector,
    png_bytes,
    register,
    service,
    tiny_loader,
    wait_job,
)

BAD_IDS = ("%00", "a%00b", "x" * 300, "%C3%A9t%C3%A9", "%2E%2E", "a.b", "%20", "%2Fetc", "..%5C..")
BAD_INDEXES = ("0.0", "-1", "1e0", "%2B0", "%EF%BC%90", "99999999999999999999", "0x0", " 0")
ID_ROUTES = (
    ("GET", "/v1/generations/{j}"),
    ("DELETE", "/v1/generations/{j}"),
    ("GET", "/v1/generations/{j}/events"),
    ("GET", "/v1/generations/{j}/images/0"),
    ("HEAD", "/v1/generations/{j}"),
    ("GET", "/v1/identities/{j}"),
    ("DELETE", "/v1/identities/{j}"),
)
WRONG_METHODS = (
    ("PUT", "/v1/generations"),
    ("PATCH", "/v1/identities/{i}"),
    ("POST", "/healthz"),
    ("DELETE", "/readyz"),
    ("POST", "/v1/generations/{j}"),
    ("PUT", "/v1/generations/{j}/images/0"),
    ("POST", "/v1/generations/{j}/events"),
    ("DELETE", "/metrics"),
)
GET_ROUTES = (
    "/healthz",
    "/readyz",
    "/metrics",
    "/",
    "/v1/generations",
    "/v1/generations/{j}",
    "/v1/generations/{j}/images/0",
    "/v1/generations/{j}/events",
    "/v1/identities",
    "/v1/identities/{i}",
    "/v1/models",
)
RAW_BODIES = (
    ("application/json", b"{"),
    ("application/json", b"not json"),
    ("application/json", b"[]"),
    ("application/json", b"null"),
    ("application/json", b'"text"'),
    ("application/json", b'{"identity": "x", "prompt": "a", "steps": NaN}'),
    ("application/json", b"\xff\xfe{}"),
    ("text/plain", b'{"identity": "x", "prompt": "a"}'),
    ("application/x-www-form-urlencoded", b"identity=x&prompt=a"),
    ("", b""),
)
FIELDS = (
    {"identity": "x" * 300},
    {"identity": "a\x00b"},
    {"identity": "../../etc"},
    {"identity": 7},
    {"steps": 10**30},
    {"seed": -1},
    {"height": 1e308},
    {"face_bbox": [0, 0, 1]},
    {"priority": None, "timeout_s": -1},
    {"prompt": ["a", "b"]},
    {"negative_prompt": {"a": 1}},
    {"extra": 1},
)
UPLOAD_NAMES = ("n" * 300 + ".png", "é" * 200 + ".png", "../../etc/passwd", "", "a\x00b.png", "./.", "..")


def _case_ids(cases):
    return [" ".join(str(p)[:40] for p in case) for case in cases]


@pytest.fixture(scope="module")
def hunt(tmp_path_factory):
    """The service with two keys and a finished job (its id: `j`) and an identity (`i`) of key 0."""
    with service(
        tmp_path_factory.mktemp("hunt"), load=tiny_loader(photo_detector()), **API_SETTINGS
    ) as api:
        a = api.client(KEYS[0])
        ident = register(a, 0)["id"]
        job = wait_job(a, a.post("/v1/generations", json=generation(ident)).json()["id"])
        assert job["state"] == "succeeded"
        yield api, a, {"j": job["id"], "i": ident}


def _shape(r: httpx.Response) -> None:
    """An error in the documented shape, or a success; never a 500."""
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code >= 400:
        body = r.json()
        assert isinstance(body, dict) and set(body) <= {"error", "field"}, body
        assert isinstance(body["error"], str) and body["error"], body
        assert body.get("field") is None or isinstance(body["field"], str)
        assert "/tmp" not in body["error"] and "flashface-upload" not in body["error"], body


@pytest.mark.parametrize(("method", "route", "bad"), [(m, r, b) for m, r in ID_ROUTES for b in BAD_IDS])
def test_malformed_ids_are_404(hunt, method, route, bad):
    _, a, _ = hunt
    r = a.request(method, route.format(j=bad))
    assert r.status_code == 404, r.text
    if method != "HEAD":
        _shape(r)


@pytest.mark.parametrize("k", BAD_INDEXES)
def test_image_index_is_a_plain_integer(hunt, k):
    _, a, ids = hunt
    r = a.get(f"/v1/generations/{ids['j']}/images/{k}")
    assert r.status_code in (404, 422), r.text
    _shape(r)


def test_image_zero_still_served(hunt):
    _, a, ids = hunt
    r = a.get(f"/v1/generations/{ids['j']}/images/0")
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")


@pytest.mark.parametrize(("method", "route"), WRONG_METHODS, ids=_case_ids(WRONG_METHODS))
def test_wrong_methods_are_405_in_shape(hunt, method, route):
    _, a, ids = hunt
    r = a.request(method, route.format(**ids))
    assert r.status_code == 405, r.text
    _shape(r)
    assert r.headers.get("allow"), r.headers


@pytest.mark.parametrize("route", GET_ROUTES)
def test_head_answers_as_get_without_a_body(hunt, route):
    _, a, ids = hunt
    get, head = a.get(route.format(**ids)), a.head(route.format(**ids))
    assert get.status_code == 200 and head.status_code == 200, (get.text, head.text)
    assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]


def test_unknown_routes_are_404_in_shape(hunt):
    _, a, _ = hunt
    for path in ("/v2/generations", "/v1/generations/x/y/z", "/v1/identities/x/y"):
        r = a.get(path)
        assert r.status_code in (404, 405), r.text
        _shape(r)


@pytest.mark.parametrize(("ctype", "raw"), RAW_BODIES, ids=_case_ids(RAW_BODIES))
def test_bad_bodies_are_4xx_in_shape(hunt, ctype, raw):
    _, a, _ = hunt
    headers = {"content-type": ctype} if ctype else {}
    r = a.post("/v1/generations", content=raw, headers=headers)
    assert 400 <= r.status_code < 500, r.text
    _shape(r)


def test_broken_json_names_no_position(hunt):
    """Broken JSON: no character position as `field`; the message says what is wrong."""
    _, a, _ = hunt
    r = a.post("/v1/generations", content=b'{"prompt": "a",', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "field" not in r.json(), r.text
    assert r.json()["error"].startswith("the body is not valid JSON: ")


@pytest.mark.parametrize("fields", FIELDS, ids=_case_ids([tuple(f) for f in FIELDS]))
def test_bad_fields_are_4xx_in_shape(hunt, fields):
    _, a, ids = hunt
    r = a.post("/v1/generations", json={**generation(ids["i"]), **fields})
    assert 400 <= r.status_code < 500, r.text
    _shape(r)


@pytest.mark.parametrize("name", UPLOAD_NAMES, ids=range(len(UPLOAD_NAMES)))
def test_upload_names(hunt, name):
    """Long, unicode, traversing or empty file names: a 4xx naming the client's file (cut short), or
    a registration; never the server's temporary path."""
    _, a, _ = hunt
    bad = a.post("/v1/identities", files=[("photos", (name, b"not an image", "image/png"))])
    assert bad.status_code == 422, bad.text
    _shape(bad)
    stem = name.replace("\x00", "%00").rsplit("/", 1)[-1][:20]  # httpx sends a NUL as %00
    if stem.strip("."):
        assert stem in bad.json()["error"]
    ok = a.post("/v1/identities", files=[("photos", (name, face_png(3), "image/png"))], data={"cropped": "1"})
    _shape(ok)
    assert ok.status_code == (200 if name else 422), ok.text  # a part without a file name is no file


def test_upload_messages_name_api_fields(hunt):
    _, a, _ = hunt
    group = png_bytes(Image.new("RGB", (150, 120), (255, 255, 255)))
    r = a.post("/v1/identities", files=[("photos", ("group.png", group, "image/png"))])
    assert r.status_code == 422 and "largest_face" in r.json()["error"], r.text
    assert "--largest-face" not in r.json()["error"]
    for form in ({"cropped": "maybe"}, {"photos": "text"}):
        _shape(a.post("/v1/identities", data=form))
    _shape(a.post("/v1/identities", json={"photos": []}))


def test_readyz_without_a_key_shows_no_job_ids(hunt):
    api, a, ids = hunt
    status = api.client().get("/readyz").json()
    assert isinstance(status["running"], int) and isinstance(status["queued"], int)
    assert ids["j"] not in json.dumps(status)


# ---------------------------------------------------------------- async waits and streams


def _hold(worker):
    """Hold the worker thread (jobs stay queued) until the returned event is set."""
    held, release = threading.Event(), threading.Event()
    gate = worker.call(lambda: (held.set(), release.wait(120)))
    assert held.wait(60)
    return release, gate


def test_waiters_hold_no_thread_and_the_stream_cap(tmp_path):
    """40 `?wait=true` clients: the process has no more threads than before them, a GET still
    answers; the 41st stream of the key gets 429 (another key is not capped); all end on cancel."""
    n = 40
    with service(tmp_path, api_keys=KEYS, max_queue=64, max_streams=n, max_batch_rows=3) as api:
        a = api.client(KEYS[0])
        ident = register(a, 0)["id"]
        finished = wait_job(a, a.post("/v1/generations", json=generation(ident)).json()["id"])
        book, headers = api.service.book, {"Authorization": f"Bearer {KEYS[0]}"}
        release, gate = _hold(api.service.worker)
        figures = {}

        async def main():
            async with httpx.AsyncClient(base_url=api.url, headers=headers, timeout=120) as c:
                await c.get("/v1/generations")  # the thread pool has its thread
                before, known = threading.active_count(), len(book.jobs)
                waits = []
                for i in range(n):  # one after another: the pool's one thread serves each submission
                    body = generation(ident)
                    waits.append(asyncio.create_task(c.post("/v1/generations?wait=true", json=body)))
                    while len(book.watchers) < i + 1:  # submitted, and now awaiting the book
                        await asyncio.sleep(0.01)
                await asyncio.sleep(0.5)
                during = threading.active_count()
                figures.update(before=before, during=during)
                assert during <= before + 1, (before, during)
                assert not any(w.done() for w in waits)
                r = await c.get(f"/v1/generations/{finished['id']}")
                assert r.status_code == 200 and r.json()["state"] == "succeeded"
                over = await c.post("/v1/generations?wait=true", json=generation(ident))
                assert over.status_code == 429 and "limit 40" in over.json()["error"], over.text
                assert len(book.jobs) == known + n  # refused before it was accepted
                assert (await c.get(f"/v1/generations/{finished['id']}/events")).status_code == 429
                other = await c.post(
                    "/v1/generations?wait=true",
                    json=generation("nobody"),
                    headers={"Authorization": f"Bearer {KEYS[1]}"},
                )
                assert other.status_code == 404  # another key's streams are its own
                ids = [job.id for job in book.pending()]
                for job_id in ids:
                    assert (await c.delete(f"/v1/generations/{job_id}")).status_code == 200
                done = await asyncio.gather(*waits)
                assert [r.status_code for r in done] == [200] * n
                assert {r.json()["state"] for r in done} == {"cancelled"}
                r = await c.get(f"/v1/generations/{finished['id']}/events")  # every slot was given back
                assert r.status_code == 200 and "event: state" in r.text

        try:
            asyncio.run(main())
        finally:
            release.set()
            gate.result(60)
        print(f"threads with {n} waiters: {figures}")


def test_events_arrive_in_order_without_polling(tmp_path):
    """The stream wakes once per step (no 20-per-second polling while the job waits), sends every
    step in order and ends with the terminal state."""
    with service(tmp_path) as api:
        c = api.client()
        ident = register(c, 0)["id"]
        svc, calls = api.service, []
        real = svc.next_events

        async def counted(*args):
            calls.append(args[2])
            return await real(*args)

        svc.next_events = counted
        release, gate = _hold(svc.worker)
        job = c.post("/v1/generations", json=generation(ident, steps=5)).json()["id"]
        got: list = []
        reader = threading.Thread(target=lambda: got.extend(events(c, job)))
        reader.start()
        threading.Event().wait(1.0)  # queued for a second: a polling stream would ask ~20 times
        release.set()
        gate.result(60)
        reader.join(120)
        assert [e for kind, e in got if kind == "progress"] == [{"step": k, "steps": 5} for k in range(1, 6)]
        assert got[-1][0] == "state" and got[-1][1]["state"] == "succeeded"
        assert len(calls) <= 5 + 2, calls

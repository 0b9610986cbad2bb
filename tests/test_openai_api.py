"""The OpenAI-compatible images API driven by the real `openai` SDK against a real uvicorn server
(the tiny preset on the CPU), and the same functions against the Ray Serve deployment."""

from __future__ import annotations

import base64
import time
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from flashface_trt.serve.openai_api import sign, url_secret  # noqa: E402

from .serving import (  # noqa: E402
    API_SETTINGS,
    KEYS,
    SIZE,
    face_png,
    generation,
    photo_detector,
    pixels,
    register,
    service,
    tiny_loader,
    wait_job,
    wait_state,
)

SIZE_WXH = f"{SIZE[1]}x{SIZE[0]}"  # OpenAI's size: width x height
MAX_QUEUE = API_SETTINGS["max_queue"]
FACES = [(f"face{s}.png", face_png(s), "image/png") for s in (1, 2)]
OURS = {"cropped": True, "steps": 2, "seed": 5}  # our own fields, as the SDK's extra_body


@pytest.fixture(scope="module", params=["local", pytest.param("ray", marks=pytest.mark.ray)])
def api(request, tmp_path_factory):
    """The single-node service, then the Ray Serve deployment (test_serve.py's `api` settings)."""
    if request.param == "ray":
        yield request.getfixturevalue("ray_api")
        return
    with service(
        tmp_path_factory.mktemp("openai"), load=tiny_loader(photo_detector()), **API_SETTINGS
    ) as handle:
        yield handle


def sdk(api, key: str = KEYS[0]):
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key=key, max_retries=0, timeout=120.0)


def decoded(response) -> list[np.ndarray]:
    return [pixels(base64.b64decode(item.b64_json)) for item in response.data]


def ours(client: httpx.Client, body: dict) -> list[np.ndarray]:
    """The images of a job of our own API (POST /v1/generations), once it succeeded."""
    r = client.post("/v1/generations", json=body)
    assert r.status_code == 202, r.text
    record = wait_job(client, r.json()["id"])
    assert record["state"] == "succeeded", record
    return [pixels(client.get(path).content) for path in record["images"]]


def test_edit_with_two_faces_registers_once_and_draws_our_apis_images(api):
    """images.edit with two photos (multipart image[]): the identity is registered (found again by
    content afterwards) and its images are our own API's for the same request, pixel for pixel."""
    a = api.client(KEYS[0])
    before = None if api.service is None else len(api.service.store)
    edited = sdk(api).images.edit(
        image=FACES, prompt="a man", n=2, size=SIZE_WXH, model="flashface", user="u1", extra_body=OURS
    )
    assert abs(edited.created - time.time()) < 300 and len(edited.data) == 2
    ident = register(a, 1, 2)  # the same photos through our API: the identity the edit registered
    if before is not None:
        assert len(api.service.store) == before + 1
    mine = ours(a, generation(ident["id"], seed=5, num_samples=2, prompt="a man"))
    got = decoded(edited)
    assert got[0].shape == (*SIZE, 3) and not np.array_equal(got[0], got[1])
    assert all(np.array_equal(x, y) for x, y in zip(got, mine))
    again = sdk(api).images.edit(image=FACES[0], prompt="a man", size=SIZE_WXH, extra_body=OURS)  # `image`
    assert len(again.data) == 1 and again.data[0].b64_json
    by_id = sdk(api).images.edit(image=[], prompt="a man", n=2, extra_body={**OURS, "identity": ident["id"]})
    generated = sdk(api).images.generate(
        prompt="a man", n=2, size=SIZE_WXH, extra_body={"identity": ident["id"], "steps": 2, "seed": 5}
    )
    assert all(np.array_equal(x, y) for x, y in zip(decoded(generated), mine))
    assert all(np.array_equal(x, y) for x, y in zip(decoded(by_id), mine))  # an identity, no photos


def test_url_answers_are_signed_links_fetched_without_a_key(api):
    a = api.client(KEYS[0])
    ident = register(a, 3)["id"]
    extra = {"identity": ident, "steps": 2, "seed": 9}
    client = sdk(api)
    linked = client.images.generate(prompt="a woman", size=SIZE_WXH, response_format="url", extra_body=extra)
    inline = client.images.generate(prompt="a woman", size=SIZE_WXH, extra_body=extra)
    url = linked.data[0].url
    r = httpx.get(url)  # no key
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert np.array_equal(pixels(r.content), decoded(inline)[0])
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    job_id = parts.path.split("/")[-2]
    forged = {**query, "sig": query["sig"][:-1] + ("0" if query["sig"][-1] != "0" else "1")}
    other_image = url.replace(f"/{job_id}/0?", f"/{job_id}/1?")
    for bad in (f"{parts.scheme}://{parts.netloc}{parts.path}?{urlencode(forged)}", other_image):
        refused = httpx.get(bad)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "invalid_signature"
    past = int(time.time()) - 1
    expired = {**query, "exp": past, "sig": sign(url_secret(KEYS), query["owner"], job_id, 0, past)}
    refused = httpx.get(f"{parts.scheme}://{parts.netloc}{parts.path}?{urlencode(expired)}")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "expired"


def test_errors_in_openais_shape_and_status(api):
    client = sdk(api)
    ident = register(api.client(KEYS[0]), 4)["id"]
    with pytest.raises(openai.AuthenticationError) as e:
        sdk(api, "wrong-key").images.generate(prompt="a man", extra_body={"identity": ident})
    assert e.value.code == "invalid_api_key" and e.value.response.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        sdk(api, "wrong-key").models.list()
    cases = [  # (extra fields, SDK error, OpenAI's param, code)
        ({"size": "100x64"}, openai.BadRequestError, "size", "invalid_value"),  # not a multiple of 8
        ({"size": "big"}, openai.BadRequestError, "size", "invalid_value"),
        ({"n": 0}, openai.BadRequestError, "n", "invalid_value"),
        ({"extra_body": {"steps": "2"}}, openai.BadRequestError, "steps", "invalid_value"),  # strictly typed
        ({"extra_body": {"colour": "red"}}, openai.BadRequestError, "colour", "unknown_parameter"),
        ({"response_format": "svg"}, openai.BadRequestError, "response_format", "invalid_value"),
        ({"model": "dall-e-3"}, openai.NotFoundError, "model", "model_not_found"),
    ]
    for given, error, param, code in cases:
        extra = {"identity": ident, **given.pop("extra_body", {})}
        with pytest.raises(error) as e:
            client.images.generate(prompt="a man", extra_body=extra, **given)
        assert (e.value.body["param"], e.value.code) == (param, code), e.value.body
        assert e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:  # FlashFace needs a face
        client.images.generate(prompt="a man")
    assert e.value.body["param"] == "identity" and "identity is required" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(prompt="a man", extra_body={"identity": "no-such-identity"})
    assert e.value.code == "not_found"
    with pytest.raises(openai.NotFoundError):  # another key's identity
        sdk(api, KEYS[1]).images.generate(prompt="a man", extra_body={"identity": ident})
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=FACES, prompt="a man", extra_body={"steps": "two", "cropped": True})
    assert e.value.body["param"] == "steps"
    with pytest.raises(openai.BadRequestError) as e:  # photos and an identity: which face?
        client.images.edit(image=FACES, prompt="a man", extra_body={"identity": ident})
    assert e.value.body["param"] == "image"
    raw = api.client(KEYS[0]).post("/v1/images/generations", content=b"{not json")
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    anon = api.client().get("/v1/generations")  # our own routes keep their own error shape
    assert anon.status_code == 401 and isinstance(anon.json()["error"], str)


def test_a_full_queue_is_rate_limit_error(api):
    if api.service is None:
        pytest.skip("the queue's limit on Ray: test_serve.py's test_cancel_queue_priority_and_429")
    a = api.client(KEYS[0])
    ident = register(a, 6)["id"]
    long = a.post("/v1/generations", json=generation(ident, steps=150)).json()  # the queue fills behind it
    wait_state(a, long["id"], "running")
    queued = [a.post("/v1/generations", json=generation(ident)).json() for _ in range(MAX_QUEUE)]
    assert all(job["state"] == "queued" for job in queued)
    try:
        with pytest.raises(openai.RateLimitError) as e:
            sdk(api).images.generate(prompt="a man", size=SIZE_WXH, extra_body={"identity": ident})
        assert e.value.code == "rate_limit_exceeded" and int(e.value.response.headers["retry-after"]) >= 1
    finally:
        for job in [long, *queued]:
            a.delete(f"/v1/generations/{job['id']}")
        for job in [long, *queued]:
            wait_job(a, job["id"], timeout=600)  # a running job stops at its next step


def test_models_list_the_served_model(api):
    models = sdk(api).models.list()
    assert [(m.id, m.object, m.owned_by) for m in models.data] == [("flashface", "model", "flashface-trt")]
    assert abs(models.data[0].created - time.time()) < 86400

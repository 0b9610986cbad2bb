"""OpenAI's images API (https://platform.openai.com/docs/api-reference/images) over the same service:
requests map onto the one request schema and go through `API.register` / `API.submit_record`; errors
on these paths only take OpenAI's shape `{"error": {"message", "type", "param", "code"}}` and codes.
No `from __future__ import annotations`: Ray Serve re-reads the closures' annotations in its replicas."""

import base64
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ..runtime.errors import FlashFaceError, InputError
from ..runtime.sampling.params import PARAMS, Param
from .records import NotFound, QueueFull, State, ended
from .service import API, PayloadTooLarge, Unavailable, wait_end

log = logging.getLogger(__name__)

MODEL_ID = "flashface"
URL_TTL_S = 3600  # lifetime of a `url` answer's link (OpenAI's last an hour too)
PHOTOS = ("image", "image[]")
IGNORED = frozenset({"user", "quality", "style", "background", "moderation", "safety_identifier"})  # no use
FORMATS = ("b64_json", "url")
FLAGS = {"true": True, "1": True, "false": False, "0": False}  # multipart booleans
REPLACED = {"num_samples": "n", "height": "size", "width": "size"}  # our names OpenAI's replace
EXTRA = frozenset(PARAMS) - set(REPLACED)  # our fields accepted beside OpenAI's
ERRORS = (  # exception -> status, OpenAI's error type and code
    ((ValueError, HTTPException), 400, "invalid_request_error", "invalid_value"),  # InputError, bad JSON
    (NotFound, 404, "invalid_request_error", "not_found"),
    (QueueFull, 429, "requests", "rate_limit_exceeded"),
    (PayloadTooLarge, 413, "invalid_request_error", "payload_too_large"),
    (Unavailable, 503, "server_error", "unavailable"),
    (FlashFaceError, 400, "invalid_request_error", "invalid_request"),
)


class OpenAIError(Exception):
    """An answer in OpenAI's error shape: HTTP status, error code, the parameter at fault, error type."""

    def __init__(self, status: int, message: str, code: str, field: str | None = None, kind: str = ""):
        super().__init__(message)
        self.status, self.code, self.field, self.kind = status, code, field, kind or "invalid_request_error"


def error_response(exc: Exception) -> JSONResponse:
    """OpenAI's error body and status for an exception raised on this router's paths."""
    found = [row[1:] for row in ERRORS if isinstance(exc, row[0])] + [(500, "server_error", "internal")]
    status, kind, code = (exc.status, exc.kind, exc.code) if isinstance(exc, OpenAIError) else found[0]
    status = getattr(exc, "status_code", status)  # Starlette's 400 for a malformed multipart body
    if status == 500:
        log.error("OpenAI-compatible route failed", exc_info=exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if status in (429, 503):
        headers["Retry-After"] = str(getattr(exc, "retry_after", 5))
    field = getattr(exc, "field", None)
    body = {"message": str(exc), "type": kind, "param": REPLACED.get(str(field), field), "code": code}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


class OpenAIRoute(APIRoute):
    """A route that answers its errors (auth and validation included) in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return error_response(exc)

        return run


def url_secret(keys: tuple[str, ...]) -> bytes:
    """The image links' signing key, from all API keys: replicas and restarts agree; no one key holds it."""
    return hashlib.sha256("\0".join(("flashface-trt image links", *sorted(keys))).encode()).digest()


def sign(secret: bytes, owner: str, job_id: str, k: object, exp: object) -> str:
    """HMAC-SHA256 (RFC 2104) of one image link: owner, job, image index and expiry time."""
    return hmac.new(secret, f"{owner}/{job_id}/{k}/{exp}".encode(), hashlib.sha256).hexdigest()


def _typed(p: Param, value: Any) -> Any:
    """A multipart field's text read as JSON where the schema wants a number or a box ('2' -> 2)."""
    if not isinstance(value, str) or p.kind == "str":
        return value
    try:
        return json.loads(value)
    except ValueError as exc:
        raise InputError(f"{p.name}={value!r} must be {p.describe()}", p.name) from exc


def to_request(fields: dict[str, Any], form: bool) -> tuple[dict[str, Any], str]:
    """Our generation body and the response format of OpenAI's fields (`form`: multipart text)."""
    fields = {k: v for k, v in fields.items() if v is not None and k not in IGNORED}
    fmt = fields.pop("response_format", FORMATS[0])
    if fmt not in FORMATS:
        raise InputError(f"response_format={fmt!r} must be one of {list(FORMATS)}", "response_format")
    model = fields.pop("model", MODEL_ID)
    if model != MODEL_ID:
        raise OpenAIError(404, f"no model {model!r}: the model is {MODEL_ID!r}", "model_not_found", "model")
    body: dict[str, Any] = {}
    size = fields.pop("size", "auto")
    if size != "auto":
        m = re.fullmatch(r"(\d+)x(\d+)", str(size))
        if m is None:
            raise InputError(f"size={size!r} must be WIDTHxHEIGHT in pixels (e.g. 768x768) or auto", "size")
        body["width"], body["height"] = int(m[1]), int(m[2])
    if "n" in fields:
        body["num_samples"] = fields.pop("n")
    for name in fields:
        if name not in EXTRA:
            raise OpenAIError(400, f"unknown parameter {name!r}", "unknown_parameter", name)
        body[name] = fields[name]
    if form:
        body = {name: _typed(PARAMS[name], value) for name, value in body.items()}
    return body, fmt


def openai_router(service: API, owner: Callable[[Request], str]) -> APIRouter:
    """The OpenAI-compatible routes over `service`; `owner`: the app's Bearer-key check."""
    router = APIRouter(route_class=OpenAIRoute, tags=["OpenAI-compatible images API"])
    card = {"id": MODEL_ID, "object": "model", "created": int(time.time()), "owned_by": "flashface-trt"}

    def caller(request: Request) -> str:
        try:
            return owner(request)
        except FlashFaceError as exc:
            message = "missing or unknown API key (Authorization: Bearer <key>)"
            raise OpenAIError(401, message, "invalid_api_key") from exc

    def link(request: Request, who: str, job_id: str, k: int) -> str:
        exp = int(time.time()) + URL_TTL_S
        sig = sign(url_secret(service.settings.api_keys), who, job_id, k, exp)
        url = request.url_for("openai_image_file", job_id=job_id, k=str(k))
        return f"{url}?{urlencode({'owner': who, 'exp': exp, 'sig': sig})}"

    async def answer(request: Request, who: str, body: dict[str, Any], fmt: str) -> dict[str, Any]:
        """Submit, wait for the end, answer in OpenAI's images response."""
        if "identity" not in body:
            raise InputError("identity is required: FlashFace draws a registered face", "identity")
        job = await run_in_threadpool(service.submit_record, who, body)
        timeout = float(body.get("timeout_s", service.settings.timeout_s)) + 5
        await wait_end(service, who, job["id"], timeout)
        record = await run_in_threadpool(service.job, who, job["id"])
        if not ended(record):  # well past its deadline: stopped, answered as it stands
            record = await run_in_threadpool(service.cancel, who, job["id"])
        if record["state"] != State.SUCCEEDED.value:
            kind = record.get("error_kind", record["state"])
            message = f"generation {job['id']} {record['state']}: {record.get('error')}"
            raise OpenAIError(400 if kind == "input" else 500, message, kind, None, "server_error")
        ks = range(len(record["images"]))
        if fmt == "url":
            data = [{"url": link(request, who, job["id"], k)} for k in ks]
        else:
            paths = [await run_in_threadpool(service.image, who, job["id"], k) for k in ks]
            data = [{"b64_json": base64.b64encode(path.read_bytes()).decode()} for path in paths]
        return {"created": int(record["created"]), "data": data}

    @router.post("/v1/images/generations")
    async def generations(request: Request, who: str = Depends(caller)) -> dict[str, Any]:
        """OpenAI's image generation of a registered face: `identity` (required) beside OpenAI's fields."""
        fields = await request.json()  # a ValueError (400) if it is no JSON
        if not isinstance(fields, dict):
            raise InputError("the body must be a JSON object")
        return await answer(request, who, *to_request(fields, form=False))

    @router.post("/v1/images/edits")
    async def edits(request: Request, who: str = Depends(caller)) -> dict[str, Any]:
        """OpenAI's image edit: the photos (`image`, `image[]`) registered (or found again), then drawn."""
        form = await request.form()
        photos = [f for name in PHOTOS for f in form.getlist(name)]
        fields: dict[str, Any] = {k: v for k, v in form.multi_items() if k not in PHOTOS}
        cropped, largest = (FLAGS.get(str(fields.pop(f, "0")).lower()) for f in ("cropped", "largest_face"))
        if cropped is None or largest is None:
            raise InputError("cropped and largest_face must be true or false", "cropped")
        body, fmt = to_request(fields, form=True)
        if bool(photos) == ("identity" in body):
            raise InputError("give reference photos (image) or a registered identity, one of them", "image")
        if photos:
            uploads = [(p.filename or "", await p.read()) for p in photos if isinstance(p, UploadFile)]
            if len(uploads) < len(photos):
                raise InputError("image must be uploaded files (multipart)", "image")
            registered = await run_in_threadpool(service.register, who, uploads, cropped, largest)
            body["identity"] = registered["id"]
        return await answer(request, who, body, fmt)

    @router.get("/v1/images/files/{job_id}/{k}", name="openai_image_file")
    async def image_file(job_id: str, k: str, owner: str = "", exp: str = "", sig: str = "") -> FileResponse:
        """An image of a `url` answer, fetched without a key: the link's signature and expiry instead."""
        good = sign(url_secret(service.settings.api_keys), owner, job_id, k, exp)
        if not hmac.compare_digest(sig.encode(), good.encode()):  # signed: k and exp are integers
            raise OpenAIError(403, "the link's signature does not match", "invalid_signature", "sig")
        if int(exp) < time.time():
            raise OpenAIError(403, f"the link expired at {exp} (Unix time)", "expired", "exp")
        path = await run_in_threadpool(service.image, owner, job_id, int(k))
        return FileResponse(path, media_type="image/png")

    @router.get("/v1/models")
    async def models(who: str = Depends(caller)) -> dict[str, Any]:
        """The served model, as OpenAI's model list."""
        return {"object": "list", "data": [card]}

    return router

"""The HTTP API of `flashface-trt serve` (FastAPI; OpenAPI at /docs): routes, auth, errors, limits.

Every route calls a `Service` method; the model itself only ever runs on the service's worker
thread, so no route blocks on it; `?wait=true` and event streams await the job book's wake-ups (no
thread held, no polling). Every error is `{"error": message, "field": name or absent}`.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ConfigDict, Field, create_model
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..runtime.errors import FlashFaceError, InputError, StorageError
from ..runtime.faces.images import ImageTooLarge
from ..runtime.sampling.params import PARAMS, REQUEST_PARAMS, REQUIRED, Param
from .config import owner_of
from .jobs import QueueFull
from .openai_api import openai_router
from .page import PAGE
from .records import ID, STORAGE_DOWN
from .service import API, NotFound, PayloadTooLarge, Unavailable, wait_end

log = logging.getLogger(__name__)


TYPES: dict[str, Any] = {"int": int, "float": float, "str": str, "bbox": list[float]}


def _field(p: Param) -> tuple[Any, Any]:
    """The body model's (type, Field) of one schema parameter: optional unless REQUIRED."""
    decided = {"height": "the backend's", "width": "the backend's", "timeout_s": "the service's"}
    default = decided.get(p.name, "the recipe's") if p.default is None else repr(p.default)
    doc = f"{p.help.rstrip(',;')}: {p.describe()}"
    if p.default is REQUIRED:
        return TYPES[p.kind], Field(description=doc)
    return TYPES[p.kind] | None, Field(p.default, description=f"{doc} (default: {default})")


# a generation request: every field of the schema, strictly typed (`steps: true` and
# `priority: "1"` are refused), its ranges checked by the same code as the CLI's
GenerationBody = create_model(  # type: ignore[call-overload]
    "GenerationBody",
    __config__=ConfigDict(extra="forbid", strict=True),
    **{p.name: _field(p) for p in REQUEST_PARAMS},
)


def _error(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: 413 for a request body over the limit, counted as it arrives (a declared
    Content-Length is refused at once; a chunked body is buffered up to the limit, then refused)."""

    def __init__(self, app: Callable[..., Awaitable[None]], limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _error(413, f"request body of {int(declared)} bytes exceeds {self.limit}")(
                scope, receive, send
            )
            return
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            seen += len(message.get("body", b""))
            if seen > self.limit:
                await _error(413, f"request body exceeds {self.limit} bytes")(scope, receive, send)
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        replay = iter(messages)

        async def buffered() -> dict:
            return next(replay, None) or await receive()

        await self.app(scope, buffered, send)


class Head:
    """ASGI middleware: HEAD runs the GET route and sends its status and headers, no body."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope.get("method") != "HEAD":
            return await self.app(scope, receive, send)
        ended = False

        async def headers_only(message: dict) -> None:
            nonlocal ended
            if message["type"] == "http.response.start":
                await send(message)
            elif not ended:  # the rest of a stream is dropped; uvicorn then reports a disconnect
                ended = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        await self.app({**scope, "method": "GET"}, receive, headers_only)


def _known(value: str, what: str) -> str:
    """A job or identity id from a path, or NotFound (404) for what cannot be one (%00, 300 chars, ..)."""
    if not ID.fullmatch(value):
        raise NotFound(f"no {what} {value[:64]!r}")
    return value


class Unauthorized(FlashFaceError):
    """No or an unknown API key."""


def create_app(service: API) -> FastAPI:
    """The FastAPI application over one service (a single-node `Service`, or a Ray ingress)."""
    settings = service.settings
    keys = settings.api_keys
    app = FastAPI(
        title="FlashFace-TRT",
        description="Identities registered once, generation jobs with progress, metrics.",
        version="1",
    )
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes)
    app.add_middleware(Head)
    streams: dict[str, int] = {}  # open event streams and waits per owner

    def owner(request: Request) -> str:
        """The caller's owner id from `Authorization: Bearer <key>` (everyone is 'public' without keys)."""
        if not keys:
            return owner_of(None)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            for key in keys:
                if hmac.compare_digest(token.strip().encode(), key.encode()):
                    return owner_of(key)
        raise Unauthorized()

    @app.exception_handler(Unauthorized)
    async def _unauthorized(request: Request, exc: Exception) -> JSONResponse:
        return _error(
            401,
            "missing or unknown API key (Authorization: Bearer <key>)",
            None,
            {"WWW-Authenticate": "Bearer"},
        )

    @app.exception_handler(InputError)
    async def _input(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, InputError)
        return _error(413 if isinstance(exc, ImageTooLarge) else 422, str(exc), exc.field)

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: Exception) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(QueueFull)
    async def _full(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, QueueFull)
        return _error(429, str(exc), None, {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(Unavailable)
    async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
        return _error(503, str(exc), None, {"Retry-After": "5"})

    @app.exception_handler(StorageError)
    async def _storage(request: Request, exc: Exception) -> JSONResponse:
        return _error(503, f"{STORAGE_DOWN}; retry when /readyz says ready", None, {"Retry-After": "5"})

    @app.exception_handler(PayloadTooLarge)
    async def _too_large(request: Request, exc: Exception) -> JSONResponse:
        return _error(413, str(exc))

    @app.exception_handler(HTTPException)
    async def _framework(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        where = f"{request.method} {request.url.path[:200]}"
        message = {404: f"no route {where}", 405: f"method not allowed: {where}"}.get(exc.status_code)
        return _error(exc.status_code, message or str(exc.detail), None, dict(exc.headers or {}))

    @app.exception_handler(FlashFaceError)
    async def _flashface(request: Request, exc: Exception) -> JSONResponse:
        return _error(422, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(loc) or None
        message = f"{field or 'request'}: {first.get('msg', 'invalid request')}"
        if field in PARAMS:
            value, rule = first.get("input"), PARAMS[field].describe()
            message = f"{field}={value!r} must be {rule} ({first.get('msg')})"
        return _error(422, message, field)

    def open_stream(who: str) -> None:
        """Count one of the caller's open streams and waits; QueueFull (429) beyond `max_streams`."""
        n, cap = streams.get(who, 0), settings.max_streams
        if n >= cap:
            raise QueueFull(f"{n} event streams and waits are open for this key (limit {cap})", 5)
        streams[who] = n + 1

    # ---------------------------------------------------------------- operations

    @app.get("/healthz", include_in_schema=True)
    async def healthz() -> dict:
        """The process is alive (no auth)."""
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """200 once the networks are loaded and warmed up (no auth); 503 before, after a failed load
        or while shutting down."""
        status = service.status()
        return JSONResponse(status, status_code=200 if status["ready"] else 503)

    @app.get("/metrics")
    async def metrics(who: str = Depends(owner)) -> Response:
        """Prometheus metrics."""
        return Response(await run_in_threadpool(service.metrics_text), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    # ---------------------------------------------------------------- identities

    @app.post("/v1/identities")
    async def register(
        photos: Annotated[list[UploadFile], File(description="reference photos of one person, or crops")],
        cropped: Annotated[
            bool, Form(description="the photos are already-cropped faces: skip detection")
        ] = False,
        largest_face: Annotated[
            bool, Form(description="use the largest face of a photo with several")
        ] = False,
        who: str = Depends(owner),
    ) -> dict:
        """Detect and crop the faces as `generate` does, encode them once, store the identity."""
        uploads = [(p.filename or "", await p.read()) for p in photos]
        return await run_in_threadpool(service.register, who, uploads, cropped, largest_face)

    @app.get("/v1/identities")
    async def list_identities(who: str = Depends(owner)) -> dict:
        """The caller's identities, newest first."""
        return await run_in_threadpool(service.identities, who)

    @app.get("/v1/identities/{identity}")
    async def get_identity(identity: str, who: str = Depends(owner)) -> dict:
        return await run_in_threadpool(service.identity_record, who, _known(identity, "identity"))

    @app.delete("/v1/identities/{identity}", status_code=204)
    async def delete_identity(identity: str, who: str = Depends(owner)) -> Response:
        await run_in_threadpool(service.delete_identity, who, _known(identity, "identity"))
        return Response(status_code=204)

    # ---------------------------------------------------------------- generations

    @app.post("/v1/generations", status_code=202)
    async def submit(
        body: GenerationBody,  # type: ignore[valid-type]
        wait: bool = Query(False, description="answer with the finished job instead of 202"),
        who: str = Depends(owner),
    ) -> JSONResponse:
        fields: dict[str, Any] = body.model_dump(exclude_none=True)  # type: ignore[attr-defined]
        if not wait:
            return JSONResponse(await run_in_threadpool(service.submit_record, who, fields), status_code=202)
        open_stream(who)  # 429 before the job is accepted
        try:
            record = await run_in_threadpool(service.submit_record, who, fields)
            await wait_end(service, who, record["id"], float(fields.get("timeout_s", settings.timeout_s)) + 5)
        finally:
            streams[who] -= 1
        return JSONResponse(await run_in_threadpool(service.job, who, record["id"]), status_code=200)

    @app.get("/v1/generations")
    async def list_jobs(who: str = Depends(owner)) -> dict:
        """The caller's queued, running and recent jobs (queue and history introspection)."""
        return await run_in_threadpool(service.jobs, who)

    @app.get("/v1/generations/{job_id}")
    async def get_job(job_id: str, who: str = Depends(owner)) -> dict:
        return await run_in_threadpool(service.job, who, _known(job_id, "generation"))

    @app.delete("/v1/generations/{job_id}")
    async def cancel(job_id: str, who: str = Depends(owner)) -> dict:
        """Cancel: a queued job is removed; a running one stops at the next step boundary."""
        return await run_in_threadpool(service.cancel, who, _known(job_id, "generation"))

    @app.get("/v1/generations/{job_id}/images/{k}")
    async def image(job_id: str, k: str, who: str = Depends(owner)) -> FileResponse:
        if not re.fullmatch(r"[0-9]{1,6}", k):
            raise NotFound(f"no image {k[:64]!r}: the index is 0, 1, ...")
        path = await run_in_threadpool(service.image, who, _known(job_id, "generation"), int(k))
        return FileResponse(path, media_type="image/png")

    @app.get("/v1/generations/{job_id}/events")
    async def events(job_id: str, who: str = Depends(owner)) -> StreamingResponse:
        """Server-sent events: one `progress` per step, then the final `state`."""
        await run_in_threadpool(service.job, who, _known(job_id, "generation"))  # 404 before the stream
        open_stream(who)  # 429 before the stream; closed when it ends

        async def stream() -> AsyncIterator[str]:
            sent, done = 0, False
            try:
                while not done:
                    events, done = await service.next_events(who, job_id, sent, 15.0)
                    for event in events:
                        yield f"event: progress\ndata: {json.dumps(event)}\n\n"
                    sent += len(events)
                    if not events and not done:  # a comment keeps proxies from closing an idle stream
                        yield ": keep-alive\n\n"
                record = await run_in_threadpool(service.job, who, job_id)
                yield f"event: state\ndata: {json.dumps(record)}\n\n"
            finally:
                streams[who] -= 1

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    app.include_router(openai_router(service, owner))  # OpenAI's images API (its own error shape)
    return app

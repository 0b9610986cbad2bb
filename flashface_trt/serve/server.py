"""Running the service: uvicorn on a bound socket, our own SIGTERM handling, a graceful drain.

On SIGTERM (or SIGINT) the service stops admitting (new work gets 503, reads still work),
finishes or cancels the queued and running jobs as configured, persists what it must, then
uvicorn closes and the process exits with status 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator

from .app import create_app
from .config import ServeSettings
from .service import Service
from .worker import LoadBackend

log = logging.getLogger(__name__)


def _server(config):  # type: ignore[no-untyped-def]
    """uvicorn's Server without its own signal capture (ours drains the service first)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Server(config)


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type:
    """uvicorn's HTTP protocol closing connections beyond `max_connections` and any without a whole
    request head `header_timeout_s` after opening or its last response (uvicorn has neither)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]

    class Guarded(Base):  # type: ignore[misc, valid-type]
        head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
            super().connection_made(transport)
            transport.close() if len(self.connections) > max_connections else self.arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.arm()

        def arm(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
            self.head_timer = self.loop.call_later(header_timeout_s, self.head_timeout)

        def head_timeout(self) -> None:
            if self.cycle is None or self.cycle.response_complete:  # no request head since arming
                self.transport.close()

    return Guarded


class JsonFormatter(logging.Formatter):
    """One JSON object per log line; a job's lines carry its `job_id`."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        job_id = getattr(record, "job_id", None)
        if job_id is not None:
            out["job_id"] = job_id
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one, which the log line names)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(settings: ServeSettings, load: LoadBackend, size: tuple[int, int] | None = None) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a clean drain."""
    import uvicorn

    service = Service(settings, load, size).start()
    sock = bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    http = guarded_protocol(settings.header_timeout_s, settings.max_connections)
    config = uvicorn.Config(create_app(service), http=http, log_config=None, lifespan="off")
    config.timeout_graceful_shutdown, config.timeout_keep_alive = 3, settings.idle_timeout_s  # type: ignore
    server = _server(config)
    log.info("listening on http://%s:%d", host, port)
    print(f"flashface-trt serve: listening on http://{host}:{port}", file=sys.stderr, flush=True)
    asyncio.run(_run(server, service, sock))
    if service.worker.is_alive():  # still in a step (its jobs are recorded): exit without finalizing
        logging.shutdown()  # the native code it runs, which aborts the process at interpreter exit
        os._exit(0)
    return 0


async def _run(server, service: Service, sock: socket.socket) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    stopping = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if stopping in done:
        t0 = time.monotonic()
        log.info("shutting down: no new work, %s the queued and running jobs", service.settings.shutdown)
        await asyncio.to_thread(service.shutdown)
        log.info("drained in %.1f s", time.monotonic() - t0)
        server.should_exit = True
        await serving
    else:
        stopping.cancel()
        await asyncio.to_thread(service.shutdown, "cancel", 0.0)

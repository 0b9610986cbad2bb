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
    config = uvicorn.Config(
        create_app(service), log_config=None, lifespan="off", timeout_graceful_shutdown=10
    )
    server = _server(config)
    log.info("listening on http://%s:%d", host, port)
    print(f"flashface-trt serve: listening on http://{host}:{port}", file=sys.stderr, flush=True)
    asyncio.run(_run(server, service, sock))
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

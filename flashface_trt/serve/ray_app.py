"""Scale-out on Ray Serve: the HTTP API of `app.py` over `RayAPI` (ray_ingress.py) and N model
replicas (ray_replica.py), routed by identity: a request carries its identity as Ray Serve's
multiplexed model id, so it lands on a replica that already holds its latents and reference K/V.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict
from typing import Any

from .config import ServeSettings
from .ray_config import INGRESS, MODEL, RayConfig
from .ray_ingress import RayAPI
from .ray_replica import ModelReplica
from .worker import LoadBackend

log = logging.getLogger(__name__)


_CURRENT: dict[str, RayAPI] = {}  # this ingress replica's API (set in its constructor)


class _IngressAPI:
    """The routes' view of the ingress replica's `RayAPI` (made in the replica, after the routes)."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "api" not in _CURRENT:  # unpickling asks for dunders first
            raise AttributeError(name)
        return getattr(_CURRENT["api"], name)


class IngressReplica:
    """The HTTP replica: the FastAPI app over `RayAPI` and a handle to the model deployment."""

    def __init__(
        self, model: Any, settings: ServeSettings, app_name: str, size: tuple[int, int] | None
    ) -> None:
        _CURRENT["api"] = RayAPI(settings, model, app_name, size)


def build_app(
    settings: ServeSettings, load: LoadBackend, size: tuple[int, int] | None, config: RayConfig
) -> Any:
    """The Ray Serve application: an ingress (the FastAPI app) bound to the model deployment."""
    from fastapi import FastAPI
    from ray import serve

    from .app import create_app

    config = config.validated()
    settings = settings.validated()
    options = config.deployment_options(settings.max_queue)

    class Replica(ModelReplica):
        @serve.multiplexed(max_num_models_per_replica=config.identities_per_replica)
        async def load_identity(self, identity: str) -> str:  # type: ignore[override]
            return await ModelReplica.load_identity(self, identity)

    model: Any = serve.deployment(name=MODEL, **options)(Replica)

    fastapi_app: FastAPI = create_app(_IngressAPI(settings))
    ingress: Any = serve.deployment(
        name=INGRESS,
        num_replicas=config.ingress_replicas,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1000,
    )(serve.ingress(fastapi_app)(IngressReplica))
    return ingress.bind(model.bind(settings, load, size), settings, config.app_name, size)


def run(
    settings: ServeSettings,
    load: LoadBackend,
    size: tuple[int, int] | None,
    config: RayConfig,
    address: str | None,
) -> int:
    """`flashface-trt serve --ray`: connect to (or start) a Ray cluster, deploy, serve until SIGTERM."""
    import signal

    import ray
    from ray import serve

    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app(settings, load, size, config), name=config.app_name, route_prefix=config.route_prefix)
    log.info(
        "Ray Serve application %r on http://%s:%d (%s)",
        config.app_name,
        settings.host,
        settings.port,
        asdict(config),
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    stop.wait()
    serve.delete(config.app_name)
    return 0

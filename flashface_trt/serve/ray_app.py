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
    """`flashface-trt serve --ray`: start or join a Ray cluster, deploy, serve until SIGTERM/SIGINT."""
    import signal

    import ray
    from ray import serve

    def stop(*_: object) -> None:  # leaves whatever Ray is doing (even a deployment never ready)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # once: the clean-up is not interrupted
        raise KeyboardInterrupt

    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)  # after ray.init, which installs its own
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        if config.num_gpus > (have := ray.cluster_resources().get("GPU", 0.0)):  # Ray logs it in files only
            msg = "a model replica asks %g GPU, the cluster has %g: none can start; pass --gpus-per-replica 0"
            log.warning(msg, config.num_gpus, have)
        app = build_app(settings, load, size, config)
        serve.run(app, name=config.app_name, route_prefix=config.route_prefix)
        where = (config.app_name, settings.host, settings.port, asdict(config))
        log.info("Ray Serve application %r on http://%s:%d (%s)", *where)
        threading.Event().wait()
    except KeyboardInterrupt:
        log.info("stopping the Ray Serve application %r", config.app_name)
    (cleanup := threading.Thread(target=serve.delete, args=(config.app_name,), daemon=True)).start()
    cleanup.join(30.0)  # bounded, whatever state the deployment is in
    return 0

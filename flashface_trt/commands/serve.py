"""`flashface-trt serve`: the HTTP service on one GPU, or behind Ray Serve with `--ray`."""

from __future__ import annotations

import argparse
import logging

from ..backends import load_backend
from ..runtime.errors import FlashFaceError
from ..runtime.sampling.params import DEFAULT_SIZE

log = logging.getLogger("flashface_trt")


def serve_setup(args: argparse.Namespace):
    """(settings, backend loader, default size) of `serve` from its arguments."""
    from ..serve.config import SETTINGS, ServeSettings, read_keys_file
    from ..serve.server import JsonFormatter

    keys = tuple(args.api_key) + (read_keys_file(args.api_keys_file) if args.api_keys_file else ())
    settings = ServeSettings(**{p.name: getattr(args, p.name) for p in SETTINGS}, api_keys=keys).validated()
    if not keys and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without API keys: anyone who reaches it can use it", args.host)
    if args.log_json:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())

    size = None
    if args.height or args.width or args.preset:
        default = DEFAULT_SIZE["tiny" if args.preset else "weights"]
        size = (args.height or default, args.width or default)
    return settings, lambda: load_backend(args), size


def ray_config(args: argparse.Namespace):
    """The Ray Serve scaling of `serve --ray` (and `serve run`) from its arguments."""
    from ..serve.ray_config import RayConfig

    return RayConfig(
        min_replicas=args.replicas,
        max_replicas=args.max_replicas or args.replicas,
        target_ongoing_requests=args.target_ongoing_requests,
        num_gpus=replica_gpus(args),
        num_cpus=args.cpus_per_replica,
        identities_per_replica=args.identities_per_replica,
    ).validated()


def replica_gpus(args: argparse.Namespace) -> float:
    """GPUs a model replica asks Ray for: --gpus-per-replica, or (auto) 1 where its backend uses a GPU."""
    if args.gpus_per_replica != "auto":
        return float(args.gpus_per_replica)
    if args.engines or args.onnx:
        return float(bool(args.engines) or args.provider in ("cuda", "tensorrt"))
    if args.device != "auto":
        return float(args.device.startswith("cuda"))
    try:
        import torch
    except ImportError:
        return 0.0
    return float(torch.cuda.is_available())


def serve(args: argparse.Namespace) -> int:
    """`flashface-trt serve`: the networks load on the service's worker thread (see /readyz)."""
    try:
        settings, load, size = serve_setup(args)
        from ..serve.server import serve as run_server
    except ImportError as exc:
        raise FlashFaceError(
            f"the service needs its extra: pip install 'flashface-trt[serve]' ({exc})"
        ) from exc
    if not args.ray:
        return run_server(settings, load, size)
    try:
        from ..serve.ray_app import run as run_ray
    except ImportError as exc:
        raise FlashFaceError(f"--ray needs Ray Serve: pip install 'flashface-trt[ray]' ({exc})") from exc
    return run_ray(settings, load, size, ray_config(args), args.ray_address)

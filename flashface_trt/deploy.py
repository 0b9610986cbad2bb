"""`serve run` entry point: builds the Ray Serve application from a config's `args` mapping.

It sits above the CLI because the mapping holds `flashface-trt serve` options by name, read by the
CLI's own parser, so a YAML deployment and `flashface-trt serve --ray` accept the same things.
"""

from __future__ import annotations

import argparse

from .cli import build_parser
from .commands.serve import ray_config, serve_setup


def ray_options(config: dict) -> argparse.Namespace:
    """The `flashface-trt serve --ray` arguments of a `serve run` config's `args` mapping."""
    argv = ["serve", "--ray"]
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        for v in value if isinstance(value, list) else [value]:
            if v is True:
                argv.append(flag)
            elif v not in (False, None):
                argv += [flag, str(v)]
    return build_parser().parse_args(argv)


def ray_app(config: dict):
    """Application builder for `serve run` (import path `flashface_trt.deploy:ray_app`).

    `config` holds the `flashface-trt serve` options by name (`preset: tiny`, `onnx: DIR`,
    `data_dir: /shared/flashface`, `max_replicas: 4`, ...), as `serve run CONFIG.yaml` passes them.
    """
    from .serve.ray_app import build_app

    args = ray_options(config)
    settings, load, size = serve_setup(args)
    return build_app(settings, load, size, ray_config(args))

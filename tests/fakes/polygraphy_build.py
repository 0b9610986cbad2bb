"""Polygraphy's two build calls, replaced: the project's own `build_engine` runs around them.

`network_from_onnx_path` and `engine_bytes_from_network` keep polygraphy's signatures (a call
that polygraphy would reject is rejected) and the real `CreateConfig` and `Profile` are used.
The "engine" is a JSON description the fake `tensorrt.Runtime` understands: the ONNX path, the
profile and the TensorRT version. What TensorRT refuses is refused: `fp16=True` on TensorRT 11
(no `BuilderFlag.FP16`: polygraphy fails) or with a strongly typed network on 10, a dynamic input
without a profile, a profile whose rank or fixed sizes differ from the graph.
"""

from __future__ import annotations

import inspect
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from .tensorrt import PLAN_FORMAT


@dataclass
class FakeNetwork:
    path: str
    strongly_typed: bool


def patch(monkeypatch: pytest.MonkeyPatch, builds: list[dict], overrides: dict[str, dict]) -> None:
    """Replace polygraphy's network parse and engine build; `overrides[network]` alters an engine."""
    import onnx
    import polygraphy.backend.trt as pbt
    from polygraphy.exception import PolygraphyException

    real_parse = inspect.unwrap(pbt.network_from_onnx_path)  # (a second install patches the real ones)
    real_build = inspect.unwrap(pbt.engine_bytes_from_network)
    net_sig, build_sig = inspect.signature(real_parse), inspect.signature(real_build)

    def network_from_onnx_path(*args, **kwargs):
        bound = net_sig.bind(*args, **kwargs).arguments
        trt = sys.modules["tensorrt"]
        strongly = bool(bound.get("strongly_typed")) or trt.__version__.startswith("11.")  # 11: always
        return FakeNetwork(str(bound["path"]), strongly)

    def engine_bytes_from_network(*args, **kwargs):
        bound = build_sig.bind(*args, **kwargs).arguments
        trt = sys.modules["tensorrt"]
        network, config = bound["network"], bound.get("config")
        if not isinstance(network, FakeNetwork) or not isinstance(config, pbt.CreateConfig):
            raise PolygraphyException(f"fake build: unexpected network {network!r} or config {config!r}")
        if config.fp16 and not hasattr(trt.BuilderFlag, "FP16"):
            raise PolygraphyException("fp16 in CreateConfig is not available in this version of TensorRT")
        if config.fp16 and network.strongly_typed:
            raise PolygraphyException(
                "Invalid Engine: precision flags such as FP16 are not allowed for strongly typed networks"
            )
        for pool in config.memory_pool_limits or {}:
            if not isinstance(pool, trt.MemoryPoolType):
                raise PolygraphyException(f"memory pool {pool!r} is not a tensorrt.MemoryPoolType")
        if not config.profiles:
            raise PolygraphyException("expected at least one optimisation profile")
        graph = onnx.load(network.path, load_external_data=False).graph
        profiles = [read_profile(graph, p, PolygraphyException) for p in config.profiles]
        network_name = Path(network.path).stem.split("-")[0]
        override = dict(overrides.get(network_name, {}))
        for profile in profiles:  # an override alters every profile
            profile.update(override.get("profile", {}))
        override.pop("profile", None)
        base = 4096 + 256 * len(graph.node)  # a larger profile needs more activation memory
        desc = {
            "format": PLAN_FORMAT,
            "tensorrt": trt.__version__,
            "onnx": network.path,
            "strongly_typed": network.strongly_typed,
            "profiles": profiles,
            "memory": [base * (k + 1) for k in range(len(profiles))],
            **override,
        }
        cache = bound.get("save_timing_cache")
        if cache:
            Path(cache).write_text(json.dumps({"fake timing cache": network_name}))
        builds.append({"network": network_name, "fp16": bool(config.fp16), **desc})
        return json.dumps(desc).encode()

    network_from_onnx_path.__wrapped__ = real_parse  # type: ignore[attr-defined]
    engine_bytes_from_network.__wrapped__ = real_build  # type: ignore[attr-defined]
    monkeypatch.setattr(pbt, "network_from_onnx_path", network_from_onnx_path)
    monkeypatch.setattr(pbt, "engine_bytes_from_network", engine_bytes_from_network)


def read_profile(graph, given, error: type[Exception]) -> dict[str, list[tuple[int, ...]]]:
    """One polygraphy `Profile` checked against the graph's inputs as TensorRT's builder does."""
    profile = {}
    for inp in graph.input:
        dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        shape = given[inp.name] if inp.name in given else None
        if shape is None:
            if any(isinstance(d, str) for d in dims):
                raise error(f"dynamic input {inp.name!r} has no profile shape")
            continue
        points = [tuple(int(s) for s in p) for p in (shape.min, shape.opt, shape.max)]
        for p in points:
            if len(p) != len(dims) or any(isinstance(d, int) and d != s for d, s in zip(dims, p)):
                raise error(f"profile shape {p} of {inp.name!r} does not fit {dims}")
        if not all(a <= b <= c for a, b, c in zip(*points)):
            raise error(f"profile of {inp.name!r} needs min <= opt <= max: {points}")
        profile[inp.name] = points
    return profile

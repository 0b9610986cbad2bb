"""Test doubles of `cuda.bindings.runtime` and `tensorrt` that enforce the documented contracts.

They exist only under tests/ and are put in place with pytest's monkeypatch (`install`). "Device"
memory is host memory with real addresses; the TensorRT engine runs the exported ONNX graph on
ONNX Runtime's CPU provider, so every number they produce is ONNX Runtime's, never TensorRT's.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from dataclasses import dataclass

import pytest

from . import cudart, polygraphy_build, tensorrt


@dataclass
class Fakes:
    """The installed doubles: the CUDA runtime, the TensorRT module and the build recorder."""

    cuda: cudart.FakeCudaRuntime
    trt: types.ModuleType
    builds: list[dict]  # one record per engine the fake build wrote
    overrides: dict[str, dict]  # network -> plan fields to alter ("dtypes", "shapes", "memory", ...)


def install(monkeypatch: pytest.MonkeyPatch, version: str = "10.13.0.35") -> Fakes:
    """Make `from cuda.bindings import runtime`, `import tensorrt` and polygraphy's build use the fakes."""
    rt = cudart.FakeCudaRuntime()
    trt = tensorrt.make_module(rt, version)
    cuda_pkg, bindings_pkg = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    cuda_pkg.__path__, bindings_pkg.__path__ = [], []  # packages, so the import system accepts them
    bindings_pkg.runtime = rt  # type: ignore[attr-defined]
    cuda_pkg.bindings = bindings_pkg  # type: ignore[attr-defined]
    for name, module in (
        ("cuda", cuda_pkg),
        ("cuda.bindings", bindings_pkg),
        ("cuda.bindings.runtime", rt),
        ("tensorrt", trt),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    fakes = Fakes(rt, trt, [], {})
    if importlib.util.find_spec("polygraphy") is not None:  # the build's double wraps polygraphy's API
        polygraphy_build.patch(monkeypatch, fakes.builds, fakes.overrides)
    return fakes

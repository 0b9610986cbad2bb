"""Shared pieces of the engine-runtime tests that run through the CUDA and TensorRT doubles."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from flashface_trt.runtime.sampling.identities import Identity
from flashface_trt.runtime.sampling.prepare import prepare, stepper
from flashface_trt.runtime.sampling.request import GenerationRequest
from flashface_trt.runtime.sampling.sampler import GuidanceParams

from .fakes import Fakes, install

# launch at t <= 500: with 6 trailing steps (999, 833, 666, 500, 333, 166) three 2-way, three 3-way
GUIDANCE = GuidanceParams(step_to_launch=500)


def module_fakes() -> Iterator[Fakes]:
    """The doubles installed for a whole test module (its engines are built once)."""
    with pytest.MonkeyPatch.context() as mp:
        yield install(mp)
        gc.collect()  # device buffers still unreferenced are freed while the double is installed


def build(onnx_dir: Path, out: Path) -> Path:
    from flashface_trt.engine.build import build_engines

    build_engines(onnx_dir, out)
    return out


def request(
    prompt: str = "a man", size: tuple[int, int] = (64, 64), steps: int = 6, **kw
) -> GenerationRequest:
    return GenerationRequest(
        prompt=prompt, steps=steps, height=size[0], width=size[1], guidance=GUIDANCE, **kw
    )


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, np.int16) for im in images])


def max_diff(a, b) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


def denoise_run(backend, req: GenerationRequest, identity: Identity):
    """What the executor admits: (denoise, x, steps) of one request (`prepare`, the step alone)."""
    p = prepare(backend, req, identity)
    return stepper(backend, p.ctx), p.x, p.steps

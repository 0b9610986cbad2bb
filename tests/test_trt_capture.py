"""Issue 24 through the CUDA and TensorRT doubles: hardened capture (gc off, bindings before capture,
eager fallback of a shape whose capture fails) and per-bucket optimisation profiles."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from flashface_trt.engine.profiles import engine_profiles, memory_estimate, request_buckets
from flashface_trt.export.networks import network_specs
from flashface_trt.models.config import SD15
from flashface_trt.models.loading import tiny_models
from flashface_trt.runtime.artifacts.spec import ExportShapes
from flashface_trt.runtime.faces.images import synthetic_face
from flashface_trt.runtime.sampling.executor import StepExecutor, Task
from flashface_trt.runtime.sampling.pipeline import generate, register_identity

from .trt_support import max_diff, request

pytest.importorskip("onnxruntime")
pytest.importorskip("polygraphy", reason="engines are built through polygraphy's API (the trt extra)")

W768 = ExportShapes(max_requests=8, opt_height=768, opt_width=768)


@pytest.fixture(scope="module")
def specs():
    return network_specs(tiny_models("cpu", torch.float32), ExportShapes())


@pytest.fixture(scope="module")
def face():
    return [synthetic_face(200, seed=0)]


def backend(engines, **kw):
    from flashface_trt.runtime.backends.trt import TrtBackend

    return TrtBackend(engines, **kw)


def test_step_engines_get_one_profile_per_request_bucket_with_its_padded_step_as_opt(specs):
    assert request_buckets(W768) == [1, 2, 4, 8] and request_buckets(ExportShapes(max_requests=3)) == [
        1,
        2,
        3,
    ]
    unet = engine_profiles(specs["unet"], W768)
    # one 3-way request: 2 reference rows + 1 other; its bucket pads r requests to 2r + r rows
    assert [p["timestep"][1] for p in unet] == [(3,), (6,), (12,), (24,)]
    assert [p["x"][1] for p in unet] == [(r, 4, 96, 96) for r in (1, 2, 4, 8)]
    assert [p["timestep"][2] for p in unet] == [(16,), (32,), (64,), (128,)]  # up to 4 samples a request
    assert all(p["x"][0] == (1, 4, 32, 32) for p in unet)  # every bucket takes every smaller batch
    step = engine_profiles(specs["step"], W768)
    assert [p["eps"][1][0] for p in step] == [3, 6, 12, 24] and [p["guide"][1] for p in step][-1] == (3, 8)
    assert len(engine_profiles(specs["reference_net"], W768)) == 1
    gib = [memory_estimate(p, SD15.to_dict()) / 2**30 for p in unet]
    assert gib == pytest.approx([1.25, 2.5, 5.0, 10.0])  # rows x 128 x 128 x 2560 halves
    whole = engine_profiles(specs["unet"], ExportShapes())[-1]
    assert memory_estimate(whole, SD15.to_dict()) == 64 * 128 * 128 * 2560 * 2  # the 5.4 GB GEGLU


def test_the_runtime_selects_each_bucket_profile_and_grows_memory_to_it(fakes, engines, face):
    be = backend(engines)
    manifest = be.manifest["estimates"]
    assert manifest["profiles"]["unet"] == 3 and len(manifest["unet_largest_activation_bytes"]) == 3
    ident = register_identity(be, face)
    first = be.memory.nbytes
    generate(be, request(steps=2), ident)
    alone = {k: c.active_optimization_profile for k, c in be.engines["unet"].contexts.items() if k != "eager"}
    assert set(alone.values()) == {0} and be.memory.nbytes == first  # one request: the smallest profile
    ex = StepExecutor(be, max_batch_rows=12)
    tasks = [ex.submit(Task(request(f"person {i}", steps=2, seed=i), ident)) for i in range(4)]
    ex.run()
    assert all(t.error is None for t in tasks) and max(ex.batch_sizes) == 4
    used = {c.active_optimization_profile for c in be.engines["unet"].contexts.values()}
    assert used == {0, 2} and be.memory.nbytes == be.engines["unet"].memory_for(2) > first
    assert not fakes.cuda.faults


def test_a_wrong_profile_choice_is_refused_by_the_double(fakes, engines, face, monkeypatch, caplog):
    from flashface_trt.runtime.backends.trt_engine import Engine

    be = backend(engines)
    ident = register_identity(be, face)
    monkeypatch.setattr(Engine, "profile_for", lambda self, shapes: 0)  # always the smallest
    ex = StepExecutor(be, max_batch_rows=12)
    tasks = [ex.submit(Task(request(f"person {i}", steps=2, seed=i), ident)) for i in range(4)]
    ex.run()  # the executor steps them one by one after the batched step failed
    assert "unet: input x shape (4, 4, 8, 8) is outside the engine" in caplog.text
    assert all(t.error is None for t in tasks)


def test_a_failed_capture_runs_that_shape_eagerly_with_the_same_images(fakes, engines, face, monkeypatch):
    """An engine that allocates while executing (as a plugin might) invalidates the capture: the
    step falls back to eager execution for that shape, is recorded, and the images do not change."""
    be = backend(engines)
    ident = register_identity(be, face)
    want = generate(be, request(steps=4), ident)  # two 2-way steps, two 3-way
    assert be.graphs.captures == 2 and not be.graphs.failed
    gc_during_capture = []
    cls = type(be.engines["unet"].context("eager", be.memory))
    execute = cls.execute_async_v3

    def allocating(self, stream):
        if self.rt.capture_of(int(stream)) is not None:
            gc_during_capture.append(gc.isenabled())
            self.rt.cudaMalloc(256)  # refused inside a capture: the capture is invalidated
        return execute(self, stream)

    monkeypatch.setattr(cls, "execute_async_v3", allocating)
    be = backend(engines)
    got = generate(be, request(steps=4), register_identity(be, face))
    assert max_diff(got, want) == 0
    assert be.graphs.captures == 0 and len(be.graphs.failed) == 2  # both buckets (2-way, 3-way)
    assert all("execute_async_v3 returned False" in why for why in be.graphs.failed.values())
    assert gc_during_capture == [False, False] and gc.isenabled()
    again = generate(be, request(steps=4, seed=3), register_identity(be, face))  # no new capture attempt
    assert len(gc_during_capture) == 2 and not np.array_equal(np.asarray(again[0]), np.asarray(got[0]))
    assert any("cudaMalloc during capture" in f for f in fakes.cuda.faults)
    fakes.cuda.faults.clear()


def test_bindings_are_set_before_the_capture_which_records_only_enqueues(fakes, engines, face, monkeypatch):
    be = backend(engines)
    ident = register_identity(be, face)
    cls = type(be.engines["unet"].context("eager", be.memory))
    calls: list[tuple[str, bool]] = []
    for name in (
        "set_input_shape",
        "set_tensor_address",
        "set_optimization_profile_async",
        "execute_async_v3",
    ):
        real = getattr(cls, name)

        def spy(self, *args, _real=real, _name=name):
            capturing = any(s.capture is not None for s in self.rt.streams.values())
            calls.append((_name, capturing))
            return _real(self, *args)

        monkeypatch.setattr(cls, name, spy)
    generate(be, request(steps=4), ident)
    assert be.graphs.captures == 2
    captured = {name for name, capturing in calls if capturing}
    assert captured == {"execute_async_v3"}

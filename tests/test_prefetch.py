"""Every timestep's reference K/V computed on admission in few ReferenceNet calls (`prepare.prefetch_kv`):
the calls per request, the same z0 and images as one call per step, and the cache-budget cap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flashface_trt.models.backend import TorchBackend
from flashface_trt.models.loading import tiny_models
from flashface_trt.models.settings import TorchSettings
from flashface_trt.runtime.faces.images import synthetic_face
from flashface_trt.runtime.sampling.batch import Member
from flashface_trt.runtime.sampling.executor import StepExecutor, Task
from flashface_trt.runtime.sampling.identities import kv_key, nbytes
from flashface_trt.runtime.sampling.pipeline import register_identity
from flashface_trt.runtime.sampling.prepare import prefetch_kv, prepare
from flashface_trt.runtime.sampling.request import GenerationRequest

from .conftest import rel_err

BOUND = 1e-5  # float32: a ReferenceNet batched over timesteps may sum in another order
REQUEST = GenerationRequest("a man", steps=7, seed=5, height=64, width=64, num_samples=2)
FACES = [synthetic_face(150, seed=i) for i in range(3)]  # padded to 4 references


def run(backend, identity, req: GenerationRequest = REQUEST) -> Task:
    """One request through the executor (admission: `prepare`, then `prefetch_kv`)."""
    task = Task(req, identity)
    StepExecutor(backend).run([task])
    assert task.error is None, task.error
    return task


def counting(backend, calls: list[int]):
    """Count the torch backend's ReferenceNet calls (prefetch and per-step) and their timesteps."""
    unet = backend.models.unet
    features = unet.reference_features

    def counted(lat, t, ctx):
        calls.append(len(t))
        return features(lat, t, ctx)

    unet.reference_features = counted  # an instance attribute: `del` restores the method
    return unet


@pytest.fixture(scope="module")
def models():
    return tiny_models()


def torch_backend(models, **kw) -> TorchBackend:
    return TorchBackend(models, TorchSettings(static_loop=False, **kw))


def test_torch_prefetch_makes_ceil_n_over_chunk_calls_with_the_per_step_z0(models):
    on, off = torch_backend(models, prefetch_images=4 * 3), torch_backend(models, prefetch_images=0)
    assert on.reference_groups(4) == 3 and off.reference_groups(4) == 0
    results = {}
    for name, backend in (("on", on), ("off", off)):
        identity = register_identity(backend, FACES)
        calls: list[int] = []
        unet = counting(backend, calls)
        try:
            results[name] = run(backend, identity), calls
        finally:
            del unet.reference_features
    (t_on, calls_on), (t_off, calls_off) = results["on"], results["off"]
    assert calls_on == [3, 3, 1] and len(calls_on) == math.ceil(REQUEST.steps / 3)
    assert calls_off == [1] * REQUEST.steps  # one call per step
    assert on.kv_cache.stats()["misses"] == off.kv_cache.stats()["misses"] == REQUEST.steps
    assert rel_err(on.to_host(t_on.z0), off.to_host(t_off.z0)) <= BOUND
    for a, b in zip(t_on.images or [], t_off.images or []):
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1
    calls_on.clear()
    unet = counting(on, calls_on)
    try:
        run(on, t_on.identity)  # a registered identity: its K/V are cached, no ReferenceNet call
    finally:
        del unet.reference_features
    assert calls_on == []


def test_prefetch_stops_at_the_cache_budget(models):
    probe = torch_backend(models)
    identity = register_identity(probe, FACES)
    p = prepare(probe, REQUEST, identity)
    entry = nbytes(probe.reference_kv([Member(p.ctx, p.x, p.steps[0])])[0])  # one timestep's K/V
    for budget, kept in ((int(2.5 * entry), 2), (entry - 1, 0)):
        be = torch_backend(models, prefetch_images=4 * 3, kv_cache_bytes=budget)
        p = prepare(be, REQUEST, identity)
        assert prefetch_kv(be, p) == 1  # the first call shows the budget holds only `kept` timesteps
        assert len(be.kv_cache) == kept and be.kv_cache.evictions == 0
        assert all(kv_key(identity, s.t, p.ctx.uncond_key) in be.kv_cache for s in p.steps[:kept])
        be.kv_cache.clear()
        z0 = be.to_host(run(be, identity).z0)  # later steps compute their own K/V as they run
        ref = torch_backend(models, prefetch_images=0)
        assert rel_err(z0, ref.to_host(run(ref, identity).z0)) <= BOUND


def test_onnx_runtime_prefetch_within_the_group_axis(tiny_export):
    from flashface_trt.runtime.backends.ort import OrtBackend, OrtSettings

    on, off = OrtBackend(tiny_export), OrtBackend(tiny_export, OrtSettings(prefetch_images=0))
    spec = on.sessions["reference_net"].spec
    chunk = on.reference_groups(4)
    assert chunk == min(spec.axes["groups"].max, spec.axes["ref_images"].max // 4) == 4  # not 64 // 4
    z0 = {}
    for name, backend in (("on", on), ("off", off)):
        calls: list[int] = []
        session = backend.sessions["reference_net"]
        original = session.run
        session.run = lambda _o=original, _c=calls, **kw: _c.append(len(kw["timestep"])) or _o(**kw)
        z0[name] = run(backend, register_identity(backend, FACES)).z0, calls
    (z_on, calls_on), (z_off, calls_off) = z0["on"], z0["off"]
    assert calls_on == [4, 3] and len(calls_on) == math.ceil(REQUEST.steps / chunk)
    assert calls_off == [1] * REQUEST.steps
    assert rel_err(z_on, z_off) <= BOUND
    # a GPU provider prefetches one timestep a call: its K/V then stay whole on the device
    on.settings = OrtSettings(provider="cuda")
    assert on.reference_groups(4) == 1
    on.settings = OrtSettings(provider="cuda", prefetch_images=0)
    assert on.reference_groups(4) == 0

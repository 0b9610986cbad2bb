"""The TensorRT engine runtime through the CUDA and TensorRT doubles (tests/fakes): the defects of
issue 13, each with the test that catches it. Numbers here are ONNX Runtime's (the doubles run the
exported graphs), never TensorRT's.
"""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from flashface_trt.runtime.errors import FlashFaceError, InputError, WeightsError
from flashface_trt.runtime.faces.images import synthetic_face
from flashface_trt.runtime.sampling.identities import ReferenceKVCache
from flashface_trt.runtime.sampling.pipeline import generate, register_identity
from flashface_trt.runtime.sampling.sampler import sample

from .fakes import install
from .trt_support import build, denoise_run, max_diff, pixels, request

pytest.importorskip("onnxruntime")
pytest.importorskip("polygraphy", reason="engines are built through polygraphy's API (the trt extra)")

EXPORTED = ("text_encoder", "vae_encoder", "vae_decoder", "reference_net", "unet", "step")


@pytest.fixture(scope="module")
def ort(tiny_export):
    from flashface_trt.runtime.backends.ort import OrtBackend

    return OrtBackend(tiny_export)


@pytest.fixture(scope="module")
def faces():
    return {
        "a": [synthetic_face(200, seed=0)],
        "b": [synthetic_face(200, seed=5), synthetic_face(200, seed=6)],
    }


def backend(engines, **kw):
    from flashface_trt.runtime.backends.trt import TrtBackend

    return TrtBackend(engines, **kw)


# 3. TensorRT 10.x and 11.x: strongly typed builds, no precision flag ---------------------------------
@pytest.mark.parametrize("version", ["10.13.0.35", "11.0.0.12"])
def test_engines_build_strongly_typed_without_fp16_flag_on_tensorrt_10_and_11(
    monkeypatch, tiny_export, tmp_path, version
):
    fakes = install(monkeypatch, version)
    build(tiny_export, tmp_path)
    assert sorted(b["network"] for b in fakes.builds) == sorted(EXPORTED)
    assert all(b["strongly_typed"] and not b["fp16"] for b in fakes.builds)
    be = backend(tmp_path)  # the engines load and run on that version
    hidden = be.to_host(be.encode_text(be.tokenizer.encode(["a", "b"])))[1]
    assert hidden.shape[0] == 77 and np.isfinite(hidden).all()


def test_engines_of_another_tensorrt_are_refused_by_the_engine_cache(fakes, engines, monkeypatch):
    from flashface_trt.runtime.artifacts.engines import StaleEngineError

    install(monkeypatch, "11.0.0.12")  # the engines were built by the fake TensorRT 10.13
    with pytest.raises(StaleEngineError, match="built with TensorRT 10.13.0.35, running 11.0.0.12"):
        backend(engines)


@pytest.mark.parametrize("module", [None, types.ModuleType("tensorrt")], ids=["absent", "stubs-only"])
def test_without_tensorrt_the_build_and_the_backend_say_it_is_not_installed(monkeypatch, engines, module):
    """No `tensorrt`, or one without the library (tensorrt-stubs): "not installed", not AttributeError."""
    from flashface_trt.runtime.artifacts.engines import tensorrt_version

    monkeypatch.setitem(sys.modules, "tensorrt", module)  # None: `import tensorrt` raises ImportError
    with pytest.raises(FlashFaceError, match="TensorRT is not installed"):
        tensorrt_version()
    with pytest.raises(FlashFaceError, match="TensorRT is not installed"):
        backend(engines)


# 9. the detector is not built -------------------------------------------------------------------------
def test_detector_stays_on_onnx_runtime(fakes, engines, tiny_export):
    manifest = json.loads((engines / "engines.json").read_text())
    assert set(manifest["engines"]) == set(EXPORTED)
    assert "detector" not in {b["network"] for b in fakes.builds}
    detector = manifest["export"]["networks"]["detector"]["file"]
    assert (engines / detector).read_bytes() == (tiny_export / detector).read_bytes()


# 8. engine I/O is checked against the manifest --------------------------------------------------------
@pytest.mark.parametrize(
    ("network", "override", "message"),
    [
        ("unet", {"dtypes": {"eps": "HALF"}}, "'eps' is float16 in the engine, float32 in the export"),
        ("text_encoder", {"shapes": {"hidden": ["prompts", 77, 33]}}, r"'hidden' has shape \[-1, 77, 33\]"),
        ("vae_decoder", {"shapes": {"latents": [1, 4, "latent_h", "latent_w"]}}, "'latents' has shape"),
        ("step", {"profile": {"x": [[1, 4, 8, 8]] * 3}}, "'x' accepts .* the manifest promises"),
    ],
)
def test_engine_io_must_match_the_manifest(monkeypatch, tiny_export, tmp_path, network, override, message):
    fakes = install(monkeypatch)
    fakes.overrides[network] = override
    build(tiny_export, tmp_path)
    with pytest.raises(WeightsError, match=message):
        backend(tmp_path)


def test_engines_from_an_export_with_another_step_row_are_refused(monkeypatch, tiny_export, tmp_path):
    """An export whose update graphs take another coefficient row (another version's) is refused
    on load: the runtime's per-step table copies would otherwise run past their rows."""
    fakes = install(monkeypatch)
    fakes.overrides["step"] = {"shapes": {"coef": ["samples", 12]}}  # the engine takes 12 values...
    build(tiny_export, tmp_path)
    manifest = json.loads((tmp_path / "engines.json").read_text())
    manifest["engines"]["step"]["spec"]["inputs"][2]["shape"] = ["samples", 12]  # ...and so does its spec
    (tmp_path / "engines.json").write_text(json.dumps(manifest))
    with pytest.raises(
        WeightsError,
        match=r"step takes \['samples', 12\] step coefficients, this runtime writes \[samples, 11",
    ):
        backend(tmp_path)


def test_output_buffers_must_have_the_engine_output_shape(fakes, engines):
    from flashface_trt.runtime.backends.trt_engine import EAGER, DeviceTensor

    be = backend(engines)
    shapes = {"x": (1, 4, 8, 8), "eps": (2, 4, 8, 8), "coef": (1, 11), "guide": (3, 1)}
    shapes["x_next"] = (2, 4, 8, 8)
    bufs = {n: DeviceTensor.empty(s, "int32" if n == "guide" else "float32") for n, s in shapes.items()}
    with pytest.raises(
        FlashFaceError, match=r"output x_next would be \(1, 4, 8, 8\), its buffer is \(2, 4, 8, 8\)"
    ):
        be.run("step", EAGER, shapes, {n: b.ptr for n, b in bufs.items()})


# 2. every address aligned, every TensorRT result checked ---------------------------------------------
def test_every_tensorrt_result_is_checked(fakes, engines, monkeypatch):
    from flashface_trt.runtime.backends.cuda import copy_to_device
    from flashface_trt.runtime.backends.trt_engine import EAGER, DeviceTensor

    be = backend(engines)
    shapes = {"x": (1, 4, 8, 8), "eps": (2, 4, 8, 8), "coef": (1, 11), "guide": (3, 1)}
    shapes["x_next"] = (1, 4, 8, 8)
    bufs = {n: DeviceTensor.empty(s, "int32" if n == "guide" else "float32") for n, s in shapes.items()}
    for buf in bufs.values():  # valid values: the guidance rows index eps
        copy_to_device(buf.ptr, np.zeros(buf.shape, buf.dtype), be.stream)
    be.stream.synchronize()
    ptrs = {n: b.ptr for n, b in bufs.items()}
    with pytest.raises(FlashFaceError, match=r"address 0x[0-9a-f]+ of 'coef' is not 256-byte aligned"):
        be.run("step", EAGER, shapes, {**ptrs, "coef": ptrs["coef"] + 40})  # a table row at 4 floats
    with pytest.raises(InputError, match=r"input x shape \(9, 4, 8, 8\) is outside the engine"):
        be.run("step", EAGER, {**shapes, "x": (9, 4, 8, 8)}, ptrs)
    ctx_type = type(be.engines["step"].context(EAGER, be.memory))
    monkeypatch.setattr(ctx_type, "set_tensor_address", lambda self, name, ptr: False)
    with pytest.raises(FlashFaceError, match="TensorRT refused the address 0x[0-9a-f]+ of 'x'"):
        be.run("step", EAGER, shapes, ptrs)
    monkeypatch.undo()
    monkeypatch.setattr(ctx_type, "execute_async_v3", lambda self, stream: False)
    with pytest.raises(FlashFaceError, match="step: TensorRT enqueue failed"):
        be.run("step", EAGER, shapes, ptrs)


# 10. an error inside a capture is the one reported ----------------------------------------------------
def test_capture_reports_the_error_of_its_body(monkeypatch):
    install(monkeypatch)
    from flashface_trt.runtime.backends.cuda import CudaError, CudaGraph, Stream

    stream = Stream()
    with pytest.raises(CudaError, match="cudaStreamSynchronize failed: cudaErrorStreamCaptureUnsupported"):
        CudaGraph(stream).capture(stream.synchronize)  # a host sync inside the capture
    with pytest.raises(ValueError, match="boom"):
        CudaGraph(stream).capture(lambda: (_ for _ in ()).throw(ValueError("boom")))
    stream.synchronize()  # no capture is left open on the stream
    graph = CudaGraph(stream)
    graph.capture(lambda: None)
    graph.replay()
    graph.destroy()


# 6. K/V bytes of ONNX Runtime device values ----------------------------------------------------------
def test_kv_cache_sizes_ort_values_by_their_element_type():
    ort = pytest.importorskip("onnxruntime")
    half = ort.OrtValue.ortvalue_from_numpy(np.zeros((3, 5), np.float16))
    full = ort.OrtValue.ortvalue_from_numpy(np.zeros((3, 5), np.float32))
    cache = ReferenceKVCache(budget_bytes=2 * 30)  # two float16 K/V entries of 30 bytes each
    cache.put("a", [half])
    cache.put("b", {"k": half})
    assert cache.bytes == 60 and cache.evictions == 0
    cache.put("c", full)  # the same shape in float32: 60 bytes, the whole budget
    assert cache.stats()["entries"] == 1 and cache.bytes == 60 and cache.evictions == 2


# 4. graphs keyed by shapes only, bounded; K/V copied into static buffers ----------------------------
def test_graphs_are_keyed_by_shape_and_survive_identities_step_counts_and_kv_eviction(
    fakes, engines, ort, faces
):
    probe = backend(engines)
    generate(probe, request(steps=1), register_identity(probe, faces["a"]))
    entry = probe.kv_cache.bytes  # one step's reference K/V (every identity pads to 4 faces)
    be = backend(engines, max_shapes=2, kv_cache_bytes=int(2.5 * entry))  # 2 steps of K/V: evictions
    ida, idb = register_identity(be, faces["a"]), register_identity(be, faces["b"])
    oa, ob = register_identity(ort, faces["a"]), register_identity(ort, faces["b"])
    runs = [
        (request(), ida, oa),
        (request(), idb, ob),
        (request(steps=4), ida, oa),
        (request(steps=5), idb, ob),
    ]
    for i, (req, ti, oi) in enumerate(runs):
        assert max_diff(generate(be, req, ti), generate(ort, req, oi)) <= 1, f"request {i}"
        assert be.graphs.captures == 2, f"request {i}: one graph per bucket (2-way, 3-way), captured once"
    assert be.kv_cache.evictions > 0 and not fakes.cuda.faults  # evicted K/V: no graph reads it
    small = request(size=(64, 96), num_samples=2)
    assert max_diff(generate(be, small, ida), generate(ort, small, oa)) <= 1
    assert len(be.states) == 2 and len(be.graphs.graphs) <= 2 and be.graphs.captures == 4
    assert all(len(e.contexts) <= 3 for e in be.engines.values())  # eager + the live buckets' two


# 7. interleaved requests keep their own prompt, mask and buffers --------------------------------------
@pytest.mark.parametrize("sizes", [((64, 64), (64, 64)), ((64, 64), (64, 96))])
def test_interleaved_requests_keep_their_prompt_mask_and_buffers(fakes, engines, ort, faces, sizes):
    be = backend(engines, max_shapes=2)
    ida, idb = register_identity(be, faces["a"]), register_identity(be, faces["b"])
    reqs = [request("a man", sizes[0]), request("a woman in a hat", sizes[1], face_bbox=(0.1, 0.1, 0.5, 0.6))]
    (da, xa, steps), (db, xb, _) = denoise_run(be, reqs[0], ida), denoise_run(be, reqs[1], idb)
    for step in steps:  # A, B, A, B, ...: each request's values are loaded again when it resumes
        xa, xb = da(xa, step), db(xb, step)
    for z, req, faces_ in ((xa, reqs[0], faces["a"]), (xb, reqs[1], faces["b"])):
        assert max_diff(be.decode(z), generate(ort, req, faces_)) <= 1
    later = request("a child", sizes[0])  # a new request of A's shape, after A's buffers were evicted
    assert max_diff(generate(be, later, ida), generate(ort, later, faces["a"])) <= 1
    assert not fakes.cuda.faults


def test_a_request_alone_and_interleaved_give_the_same_latents(fakes, engines, faces):
    be = backend(engines)
    ida = register_identity(be, faces["a"])
    den, x, steps = denoise_run(be, request(), ida)
    alone = be.to_host(sample(den, x, steps)).copy()
    other, y, _ = denoise_run(be, request("a woman", face_bbox=(0.0, 0.0, 0.0, 0.0)), ida)
    den, x, _ = denoise_run(be, request(), ida)
    for step in steps:
        x, y = den(x, step), other(y, step)
    np.testing.assert_array_equal(be.to_host(x), alone)
    assert not np.array_equal(be.to_host(y), alone)  # the other request really differs
    assert pixels(be.decode(x)).std() > 0


# 11. no host sync per step: pinned staging buffers, rewritten once the event after their copies passed --
def test_steps_never_wait_for_the_host_and_staging_is_rewritten_only_after_its_copies_ran(
    fakes, engines, faces, monkeypatch
):
    from flashface_trt.runtime.backends.cuda import Event

    be = backend(engines)
    ida = register_identity(be, faces["a"])
    den, x, steps = denoise_run(be, request(), ida)
    first = be.to_host(sample(den, x, steps)).copy()  # captures the graphs, caches every step's K/V
    den, x, _ = denoise_run(be, request(), ida)
    syncs = []
    sync = fakes.cuda.cudaStreamSynchronize
    monkeypatch.setattr(fakes.cuda, "cudaStreamSynchronize", lambda s: syncs.append(s) or sync(s))
    z = sample(den, x, steps)
    assert not syncs and any(s.queue for s in fakes.cuda.streams.values())  # every step still queued
    np.testing.assert_array_equal(be.to_host(z), first)
    monkeypatch.setattr(Event, "synchronize", lambda self: None)  # broken: staging rewritten too early
    den, x, _ = denoise_run(be, request(), ida)
    broken = be.to_host(sample(den, x, steps))
    assert np.abs(broken - first).max() > 0.1  # every step read the last step's timesteps and coefficients
    assert not fakes.cuda.faults


# step-level batching: requests of different identities and steps share the engines' steps ---------
def test_mixed_batches_through_the_engines_equal_onnx_runtime(fakes, engines, ort, faces):
    from flashface_trt.runtime.sampling.executor import StepExecutor, Task

    be = backend(engines)
    ids = {name: register_identity(be, f) for name, f in faces.items()}
    reqs = [
        (request("a man", steps=6), "a"),
        (request("a woman", steps=4, num_samples=2, seed=4), "b"),
        (request("a child", steps=5, seed=5, face_bbox=(0.0, 0.0, 0.0, 0.0)), "a"),
    ]
    ex = StepExecutor(be, max_batch_rows=12)
    tasks = [ex.submit(Task(reqs[0][0], ids[reqs[0][1]]))]
    ex.run_once()
    tasks += [ex.submit(Task(req, ids[name])) for req, name in reqs[1:]]  # they join at the second step
    ex.run()
    assert max(ex.batch_sizes) == 3 and not fakes.cuda.faults
    for task, (req, name) in zip(tasks, reqs):
        assert task.error is None, task.error
        assert max_diff(task.images, generate(ort, req, faces[name])) <= 1

"""The test doubles of CUDA and TensorRT enforce the contracts they claim: each one broken on purpose.

The doubles (tests/fakes) stand in for `cuda.bindings.runtime` and `tensorrt` where neither can
run; the runtime's own tests (test_trt_runtime.py) are only as strict as these contracts.
"""

from __future__ import annotations

import ast
import enum
import re

import numpy as np
import pytest

from .conftest import REPO
from .fakes import install
from .fakes.cudart import ALIGN, cudaError_t

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

OK = cudaError_t.cudaSuccess
H2D, D2H, D2D = 1, 2, 3
ENUM_MEMBER = re.compile(r"^    (\w+): typing\.ClassVar\[[\w.]+\]  # value = <[\w.]+: (-?\d+)>$")  # stub text


@pytest.fixture
def fakes(monkeypatch):
    return install(monkeypatch)


@pytest.fixture(scope="module")
def affine(tmp_path_factory):
    """y = x * s + 1 with a dynamic batch: x [batch, 4] float32, s [1] -> y [batch, 4]."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    nodes = [helper.make_node("Mul", ["x", "s"], ["xs"]), helper.make_node("Add", ["xs", "one"], ["y"])]
    model = helper.make_model(
        helper.make_graph(nodes, "affine", [x, s], [y], [one]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    path = tmp_path_factory.mktemp("fake_onnx") / "affine-0123.onnx"
    onnx.save(model, str(path))
    return path


def plan(onnx_path, batch=(1, 2, 4), strongly_typed=True, fp16=False) -> bytes:
    """A fake engine through polygraphy's (patched) build calls, as `engine.build` makes them."""
    pytest.importorskip("polygraphy", reason="engines are built through polygraphy's API (the trt extra)")
    from polygraphy.backend.trt import (
        CreateConfig,
        Profile,
        engine_bytes_from_network,
        network_from_onnx_path,
    )

    profile = Profile()
    profile.add("x", (batch[0], 4), (batch[1], 4), (batch[2], 4))
    network = network_from_onnx_path(str(onnx_path), strongly_typed=strongly_typed)
    return engine_bytes_from_network(network, config=CreateConfig(fp16=fp16, profiles=[profile]))


def malloc(rt, nbytes: int) -> int:
    err, ptr = rt.cudaMalloc(nbytes)
    assert err == OK
    return ptr


def upload(rt, stream, array: np.ndarray) -> int:
    ptr = malloc(rt, array.nbytes)
    assert rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, H2D, stream) == (OK,)
    return ptr


def download(rt, stream, ptr: int, shape, dtype=np.float32) -> np.ndarray:
    out = np.empty(shape, dtype)
    assert rt.cudaMemcpyAsync(out.ctypes.data, ptr, out.nbytes, D2H, stream) == (OK,)
    return out


# -- the CUDA runtime -----------------------------------------------------------------------------


def test_allocations_are_aligned_and_hold_garbage_until_written(fakes):
    rt = fakes.cuda
    ptrs = [malloc(rt, n) for n in (1, 13, 4096)]
    assert all(p % ALIGN == 0 for p in ptrs)
    assert rt.device_view(ptrs[1], 13).tolist() == [0xFF] * 13  # cudaMalloc does not clear memory


def test_stream_work_runs_in_order_when_the_host_waits(fakes):
    rt = fakes.cuda
    _, stream = rt.cudaStreamCreate()
    a = np.arange(8, dtype=np.float32)
    src = upload(rt, stream, a)
    dst = malloc(rt, a.nbytes)
    assert rt.cudaMemcpyAsync(dst, src, a.nbytes, D2D, stream) == (OK,)
    assert np.isnan(np.frombuffer(rt.read(dst, a.nbytes), np.float32)).all()  # queued, not done
    np.testing.assert_array_equal(download(rt, stream, dst, 8), a)  # D2H to pageable memory waits


def test_graph_replay_reads_what_the_captured_addresses_hold_at_launch(fakes):
    rt = fakes.cuda
    _, stream = rt.cudaStreamCreate()
    table = upload(rt, stream, np.array([[1, 2], [3, 4]], np.float32))
    static, out = malloc(rt, 8), malloc(rt, 8)
    assert rt.cudaStreamBeginCapture(stream, 1) == (OK,)
    assert rt.cudaMemcpyAsync(static, table + 8, 8, D2D, stream) == (OK,)  # row 1 of the table
    assert rt.cudaMemcpyAsync(out, static, 8, D2D, stream) == (OK,)
    err, graph = rt.cudaStreamEndCapture(stream)
    err2, exe = rt.cudaGraphInstantiate(graph, 0)
    assert err == err2 == OK
    refill = np.array([[5, 6], [7, 8]], np.float32)
    assert rt.cudaMemcpyAsync(table, refill.ctypes.data, refill.nbytes, H2D, stream) == (OK,)
    assert rt.cudaGraphLaunch(exe, stream) == (OK,)
    np.testing.assert_array_equal(download(rt, stream, out, 2), [7, 8])


@pytest.mark.parametrize(
    "call",
    ["cudaStreamSynchronize", "cudaMemcpy", "copy to host", "copy from host", "cudaMalloc", "cudaFree"],
)
def test_syncs_host_copies_and_allocations_during_capture_fail_and_invalidate_it(fakes, call):
    rt = fakes.cuda
    _, stream = rt.cudaStreamCreate()
    buf, host = malloc(rt, 64), np.zeros(16, np.float32)
    assert rt.cudaStreamBeginCapture(stream, 1) == (OK,)
    result = {
        "cudaStreamSynchronize": lambda: rt.cudaStreamSynchronize(stream),
        "cudaMemcpy": lambda: rt.cudaMemcpy(buf, buf, 4, D2D),
        "copy to host": lambda: rt.cudaMemcpyAsync(host.ctypes.data, buf, 64, D2H, stream),
        "copy from host": lambda: rt.cudaMemcpyAsync(buf, host.ctypes.data, 64, H2D, stream),
        "cudaMalloc": lambda: rt.cudaMalloc(64),
        "cudaFree": lambda: rt.cudaFree(buf),
    }[call]()
    assert result[0] in (
        cudaError_t.cudaErrorStreamCaptureUnsupported,
        cudaError_t.cudaErrorStreamCaptureImplicit,
    )
    assert rt.cudaStreamEndCapture(stream) == (cudaError_t.cudaErrorStreamCaptureInvalidated, None)
    assert rt.cudaStreamSynchronize(stream) == (OK,)  # the stream works again after the capture


def test_copies_out_of_bounds_of_freed_memory_or_the_wrong_way_are_refused(fakes):
    rt = fakes.cuda
    _, stream = rt.cudaStreamCreate()
    a, b, host = malloc(rt, 64), malloc(rt, 64), np.zeros(16, np.float32)
    assert rt.cudaMemcpyAsync(a, b, 65, D2D, stream) == (cudaError_t.cudaErrorInvalidValue,)
    assert rt.cudaMemcpyAsync(a + 32, b, 33, D2D, stream) == (cudaError_t.cudaErrorInvalidValue,)
    assert rt.cudaMemcpyAsync(a, b, 64, H2D, stream) == (cudaError_t.cudaErrorInvalidValue,)  # b: device
    assert rt.cudaMemcpyAsync(host.ctypes.data, a, 64, D2D, stream) == (cudaError_t.cudaErrorInvalidValue,)
    assert rt.cudaFree(b) == (OK,)
    assert rt.cudaMemcpyAsync(a, b, 64, D2D, stream) == (cudaError_t.cudaErrorInvalidValue,)
    assert rt.cudaFree(b) == (cudaError_t.cudaErrorInvalidValue,)  # double free
    assert rt.cudaMemcpyAsync(a, b - 64, 64, D2D, stream) == (cudaError_t.cudaErrorInvalidValue,)


def test_a_graph_that_reads_freed_memory_faults_and_the_fault_is_sticky(fakes):
    rt = fakes.cuda
    _, stream = rt.cudaStreamCreate()
    src, dst = malloc(rt, 16), malloc(rt, 16)
    rt.cudaStreamBeginCapture(stream, 1)
    rt.cudaMemcpyAsync(dst, src, 16, D2D, stream)
    _, graph = rt.cudaStreamEndCapture(stream)
    _, exe = rt.cudaGraphInstantiate(graph, 0)
    assert rt.cudaFree(src) == (OK,)
    assert rt.cudaGraphLaunch(exe, stream) == (OK,)  # asynchronous: the fault shows at the next sync
    assert rt.cudaStreamSynchronize(stream) == (cudaError_t.cudaErrorIllegalAddress,)
    assert rt.cudaMalloc(16) == (cudaError_t.cudaErrorIllegalAddress, None)  # the context is gone
    assert "freed device memory" in rt.faults[-1]


def test_events_time_stream_work(fakes):
    rt = fakes.cuda
    _, stream = rt.cudaStreamCreate()
    (_, start), (_, end) = rt.cudaEventCreate(), rt.cudaEventCreate()
    assert rt.cudaEventElapsedTime(start, end)[0] == cudaError_t.cudaErrorNotReady
    rt.cudaEventRecord(start, stream)
    rt.cudaEventRecord(end, stream)
    assert rt.cudaEventSynchronize(end) == (OK,)
    err, ms = rt.cudaEventElapsedTime(start, end)
    assert err == OK and ms >= 0


def test_pinned_copies_read_the_host_when_they_execute_and_an_event_waits_for_its_stream_prefix(fakes):
    rt = fakes.cuda
    _, stream = rt.cudaStreamCreate()
    _, event = rt.cudaEventCreate()
    err, pinned = rt.cudaMallocHost(16)
    assert err == OK and not rt.is_device(pinned)
    staging = rt.pinned_view(pinned, 16).view(np.float32)
    first, second = malloc(rt, 16), malloc(rt, 16)
    staging[:] = 1.0
    assert rt.cudaMemcpyAsync(first, pinned, 16, H2D, stream) == (OK,)
    assert rt.cudaEventRecord(event, stream) == (OK,)
    assert rt.cudaMemcpyAsync(second, pinned, 16, H2D, stream) == (OK,)
    assert rt.cudaEventSynchronize(event) == (OK,)  # the first copy ran; the second is still queued
    staging[:] = 2.0  # rewritten before the second copy executes: that copy reads 2
    np.testing.assert_array_equal(download(rt, stream, first, 4), [1.0] * 4)
    np.testing.assert_array_equal(download(rt, stream, second, 4), [2.0] * 4)
    assert rt.cudaStreamBeginCapture(stream, 1) == (OK,)  # a copy from pinned memory may be captured
    assert rt.cudaMemcpyAsync(first, pinned, 16, H2D, stream) == (OK,)
    assert rt.cudaStreamEndCapture(stream)[0] == OK
    assert rt.cudaMemcpyAsync(second, pinned, 16, H2D, stream) == (OK,)
    assert rt.cudaFreeHost(pinned) == (OK,)  # it waits for the queued copy first
    assert rt.cudaMemcpyAsync(second, pinned, 16, H2D, stream) == (OK,)  # now pageable: staged at the call
    assert rt.cudaFreeHost(pinned) == (cudaError_t.cudaErrorInvalidValue,)


# -- TensorRT -------------------------------------------------------------------------------------


def engine_and_buffers(fakes, affine, batch=2, **kw):
    trt, rt = fakes.trt, fakes.cuda
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(plan(affine, **kw))
    _, stream = rt.cudaStreamCreate()
    x = np.arange(4 * batch, dtype=np.float32).reshape(batch, 4)
    ptrs = {
        "x": upload(rt, stream, x),
        "s": upload(rt, stream, np.full(1, 3, np.float32)),
        "y": malloc(rt, x.nbytes),
    }
    ctx = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    ctx.set_device_memory(malloc(rt, engine.device_memory_size_v2), engine.device_memory_size_v2)
    return engine, ctx, stream, ptrs, x


def bind(ctx, ptrs, x) -> None:
    assert ctx.set_input_shape("x", x.shape) and ctx.set_input_shape("s", (1,))
    assert all(ctx.set_tensor_address(n, p) for n, p in ptrs.items())


def test_engine_runs_the_onnx_graph_at_the_bound_addresses(fakes, affine):
    trt = fakes.trt
    engine, ctx, stream, ptrs, x = engine_and_buffers(fakes, affine)
    assert [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)] == ["x", "s", "y"]
    assert (
        engine.get_tensor_mode("y") == trt.TensorIOMode.OUTPUT
        and engine.get_tensor_dtype("x").name == "FLOAT"
    )
    assert tuple(engine.get_tensor_shape("x")) == (-1, 4)
    assert [tuple(p) for p in engine.get_tensor_profile_shape("x", 0)] == [(1, 4), (2, 4), (4, 4)]
    bind(ctx, ptrs, x)
    assert tuple(ctx.get_tensor_shape("y")) == (2, 4)
    assert ctx.execute_async_v3(int(stream))
    np.testing.assert_array_equal(download(fakes.cuda, stream, ptrs["y"], x.shape), x * 3 + 1)


def test_unaligned_tensor_address_is_refused(fakes, affine):
    engine, ctx, stream, ptrs, x = engine_and_buffers(fakes, affine)
    assert not ctx.set_tensor_address("x", ptrs["x"] + 4)
    assert not ctx.set_tensor_address("nowhere", ptrs["x"])
    assert "not 256-byte aligned" in engine.logger.messages[0][1]


def test_input_shapes_outside_the_profile_are_refused(fakes, affine):
    _, ctx, *_ = engine_and_buffers(fakes, affine)
    assert ctx.set_input_shape("x", (4, 4))
    assert not ctx.set_input_shape("x", (5, 4))  # batch above the profile's max
    assert not ctx.set_input_shape("x", (2, 5))  # a fixed size changed
    assert not ctx.set_input_shape("x", (2, 4, 1))  # rank
    assert not ctx.set_input_shape("y", (2, 4))  # an output


@pytest.mark.parametrize("missing", ["shape", "address", "memory"])
def test_enqueue_needs_every_shape_address_and_device_memory(fakes, affine, missing):
    engine, ctx, stream, ptrs, x = engine_and_buffers(fakes, affine)
    if missing == "memory":
        ctx = engine.create_execution_context(fakes.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        small = engine.device_memory_size_v2 - 1
        ctx.set_device_memory(malloc(fakes.cuda, small), small)  # refused: too small
    if missing == "address":
        ptrs = {k: v for k, v in ptrs.items() if k != "y"}
    bind(ctx, ptrs, x) if missing != "shape" else [ctx.set_tensor_address(n, p) for n, p in ptrs.items()]
    assert not ctx.execute_async_v3(int(stream))
    assert {"shape": "input shapes not set", "address": "addresses not set", "memory": "smaller than"}[
        missing
    ] in " ".join(m for _, m in engine.logger.messages)


def test_outputs_are_written_in_the_declared_dtype(fakes, affine):
    fakes.overrides["affine"] = {"dtypes": {"y": "HALF"}}
    engine, ctx, stream, ptrs, x = engine_and_buffers(fakes, affine)
    assert engine.get_tensor_dtype("y").name == "HALF"
    bind(ctx, ptrs, x)
    assert ctx.execute_async_v3(int(stream))
    raw = download(fakes.cuda, stream, ptrs["y"], x.size * 4, np.uint8)
    np.testing.assert_array_equal(raw[: x.size * 2].view(np.float16).reshape(x.shape), x * 3 + 1)
    assert (raw[x.size * 2 :] == 0xFF).all()  # half the float32 buffer: never written


def test_a_context_must_run_once_before_it_is_captured(fakes, affine):
    rt = fakes.cuda
    _, ctx, stream, ptrs, x = engine_and_buffers(fakes, affine)
    bind(ctx, ptrs, x)
    rt.cudaStreamBeginCapture(stream, 1)
    assert not ctx.execute_async_v3(int(stream))
    assert rt.cudaStreamEndCapture(stream)[0] == cudaError_t.cudaErrorStreamCaptureInvalidated


def test_replaying_a_graph_after_its_context_changed_faults(fakes, affine):
    rt = fakes.cuda
    _, ctx, stream, ptrs, x = engine_and_buffers(fakes, affine)
    bind(ctx, ptrs, x)
    assert ctx.execute_async_v3(int(stream))  # warm-up outside the capture
    rt.cudaStreamBeginCapture(stream, 1)
    assert ctx.execute_async_v3(int(stream))
    _, graph = rt.cudaStreamEndCapture(stream)
    _, exe = rt.cudaGraphInstantiate(graph, 0)
    assert rt.cudaGraphLaunch(exe, stream) == (OK,) and rt.cudaStreamSynchronize(stream) == (OK,)
    assert ctx.set_tensor_address("y", malloc(rt, x.nbytes))  # e.g. another graph's buffers
    rt.cudaGraphLaunch(exe, stream)
    assert rt.cudaStreamSynchronize(stream) == (cudaError_t.cudaErrorIllegalAddress,)
    assert "changed after this graph captured it" in rt.faults[-1]


def test_an_engine_from_another_tensorrt_version_is_not_deserialized(monkeypatch, affine):
    data = plan(affine) if install(monkeypatch, "10.13.0.35") else b""
    trt = install(monkeypatch, "11.0.0.12").trt
    logger = trt.Logger()
    assert trt.Runtime(logger).deserialize_cuda_engine(data) is None
    assert "built by TensorRT 10.13.0.35, running 11.0.0.12" in logger.messages[-1][1]
    assert trt.Runtime(logger).deserialize_cuda_engine(b"\x00garbage") is None


def test_tensorrt_11_has_no_weak_typing_and_10_refuses_fp16_on_strong_typing(monkeypatch, affine):
    pytest.importorskip("polygraphy", reason="engines are built through polygraphy's API (the trt extra)")
    from polygraphy.exception import PolygraphyException

    trt10 = install(monkeypatch, "10.13.0.35")
    assert hasattr(trt10.trt.BuilderFlag, "FP16")
    plan(affine, strongly_typed=False, fp16=True)  # TensorRT 10's weak typing
    with pytest.raises(PolygraphyException, match="not allowed for strongly typed"):
        plan(affine, strongly_typed=True, fp16=True)
    trt11 = install(monkeypatch, "11.0.0.12")
    assert not hasattr(trt11.trt.BuilderFlag, "FP16")
    with pytest.raises(PolygraphyException, match="fp16 in CreateConfig is not available"):
        plan(affine, strongly_typed=True, fp16=True)
    plan(affine, strongly_typed=False)
    assert trt11.builds[-1]["strongly_typed"]  # 11 builds every network strongly typed


def test_build_refuses_a_dynamic_input_without_a_fitting_profile(fakes, affine):
    pytest.importorskip("polygraphy", reason="engines are built through polygraphy's API (the trt extra)")
    from polygraphy.backend.trt import (
        CreateConfig,
        Profile,
        engine_bytes_from_network,
        network_from_onnx_path,
    )
    from polygraphy.exception import PolygraphyException

    network = network_from_onnx_path(str(affine), strongly_typed=True)
    with pytest.raises(PolygraphyException, match="'x' has no profile shape"):
        engine_bytes_from_network(
            network, config=CreateConfig(profiles=[Profile().add("s", (1,), (1,), (1,))])
        )
    with pytest.raises(PolygraphyException, match="does not fit"):
        engine_bytes_from_network(
            network, config=CreateConfig(profiles=[Profile().add("x", (1, 5), (1, 5), (1, 5))])
        )


# -- the doubles have the real APIs' names and signatures -----------------------------------------


def test_fake_cuda_runtime_has_the_signatures_and_codes_of_cuda_python():
    import inspect

    real = pytest.importorskip("cuda.bindings.runtime")
    from .fakes.cudart import FakeCudaRuntime

    calls = [
        n for n in dir(FakeCudaRuntime) if n.startswith("cuda") and callable(getattr(FakeCudaRuntime, n))
    ]
    assert len(calls) >= 20
    for name in calls:
        if inspect.isclass(getattr(FakeCudaRuntime, name)):  # enums and handle types
            fake_enum, real_enum = getattr(FakeCudaRuntime, name), getattr(real, name)
            for member in getattr(fake_enum, "__members__", {}).values():
                assert int(getattr(real_enum, member.name)) == int(member), f"{name}.{member.name}"
            continue
        fake = list(inspect.signature(getattr(FakeCudaRuntime, name)).parameters)[1:]
        assert fake == list(inspect.signature(getattr(real, name)).parameters), name


def stub_classes() -> tuple[list[str], dict[str, ast.ClassDef]]:
    """TensorRT 10.13's stub lines and top-level classes; skips where typings/ is absent (CI makes it)."""
    stub = REPO / "typings" / "tensorrt_bindings" / "tensorrt.pyi"
    if not stub.is_file():
        pytest.skip(f"no TensorRT stubs at {stub}: run `bash .ci/trt-stubs.sh` (CI does before pytest)")
    text = stub.read_text()
    return text.splitlines(), {c.name: c for c in ast.parse(text).body if isinstance(c, ast.ClassDef)}


def stub_enum(lines: list[str], cls: ast.ClassDef) -> dict[str, int]:
    """Members of a stub class and their values, which the stubs give only in comments."""
    body = lines[cls.lineno - 1 : cls.end_lineno]
    return {m[1]: int(m[2]) for m in map(ENUM_MEMBER.match, body) if m}


def test_fake_tensorrt_has_the_signatures_of_the_tensorrt_stubs(fakes):
    import inspect

    _, classes = stub_classes()
    trt = fakes.trt
    for cls in (trt.Runtime, trt.ICudaEngine, trt.IExecutionContext, trt.Logger):
        stub_cls = classes[cls.__mro__[-2].__name__]  # the fake class's own name (Runtime is subclassed)
        overloads: dict[str, list[list[str]]] = {}
        for fn in stub_cls.body:
            if isinstance(fn, ast.FunctionDef):
                overloads.setdefault(fn.name, []).append([a.arg for a in fn.args.args[1:]])
        for name, member in vars(cls.__mro__[-2]).items():
            if name.startswith("_") or not (callable(member) or isinstance(member, property)):
                continue
            assert name in overloads, f"{cls.__name__}.{name} is not in TensorRT 10.13"
            if callable(member):
                params = list(inspect.signature(member).parameters)[1:]
                assert params in overloads[name], f"{cls.__name__}.{name}{params} vs {overloads[name]}"
    for attr in ("num_io_tensors", "device_memory_size_v2", "num_optimization_profiles", "name"):
        assert attr in {f.name for f in classes["ICudaEngine"].body if isinstance(f, ast.FunctionDef)}


def test_fake_tensorrt_enums_have_the_names_and_values_of_the_tensorrt_stubs(fakes):
    """Every member of every enum of the double (and the logger's severities) exists with TensorRT's value."""
    lines, classes = stub_classes()
    enums = {n: e for n, e in vars(fakes.trt).items() if isinstance(e, type) and issubclass(e, enum.Enum)}
    assert {"DataType", "BuilderFlag", "NetworkDefinitionCreationFlag"} <= set(enums)
    for name, fake in enums.items():
        real = stub_enum(lines, classes[name])
        assert real, f"no members of {name} parsed from the stubs"
        fake_values = {k: m.value for k, m in fake.__members__.items()}
        assert fake_values == {k: real.get(k) for k in fake_values}, name
    severities = {n: v for n, v in vars(fakes.trt.Logger).items() if n.isupper() and isinstance(v, int)}
    real = stub_enum(lines, classes["Logger"])
    assert len(severities) == 5 and severities == {k: real.get(k) for k in severities}

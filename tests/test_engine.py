"""TensorRT engine room without TensorRT: profiles, engine keys and staleness, buffer plans, step tables.

The TensorRT and CUDA-graph code itself cannot run here (no TensorRT, no GPU); it is type-checked
in CI against tensorrt-stubs. The GPU test at the end runs wherever TensorRT and a GPU exist.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import fields, replace

import numpy as np
import pytest

from flashface_trt.cli import main
from flashface_trt.engine.profiles import BuildSettings, engine_profile, engine_spec
from flashface_trt.export.networks import network_specs
from flashface_trt.models.loading import tiny_models
from flashface_trt.runtime.artifacts.axes import (
    AXES,
    REF_TOKENS,
    LoopDims,
    axis,
    io_shapes,
    tokens_per_reference,
)
from flashface_trt.runtime.artifacts.engines import (
    EngineKey,
    GpuIdentity,
    StaleEngineError,
    check_engine,
    write_manifest,
)
from flashface_trt.runtime.artifacts.spec import TINY_SHAPES, ExportShapes, NetworkSpec
from flashface_trt.runtime.backends.buffers import check_kv_wiring
from flashface_trt.runtime.errors import InputError
from flashface_trt.runtime.sampling.batch import Member, RequestContext, pad_plan, plan_batch
from flashface_trt.runtime.sampling.identities import Identity
from flashface_trt.runtime.sampling.sampler import GuidanceParams, plan


@pytest.fixture(scope="module")
def specs() -> dict[str, NetworkSpec]:
    """The exported specs of the tiny model (what export, engines and runtimes all read)."""
    return network_specs(tiny_models(), TINY_SHAPES)


def _kv(spec: NetworkSpec) -> list[tuple[str, str, int]]:
    """(K/V input name, its axis, channels) of every reference K/V input of a spec."""
    return [(t.name, str(t.shape[1]), int(t.shape[2])) for t in spec.inputs if t.name.startswith("ref_k.")]


def test_every_axis_of_every_spec_is_in_the_table(specs):
    used = {d for s in specs.values() for t in (*s.inputs, *s.outputs) for d in t.shape if isinstance(d, str)}
    assert used and all(axis(d) for d in used)
    assert {d if not d.startswith(REF_TOKENS) else REF_TOKENS for d in used} <= set(AXES)


def test_engine_profile_follows_the_build_shapes(specs):
    """Every batched axis reaches the power-of-two bucket of its largest batch of `max_requests`."""
    shapes = ExportShapes(
        max_samples=2, min_size=512, max_size=768, opt_height=768, opt_width=640, max_refs=6
    )
    m = shapes.max_requests  # 4 requests of up to 2 samples
    unet = specs["unet"]
    prof = engine_profile(unet, shapes)
    z = unet.inputs[0].shape[1]
    assert prof["x"] == ((1, z, 64, 64), (1, z, 96, 80), (8, z, 96, 96))  # m x n = 8 samples
    assert prof["masks"][2] == (m, 1, 96, 96) and prof["texts"][2][0] == 2 * m
    for rows in ("sample_rows", "member_rows", "text_rows", "timestep"):
        assert prof[rows] == ((1,), (2,), (32,))  # 3 rows per sample: 24 -> bucket 32
    for rows in ("ref_scale", "ref_group"):
        assert prof[rows] == ((1,), (1,), (16,))  # 2-way steps: 2 x 8 = 16 reference rows
    for name, ax, c in _kv(unet):
        per_ref = tokens_per_reference(unet, ax)
        assert prof[name] == (
            (1, per_ref, c),
            (1, 4 * per_ref, c),
            (m, 6 * per_ref, c),
        )  # one group a request
    for lo, opt, hi in prof.values():
        assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))
    ref = engine_profile(specs["reference_net"], shapes)
    lat = specs["reference_net"].inputs[0].shape[1:]
    assert ref["ref_latents"] == ((1, *lat), (4, *lat), (32, *lat))  # 4 groups x 6 refs -> 32
    assert engine_spec(unet, shapes).axes["latent_w"].opt == 80
    feeds = {k: v[1] for k, v in prof.items()}
    with pytest.raises(InputError, match=r"'x' axis 'samples' = 9 is outside \[1, 8\]"):
        engine_spec(unet, shapes).check_shapes({**feeds, "x": (9, z, 96, 80)})


def _member(samples: int, refs: int, step, size: int, key: str) -> Member:
    ident = Identity(key, np.zeros((refs, 4, 28, 28), np.float32))
    return Member(
        RequestContext(None, ident, None, GuidanceParams()), np.zeros((samples, 4, size, size)), step
    )


def test_export_ranges_and_request_sizes_agree(specs):
    """Every padded batch of up to `max_requests` requests fits every range the export declares."""
    s = TINY_SHAPES
    steps = plan(4, GuidanceParams())
    two, three = steps[0], steps[-1]
    assert not two.three_way and three.three_way
    lat = s.min_size // 8
    for refs in (1, s.max_refs):
        for m in range(1, s.max_requests + 1):
            for samples in {1, s.max_samples}:
                for n3 in range(m + 1):  # n3 of the m requests in their 3-way phase
                    members = [
                        _member(samples, refs, three if i < n3 else two, lat, f"id{i}") for i in range(m)
                    ]
                    padded = pad_plan(plan_batch(members), m)
                    dims = LoopDims.of(padded.key, lat, lat, refs)
                    for name in ("unet", "reference_net", "step"):
                        spec = specs[name]
                        shapes = io_shapes(spec, dims)
                        spec.check_shapes({t.name: shapes[t.name] for t in spec.inputs})
                    assert io_shapes(specs["unet"], dims)["timestep"] == (len(padded.t),)
                    assert io_shapes(specs["unet"], dims)["ref_scale"] == (len(padded.scale),)
                    assert io_shapes(specs["unet"], dims)["enc_rows"] == (len(padded.enc_rows),)
    for n in range(1, s.max_samples + 1):
        dims = LoopDims(n, s.max_size // 8, s.max_size // 8, s.max_refs)  # the decoder reads samples only
        spec = specs["vae_decoder"]
        spec.check_shapes({t.name: io_shapes(spec, dims)[t.name] for t in spec.inputs})


def test_build_settings_validation_and_key():
    with pytest.raises(InputError, match="optimisation level 7"):
        BuildSettings(opt_level=7)
    a, b = BuildSettings(), BuildSettings(shapes=ExportShapes(max_samples=8))
    assert a.key() != b.key() and a.key() == BuildSettings(timing_cache=None).key()


def test_every_export_shape_field_changes_the_engine_key():
    """A build with other ranges on any `ExportShapes` field gets another key and engine file name."""
    base = BuildSettings()
    gpu = GpuIdentity("NVIDIA H200", "9.0")
    name = EngineKey("unet", "ab" * 32, base.key(), "10.13.0", gpu).file_name()
    for f in fields(ExportShapes):
        value = getattr(base.shapes, f.name)
        candidates = (valid_shapes(f.name, value + d) for d in (8, -8, 1, -1))
        shapes = next(s for s in candidates if s is not None)
        settings = BuildSettings(shapes)
        assert settings.key() != base.key(), f"{f.name}={getattr(shapes, f.name)} keeps the key"
        assert EngineKey("unet", "ab" * 32, settings.key(), "10.13.0", gpu).file_name() != name


def valid_shapes(name: str, value: int) -> ExportShapes | None:
    """The default shapes with `name` set to `value`, or None where that is not a valid range."""
    try:
        return replace(ExportShapes(), **{name: value})
    except InputError:
        return None


def test_engine_keys_and_stale_engines(tmp_path):
    h100 = GpuIdentity("NVIDIA H100 80GB HBM3", "9.0")
    key = EngineKey("unet", "ab" * 32, BuildSettings().key(), "10.13.0", h100)
    assert key.file_name() != replace(key, tensorrt="10.14.0").file_name()
    assert key.file_name() != replace(key, gpu=GpuIdentity("NVIDIA L4", "8.9")).file_name()
    engine = tmp_path / key.file_name()
    with pytest.raises(StaleEngineError, match="does not exist"):
        check_engine(engine, "10.13.0", h100)
    engine.write_bytes(b"\0" * 64)  # stands in for a serialised plan: only its manifest is read here
    with pytest.raises(StaleEngineError, match="no readable manifest"):
        check_engine(engine, "10.13.0", h100)
    write_manifest(engine, key, 12.3)
    assert check_engine(engine, "10.13.0", h100, "ab" * 32)["build_seconds"] == 12.3
    with pytest.raises(StaleEngineError, match=r"TensorRT 10.13.0, running 10.14.0.*flashface-trt build"):
        check_engine(engine, "10.14.0", h100)
    with pytest.raises(
        StaleEngineError, match=r"built for NVIDIA H100 80GB HBM3 \(sm 9.0\), running on NVIDIA L4"
    ):
        check_engine(engine, "10.13.0", GpuIdentity("NVIDIA L4", "8.9"))
    with pytest.raises(StaleEngineError, match="another ONNX graph"):
        check_engine(engine, "10.13.0", h100, "cd" * 32)
    engine.write_bytes(b"\0" * 65)
    with pytest.raises(StaleEngineError, match="changed after it was built"):
        check_engine(engine, "10.13.0", h100)
    manifest = json.loads(engine.with_suffix(".plan.json").read_text())
    assert manifest["key"]["gpu"] == {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def test_engines_are_checked_against_their_build_time_sha256(tmp_path):
    """An engine whose content changed at the same size is stale; so is one built without a sha256."""
    gpu = GpuIdentity("NVIDIA H200", "9.0")
    key = EngineKey("unet", "ab" * 32, BuildSettings().key(), "10.13.0", gpu)
    engine = tmp_path / key.file_name()
    engine.write_bytes(bytes(range(256)) * 4)
    write_manifest(engine, key, 1.0)
    assert check_engine(engine, "10.13.0", gpu)["sha256"] == hashlib.sha256(engine.read_bytes()).hexdigest()
    engine.write_bytes(bytes(range(255, -1, -1)) * 4)  # same size, other content
    with pytest.raises(StaleEngineError, match="changed after it was built"):
        check_engine(engine, "10.13.0", gpu)
    manifest_file = engine.with_suffix(".plan.json")
    manifest = json.loads(manifest_file.read_text())
    del manifest["sha256"]
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(StaleEngineError, match="records no sha256"):
        check_engine(engine, "10.13.0", gpu)


def test_buffer_plan_and_kv_wiring(specs):
    dims = LoopDims(samples=2, latent_h=24, latent_w=20, num_refs=3, rows=6, ref_rows=2, members=1)
    unet = specs["unet"]
    shapes = io_shapes(unet, dims)
    z = unet.inputs[0].shape[1]
    assert shapes["x"] == (2, z, 24, 20) and shapes["eps"] == (6, z, 24, 20)
    assert shapes["timestep"] == (6,) and shapes["ref_scale"] == (2,) and shapes["masks"] == (1, 1, 24, 20)
    for name, ax, c in _kv(unet):
        assert shapes[name] == (1, 3 * tokens_per_reference(unet, ax), c)
    check_kv_wiring(specs["reference_net"], unet, dims)
    ref = specs["reference_net"]
    first = ref.outputs[0]
    broken = replace(
        ref, outputs=(replace(first, dtype="float16" if first.dtype == "float32" else "float32"),)
    )
    with pytest.raises(InputError, match="dtypes differ"):
        check_kv_wiring(broken, unet, dims)
    renamed = replace(ref, outputs=(replace(first, name="ref_k.nowhere"),))
    with pytest.raises(InputError, match="is not a UNet input"):
        check_kv_wiring(renamed, unet, dims)
    with pytest.raises(InputError, match="samples=0"):
        LoopDims(0, 8, 8, 1)
    with pytest.raises(InputError, match="ref_rows=3 must be in"):
        LoopDims(1, 8, 8, 1, rows=2, ref_rows=3)


def test_cuda_errors_name_the_call():
    rt = pytest.importorskip("cuda.bindings.runtime")
    from flashface_trt.runtime.backends.cuda import CudaError, check, device_count

    assert check((rt.cudaError_t.cudaSuccess, 7), "cudaGetDeviceCount") == 7
    with pytest.raises(CudaError, match="cudaMalloc failed: cudaErrorMemoryAllocation"):
        check((rt.cudaError_t.cudaErrorMemoryAllocation, None), "cudaMalloc")
    assert device_count() >= 0


def test_commands_without_tensorrt_fail_clearly(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    assert main(["build", "--onnx", str(tmp_path), "--out", str(tmp_path / "e")]) == 2
    assert "manifest.json" in capsys.readouterr().err  # the export is checked before TensorRT
    gen = ["generate", "--engines", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "o.png")]
    assert main(gen) == 2
    err = capsys.readouterr().err
    assert "TensorRT" in err or "engines.json" in err


@pytest.mark.parametrize("where", ["doubles", "gpu"])
def test_tensorrt_end_to_end(tmp_path, tiny_export, monkeypatch, where):
    """Build the tiny engines, verify them, replay the graphed loop: on TensorRT and a GPU where they
    exist, and everywhere through the test doubles (tests/fakes), so that this test itself has run."""
    pytest.importorskip("onnxruntime")
    if where == "doubles":
        from .fakes import install

        install(monkeypatch)
    else:
        pytest.importorskip("tensorrt")
        from flashface_trt.runtime.backends.cuda import device_count

        if device_count() == 0:
            pytest.skip("no CUDA device")
    from flashface_trt.engine.build import build_engines
    from flashface_trt.engine.verify import verify
    from flashface_trt.runtime.backends.ort import OrtBackend
    from flashface_trt.runtime.backends.trt import TrtBackend
    from flashface_trt.runtime.faces.images import synthetic_face
    from flashface_trt.runtime.sampling.pipeline import generate, register_identity
    from flashface_trt.runtime.sampling.request import GenerationRequest

    engines = tmp_path / "engines"
    build_engines(tiny_export, engines, BuildSettings(shapes=TINY_SHAPES, workspace_gib=2.0))
    rows = verify(engines, tiny_export)
    for r in rows:
        print(f"\n{r['network']} {r['output']}: rel err {r['rel_err']:.2e}")
    assert max(r["rel_err"] for r in rows) <= 5e-2  # fp16 kernels against float32 graphs
    req = GenerationRequest(prompt="a man", steps=4, height=128, width=128)  # one 2-way, three 3-way
    faces = [synthetic_face(200, seed=i) for i in range(2)]
    trt_backend = TrtBackend(engines)
    identity = register_identity(trt_backend, faces)
    first = generate(trt_backend, req, identity)[0]  # 3-way: eager, capture, replay; 2-way: eager
    second = generate(trt_backend, req, identity)[0]  # 2-way captured; K/V from the cache
    assert trt_backend.kv_cache.hits >= req.steps and len(trt_backend.graphs.graphs) == 2
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    ref = generate(OrtBackend(tiny_export), req, faces)[0]
    diff = np.abs(np.asarray(first, np.int16) - np.asarray(ref, np.int16))
    print(
        f"\n{where}: engines vs ONNX Runtime fp32 image: max pixel diff {diff.max()}, mean {diff.mean():.2f}"
    )
    assert diff.mean() <= 8


def test_engine_modules_import_no_torch():
    from .conftest import run_without_torch

    script = """
        import flashface_trt.engine.build, flashface_trt.engine.verify, flashface_trt.runtime.backends.trt
        import flashface_trt.commands
        print("ok")
        """
    out = run_without_torch(script)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_onnxruntime_tensorrt_provider_options(tmp_path, specs):
    from flashface_trt.runtime.backends.ort import trt_provider_options

    opts = trt_provider_options(specs["reference_net"], tmp_path / "trt_cache")
    assert opts["trt_fp16_enable"] and opts["trt_engine_cache_enable"]
    assert opts["trt_engine_cache_path"] == str(tmp_path / "trt_cache")
    spec = specs["reference_net"]
    lat = "x".join(map(str, spec.inputs[0].shape[1:]))
    ctx = "x".join(map(str, spec.inputs[2].shape[1:]))
    assert opts["trt_profile_min_shapes"].split(",")[0] == f"ref_latents:1x{lat}"
    max_images = spec.axes["ref_images"].max
    assert opts["trt_profile_max_shapes"].split(",")[0] == f"ref_latents:{max_images}x{lat}"
    opt = opts["trt_profile_opt_shapes"]
    assert "timestep:1," in opt and f"context:1x{ctx}" in opt


def test_verify_bounds_fail_naming_the_network():
    from flashface_trt.engine.verify import THRESHOLDS, VerificationError, check, format_table

    def row(network, err):
        bound = THRESHOLDS[network]
        return {
            "network": network,
            "output": "out",
            "shape": [1],
            "rel_err": err,
            "bound": bound,
            "ok": err <= bound,
        }

    good = [row("unet", 1.9e-2), row("step", 0.0)]
    check(good)
    bad = [*good, row("text_encoder", 0.5), row("step", 2e-5)]
    with pytest.raises(VerificationError, match=r"text_encoder.out 5.00e-01 > 1.0e-02; step.out 2.00e-05"):
        check(bad)
    assert format_table(bad).count("EXCEEDED") == 2
    assert set(THRESHOLDS) == {"text_encoder", "vae_encoder", "vae_decoder", "reference_net", "unet", "step"}


def test_build_takes_the_export_shapes(tiny_export):
    """Without build flags, engines accept exactly the export's ranges (not the full-size defaults)."""
    from flashface_trt.engine.build import export_shapes
    from flashface_trt.runtime.artifacts.exports import read_export

    shapes = export_shapes(read_export(tiny_export))
    assert shapes == TINY_SHAPES and BuildSettings(shapes).key()["shapes"]["min_size"] == TINY_SHAPES.min_size

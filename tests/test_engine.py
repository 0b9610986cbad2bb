"""TensorRT engine room without TensorRT: profiles, engine keys and staleness, buffer plans, step tables.

The TensorRT and CUDA-graph code itself cannot run here (no TensorRT, no GPU); it is type-checked
in CI against tensorrt-stubs. The GPU test at the end runs wherever TensorRT and a GPU exist.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from flashface_trt.cli import main
from flashface_trt.engine.cache import EngineKey, GpuIdentity, StaleEngineError, check_engine, write_manifest
from flashface_trt.engine.profiles import BuildSettings, build_axes, check_shapes, engine_profile
from flashface_trt.errors import InputError
from flashface_trt.export.spec import AxisRange, ExportShapes, NetworkSpec, TensorSpec
from flashface_trt.runtime.buffers import LoopDims, check_kv_wiring, io_shapes, step_tables

L0, L1, C0, C1 = 49, 16, 64, 128  # tokens per reference and channels of two reference layers


def _specs() -> dict[str, NetworkSpec]:
    """Specs shaped like the exported ReferenceNet/UNet, with two reference layers."""
    kv_axes = {"ref_tokens_0": AxisRange(L0, 4 * L0, 4 * L0), "ref_tokens_1": AxisRange(L1, 4 * L1, 4 * L1)}
    kv = (
        TensorSpec("ref_k.middle.1.blocks.0", "float16", (1, "ref_tokens_0", C0)),
        TensorSpec("ref_v.middle.1.blocks.0", "float16", (1, "ref_tokens_0", C0)),
        TensorSpec("ref_k.decoder.3.1.blocks.0", "float16", (1, "ref_tokens_1", C1)),
        TensorSpec("ref_v.decoder.3.1.blocks.0", "float16", (1, "ref_tokens_1", C1)),
    )
    lat = AxisRange(32, 96, 128)
    unet = NetworkSpec(
        "unet",
        (
            TensorSpec("x", "float32", ("batch", 4, "latent_h", "latent_w")),
            TensorSpec("mask", "float32", (1, 1, "latent_h", "latent_w")),
            TensorSpec("timestep", "float32", ("batch",)),
            TensorSpec("context", "float32", ("batch", 77, 768)),
            TensorSpec("ref_scale", "float32", ("b_ref",)),
            *kv,
        ),
        (TensorSpec("eps", "float32", ("batch", 4, "latent_h", "latent_w")),),
        {
            "batch": AxisRange(1, 2, 12),
            "b_ref": AxisRange(1, 1, 8),
            **kv_axes,
            "latent_h": lat,
            "latent_w": lat,
        },
    )
    ref = NetworkSpec(
        "reference_net",
        (
            TensorSpec("ref_latents", "float32", ("num_refs", 4, 28, 28)),
            TensorSpec("timestep", "float32", (1,)),
            TensorSpec("context", "float32", (1, 77, 768)),
        ),
        kv,
        {"num_refs": AxisRange(1, 4, 4), **kv_axes},
    )
    return {"unet": unet, "reference_net": ref}


def test_engine_profile_follows_the_build_shapes():
    shapes = ExportShapes(
        max_samples=2, min_size=512, max_size=768, opt_height=768, opt_width=640, max_refs=6
    )
    prof = engine_profile(_specs()["unet"], shapes)
    assert prof["x"] == ((1, 4, 64, 64), (2, 4, 96, 80), (6, 4, 96, 96))  # batch up to 3 x 2 samples
    assert prof["ref_scale"] == ((1,), (1,), (4,))  # B_ref up to 2 x samples (2-way steps)
    assert prof["ref_k.middle.1.blocks.0"] == ((1, L0, C0), (1, 4 * L0, C0), (1, 6 * L0, C0))
    assert prof["ref_v.decoder.3.1.blocks.0"][2] == (1, 6 * L1, C1)
    for lo, opt, hi in prof.values():
        assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))
    ref = engine_profile(_specs()["reference_net"], shapes)
    assert ref["ref_latents"] == ((1, 4, 28, 28), (4, 4, 28, 28), (6, 4, 28, 28))
    axes = build_axes(_specs()["unet"], shapes)
    assert axes["latent_w"] == AxisRange(64, 80, 96)
    with pytest.raises(InputError, match=r"'x' axis 'batch' = 9 is outside \[1, 6\]"):
        check_shapes(_specs()["unet"], shapes, {**{k: v[1] for k, v in prof.items()}, "x": (9, 4, 96, 80)})


def test_build_settings_validation_and_key():
    with pytest.raises(InputError, match="optimisation level 7"):
        BuildSettings(opt_level=7)
    a, b = BuildSettings(), BuildSettings(shapes=ExportShapes(max_samples=8))
    assert a.key() != b.key() and a.key() == BuildSettings(timing_cache=None).key()


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


def test_buffer_plan_and_kv_wiring():
    specs = _specs()
    dims = LoopDims(samples=2, latent_h=96, latent_w=80, num_refs=3, steps=30)
    three = io_shapes(specs["unet"], dims, 3)
    two = io_shapes(specs["unet"], dims, 2)
    assert three["x"] == (6, 4, 96, 80) and three["ref_scale"] == (2,) and three["mask"] == (1, 1, 96, 80)
    assert two["x"] == (4, 4, 96, 80) and two["ref_scale"] == (4,)
    assert three["ref_k.middle.1.blocks.0"] == (1, 3 * L0, C0) == two["ref_k.middle.1.blocks.0"]
    check_kv_wiring(specs["reference_net"], specs["unet"], dims)
    broken = NetworkSpec("reference_net", specs["reference_net"].inputs, specs["reference_net"].outputs[:1])
    broken = replace(
        broken, outputs=(replace(broken.outputs[0], dtype="float32"),), axes=specs["reference_net"].axes
    )
    with pytest.raises(InputError, match="dtypes differ"):
        check_kv_wiring(broken, specs["unet"], dims)
    with pytest.raises(InputError, match="samples=0"):
        LoopDims(0, 8, 8, 1, 1)


def test_step_tables():
    dims = LoopDims(samples=2, latent_h=8, latent_w=8, num_refs=1, steps=3)
    coef, t_unet, lam, t_ref = step_tables(
        [[1.0] * 9, [2.0] * 9, [3.0] * 9], [999, 500, 1], [0.85, 1.2, 1.2], dims
    )
    assert coef.shape == (3, 9) and t_unet.shape == (3, 6) and lam.shape == (3, 4) and t_ref.shape == (3, 1)
    assert t_unet[1].tolist() == [500.0] * 6 and lam[0].tolist() == pytest.approx([0.85] * 4)
    assert all(a.dtype == np.float32 for a in (coef, t_unet, lam, t_ref))
    with pytest.raises(InputError, match="3 rows"):
        step_tables([[1.0] * 9], [1], [1.0], dims)


def test_cuda_errors_name_the_call():
    rt = pytest.importorskip("cuda.bindings.runtime")
    from flashface_trt.runtime.cuda import CudaError, check, device_count

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


def test_tensorrt_end_to_end(tmp_path):
    """Where TensorRT and a GPU exist: build the tiny engines, verify them, replay the graphed loop."""
    pytest.importorskip("tensorrt")
    pytest.importorskip("onnxruntime")
    from flashface_trt.runtime.cuda import device_count

    if device_count() == 0:
        pytest.skip("no CUDA device")
    from flashface_trt.engine.build import build_engines
    from flashface_trt.engine.verify import verify
    from flashface_trt.export.exporter import ExportSettings, export_models
    from flashface_trt.export.spec import TINY_SHAPES
    from flashface_trt.models.loading import tiny_models
    from flashface_trt.runtime.images import synthetic_face
    from flashface_trt.runtime.ort_backend import OrtBackend
    from flashface_trt.runtime.pipeline import generate, register_identity
    from flashface_trt.runtime.request import GenerationRequest
    from flashface_trt.runtime.trt_backend import TrtBackend

    onnx_dir, engines = tmp_path / "onnx", tmp_path / "engines"
    export_models(tiny_models(), onnx_dir, ExportSettings(shapes=TINY_SHAPES))
    build_engines(onnx_dir, engines, BuildSettings(shapes=TINY_SHAPES, workspace_gib=2.0))
    rows = verify(engines, onnx_dir)
    for r in rows:
        print(f"\n{r['network']} {r['output']}: rel err {r['rel_err']:.2e}")
    assert max(r["rel_err"] for r in rows) <= 5e-2  # fp16 kernels against float32 graphs
    req = GenerationRequest(prompt="a man", steps=4, height=128, width=128)
    faces = [synthetic_face(200, seed=i) for i in range(2)]
    trt_backend = TrtBackend(engines)
    identity = register_identity(trt_backend, faces)
    first = generate(trt_backend, req, identity)[0]  # eager run, then the graph is captured
    second = generate(trt_backend, req, identity)[0]  # one graph launch, K/V from the cache
    assert trt_backend.kv_cache.hits >= req.steps and len(trt_backend.graphs) == 1
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    ref = generate(OrtBackend(onnx_dir), req, faces)[0]
    diff = np.abs(np.asarray(first, np.int16) - np.asarray(ref, np.int16))
    print(f"\nTensorRT fp16 vs ONNX Runtime fp32 image: max pixel diff {diff.max()}, mean {diff.mean():.2f}")
    assert diff.mean() <= 8


def test_engine_modules_import_no_torch():
    from .conftest import run_without_torch

    script = """
        import flashface_trt.engine.build, flashface_trt.engine.verify, flashface_trt.runtime.trt_backend
        import flashface_trt.commands
        print("ok")
        """
    out = run_without_torch(script)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_onnxruntime_tensorrt_provider_options(tmp_path):
    from flashface_trt.runtime.ort_backend import trt_provider_options

    opts = trt_provider_options(_specs()["reference_net"], tmp_path / "trt_cache")
    assert opts["trt_fp16_enable"] and opts["trt_engine_cache_enable"]
    assert opts["trt_engine_cache_path"] == str(tmp_path / "trt_cache")
    assert opts["trt_profile_min_shapes"].split(",")[0] == "ref_latents:1x4x28x28"
    assert opts["trt_profile_max_shapes"].split(",")[0] == "ref_latents:4x4x28x28"
    assert (
        "timestep:1," in opts["trt_profile_opt_shapes"]
        and "context:1x77x768" in opts["trt_profile_opt_shapes"]
    )

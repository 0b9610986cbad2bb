"""TensorRT engine room without TensorRT: profiles, engine keys and staleness, buffer plans, step tables.

The TensorRT and CUDA-graph code itself cannot run here (no TensorRT, no GPU); it is type-checked
in CI against tensorrt-stubs. The GPU test at the end runs wherever TensorRT and a GPU exist.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest

from flashface_trt.cli import main
from flashface_trt.engine.profiles import BuildSettings, engine_profile, engine_spec
from flashface_trt.export.networks import network_specs
from flashface_trt.models.loading import tiny_models
from flashface_trt.runtime.axes import AXES, REF_TOKENS, LoopDims, axis, io_shapes, tokens_per_reference
from flashface_trt.runtime.buffers import check_kv_wiring, step_tables
from flashface_trt.runtime.engines import (
    EngineKey,
    GpuIdentity,
    StaleEngineError,
    check_engine,
    write_manifest,
)
from flashface_trt.runtime.errors import InputError
from flashface_trt.runtime.layout import BatchLayout
from flashface_trt.runtime.sampler import GuidanceParams, plan
from flashface_trt.runtime.spec import TINY_SHAPES, ExportShapes, NetworkSpec


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
    shapes = ExportShapes(
        max_samples=2, min_size=512, max_size=768, opt_height=768, opt_width=640, max_refs=6
    )
    unet = specs["unet"]
    prof = engine_profile(unet, shapes)
    z = unet.inputs[0].shape[1]
    assert prof["x"] == ((1, z, 64, 64), (2, z, 96, 80), (6, z, 96, 96))  # batch up to 3 x 2 samples
    assert prof["ref_scale"] == ((1,), (1,), (4,))  # B_ref up to 2 x samples (2-way steps)
    for name, ax, c in _kv(unet):
        per_ref = tokens_per_reference(unet, ax)
        assert prof[name] == ((1, per_ref, c), (1, 4 * per_ref, c), (1, 6 * per_ref, c))
    for lo, opt, hi in prof.values():
        assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))
    ref = engine_profile(specs["reference_net"], shapes)
    lat = specs["reference_net"].inputs[0].shape[1:]
    assert ref["ref_latents"] == ((1, *lat), (4, *lat), (6, *lat))
    assert engine_spec(unet, shapes).axes["latent_w"].opt == 80
    feeds = {k: v[1] for k, v in prof.items()}
    with pytest.raises(InputError, match=r"'x' axis 'batch' = 9 is outside \[1, 6\]"):
        engine_spec(unet, shapes).check_shapes({**feeds, "x": (9, z, 96, 80)})


def test_export_ranges_and_request_sizes_agree(specs):
    """What an export accepts (spec axes) contains what a request of those shapes needs (axis sizes)."""
    s = TINY_SHAPES
    for n in range(1, s.max_samples + 1):
        for refs in range(1, s.max_refs + 1):
            dims = LoopDims(n, s.min_size // 8, s.max_size // 8, refs, 4)
            for k in (2, 3):
                for name in ("unet", "reference_net", f"step_{k}way", "vae_decoder"):
                    spec = specs[name]
                    shapes = io_shapes(spec, dims, k)
                    spec.check_shapes({t.name: shapes[t.name] for t in spec.inputs})
                assert io_shapes(specs["unet"], dims, k)["x"][0] == BatchLayout(n, k == 3).rows
                assert io_shapes(specs["unet"], dims, k)["ref_scale"] == (BatchLayout(n, k == 3).ref_rows,)


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
    dims = LoopDims(samples=2, latent_h=24, latent_w=20, num_refs=3, steps=30)
    unet = specs["unet"]
    three, two = io_shapes(unet, dims, 3), io_shapes(unet, dims, 2)
    z = unet.inputs[0].shape[1]
    assert three["x"] == (6, z, 24, 20) and three["ref_scale"] == (2,) and three["mask"] == (1, 1, 24, 20)
    assert two["x"] == (4, z, 24, 20) and two["ref_scale"] == (4,)
    for name, ax, c in _kv(unet):
        assert three[name] == (1, 3 * tokens_per_reference(unet, ax), c) == two[name]
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
        LoopDims(0, 8, 8, 1, 1)


def test_step_tables():
    g = GuidanceParams(guide_rescale=0.7)
    steps = plan(3, g)
    tables = step_tables(steps, g, samples=2)
    assert tables["coef"].shape == (3, 10) and tables["t"].shape == (3, 6) and tables["lam"].shape == (3, 4)
    assert tables["t"][1].tolist() == [float(steps[1].t)] * 6
    assert tables["lam"][0].tolist() == pytest.approx([steps[0].ref_strength] * 4)
    np.testing.assert_array_equal(tables["coef"][2], np.float32(steps[2].coefficients(g)))
    assert tables["coef"][0, 3] == np.float32(1.0 - 0.7)  # rounded from float64, as the official scalar
    assert all(a.dtype == np.float32 for a in tables.values())


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
        from flashface_trt.runtime.cuda import device_count

        if device_count() == 0:
            pytest.skip("no CUDA device")
    from flashface_trt.engine.build import build_engines
    from flashface_trt.engine.verify import verify
    from flashface_trt.runtime.images import synthetic_face
    from flashface_trt.runtime.ort_backend import OrtBackend
    from flashface_trt.runtime.pipeline import generate, register_identity
    from flashface_trt.runtime.request import GenerationRequest
    from flashface_trt.runtime.trt_backend import TrtBackend

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
        import flashface_trt.engine.build, flashface_trt.engine.verify, flashface_trt.runtime.trt_backend
        import flashface_trt.commands
        print("ok")
        """
    out = run_without_torch(script)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_onnxruntime_tensorrt_provider_options(tmp_path, specs):
    from flashface_trt.runtime.ort_backend import trt_provider_options

    opts = trt_provider_options(specs["reference_net"], tmp_path / "trt_cache")
    assert opts["trt_fp16_enable"] and opts["trt_engine_cache_enable"]
    assert opts["trt_engine_cache_path"] == str(tmp_path / "trt_cache")
    spec = specs["reference_net"]
    lat = "x".join(map(str, spec.inputs[0].shape[1:]))
    ctx = "x".join(map(str, spec.inputs[2].shape))
    assert opts["trt_profile_min_shapes"].split(",")[0] == f"ref_latents:1x{lat}"
    max_refs = spec.axes["num_refs"].max
    assert opts["trt_profile_max_shapes"].split(",")[0] == f"ref_latents:{max_refs}x{lat}"
    assert (
        "timestep:1," in opts["trt_profile_opt_shapes"] and f"context:{ctx}" in opts["trt_profile_opt_shapes"]
    )


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

    good = [row("unet", 1.9e-2), row("step_3way", 0.0)]
    check(good)
    bad = [*good, row("text_encoder", 0.5), row("step_2way", 2e-5)]
    with pytest.raises(
        VerificationError, match=r"text_encoder.out 5.00e-01 > 1.0e-02; step_2way.out 2.00e-05"
    ):
        check(bad)
    assert format_table(bad).count("EXCEEDED") == 2
    assert set(THRESHOLDS) >= {"text_encoder", "vae_encoder", "vae_decoder", "reference_net", "unet"}


def test_build_takes_the_export_shapes(tiny_export):
    """Without build flags, engines accept exactly the export's ranges (not the full-size defaults)."""
    from flashface_trt.engine.build import export_shapes
    from flashface_trt.runtime.exports import read_export

    shapes = export_shapes(read_export(tiny_export))
    assert shapes == TINY_SHAPES and BuildSettings(shapes).key()["shapes"][1] == TINY_SHAPES.min_size

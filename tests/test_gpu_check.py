"""`benchmarks/gpu_check.py`: its CUDA part through the CUDA double, its runner (a failing part keeps its
traceback, a slow one is stopped, the others run), a clean skip without a GPU, and the whole check
rehearsed on the CPU (`--dry-run`), whose record must hold every part."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks import gpu_check, gpu_parts
from benchmarks.gpu_check import ORDER, cuda_layer, main

from .fakes import install

OFFICIAL = Path(os.environ.get("FLASHFACE_OFFICIAL_SRC", Path(__file__).resolve().parents[2] / "official"))


def test_cuda_part_passes_through_the_cuda_double(monkeypatch):
    fakes = install(monkeypatch)
    result = cuda_layer(rows=3, row_floats=64, replays=5, mib=1)
    assert result["status"] == "ok", result
    assert result["checks"]["replays_reading_refilled_table"] == {"rows": 6, "wrong": 0}
    assert (
        "cudaStreamSynchronize failed: cudaErrorStreamCaptureUnsupported"
        in result["checks"]["capture_error_reported"]
    )
    assert fakes.cuda.launches == 2 * 3 + 5 and result["timings"]["graph_replay_us"] > 0


def test_cuda_part_fails_when_replays_do_not_read_the_refilled_table(monkeypatch):
    install(monkeypatch)
    from flashface_trt.runtime.backends.cuda import CudaGraph

    monkeypatch.setattr(CudaGraph, "replay", lambda self: None)  # a graph that never runs
    result = cuda_layer(rows=3, row_floats=64, replays=5, mib=1)
    assert result["status"] == "failed" and result["checks"]["replays_reading_refilled_table"]["wrong"] == 6


def test_a_failing_part_keeps_its_traceback(monkeypatch, tmp_path):
    def broken(sizes):
        raise ZeroDivisionError("no peak today")

    monkeypatch.setitem(gpu_parts.PARTS, "peak", broken)
    result = gpu_check.run_part("peak", True, None, tmp_path)
    assert result["status"] == "failed" and result["reason"] == "ZeroDivisionError: no peak today"
    assert "in broken" in result["traceback"] and "ZeroDivisionError" in result["traceback"]


def test_a_part_past_its_limit_is_stopped_and_a_spent_budget_skips_the_rest(tmp_path, monkeypatch):
    stopped = gpu_check.child("w768", 0.5, True, None, tmp_path)
    assert stopped == {"status": "failed", "reason": "stopped at its 0.5 s limit", "stderr_tail": ""}
    path = tmp_path / "record.json"
    assert main(["--dry-run", "--parts", "peak", "--json", str(path)]) == 0  # in its own process
    record = json.loads(path.read_text())
    assert (
        record["parts"]["peak"]["status"] == "ok" and record["parts"]["peak"]["matmul_peak_tflops_per_s"] > 0
    )
    assert "loop_percent_of_peak" not in record["parts"]["peak"]  # no W768 record to rate
    monkeypatch.setattr(gpu_check, "MIN_START_S", 1e9)
    assert main(["--dry-run", "--parts", "cuda", "--json", str(path)]) == 0
    cuda = json.loads(path.read_text())["parts"]["cuda"]
    assert cuda["status"] == "skipped" and "of the budget left" in cuda["reason"]
    assert not list(tmp_path.glob("*.tmp"))  # written by rename


def test_gpu_check_skips_cleanly_without_cuda(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from flashface_trt.runtime.backends.cuda import device_count

    if torch.cuda.is_available() or device_count() > 0:
        pytest.skip("a GPU is here: the check would run, not skip")
    path = tmp_path / "gpu_check.json"
    assert main(["--json", str(path), "--parts", "cuda,peak,batching,tensorrt"]) == 0
    record = json.loads(path.read_text())
    assert {p: r["status"] for p, r in record["parts"].items()} == dict.fromkeys(
        ("peak", "batching", "tensorrt", "cuda"), "skipped"
    )
    assert "no CUDA device" in record["parts"]["cuda"]["reason"]
    assert "no CUDA device" in record["device"] and record["environment"]["python"]
    assert "skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--json", str(path), "--parts", "cuda,nope"])
    with pytest.raises(SystemExit):
        main(["--json", str(path), "--official", str(tmp_path)])  # no checkout there


@pytest.mark.slow
def test_the_dry_run_rehearses_every_part_on_the_cpu(tmp_path):
    """What the GPU call runs, at tiny sizes: every part ok, with the figures each one must record."""
    pytest.importorskip("onnxslim", reason="the tensorrt part exports the tiny model (onnxslim)")
    pytest.importorskip("polygraphy", reason="the tensorrt part builds through polygraphy's API")
    official = OFFICIAL if (OFFICIAL / "flashface").is_dir() else None
    path = tmp_path / "gpu_check.json"
    args = ["--dry-run", "--json", str(path)] + (["--official", str(official)] if official else [])
    code = main(args)
    record = json.loads(path.read_text())
    parts = record["parts"]
    assert list(parts) == list(ORDER) and code == 0, {n: p.get("reason") for n, p in parts.items()}
    assert all(p["status"] == "ok" for n, p in parts.items() if n != "compiled")
    assert parts["compiled"]["status"] == "skipped" and "torch.compile" in parts["compiled"]["reason"]
    w768 = parts["w768"]
    assert {"eager", "static", "channels-last"} <= set(w768["ms_per_step"])
    assert ("official_implementation" in w768["ms_per_step"]) == (official is not None)
    num = parts["numerics"]
    assert num["fp16_vs_fp32_eps_rel_err"] < 5e-2 and num["fp16_vs_fp32_image_psnr_db"] > 30
    assert num["ours_vs_official_pattern_eps_rel_err"] < 1e-2
    assert set(parts["peak"]["loop_percent_of_peak"]) == set(w768["ms_per_step"]) - {
        "official_pattern",
        "official_implementation",
    }
    prof = parts["profile"]
    assert set(prof["shares"]) <= {"attention", "groupnorm", "conv", "gemm", "other"}
    assert sum(prof["shares"].values()) == pytest.approx(1.0) and len(prof["top"]) == gpu_parts.TOP_KERNELS
    assert parts["batching"]["max_batch_rows"] == 24 and set(parts["batching"]["levels"]) == {"1", "2"}
    trt = parts["tensorrt"]
    assert (
        trt["max_pixel_diff_vs_onnxruntime"]["alone"] <= 2
        and max(trt["max_pixel_diff_vs_onnxruntime"]["batched"]) <= 2
    )
    assert trt["graphs"]["captured"] >= 2 and not trt["graphs"]["capture_failed"]
    assert trt["unet_profiles_used"] == [0, 2] and trt["engine_estimates"]["profiles"]["unet"] == 3
    assert parts["cuda"]["checks"]["replays_reading_refilled_table"]["wrong"] == 0


def test_the_torch_module_tensorrt_double_gives_onnx_runtime_images(tiny_export, tmp_path):
    """`cuda_trt` on the CUDA double: the engines' kernels are the exported PyTorch modules, and
    `TrtBackend` through them (profiles, capture, replay) gives ONNX Runtime's images."""
    pytest.importorskip("polygraphy", reason="engines are built through polygraphy's API (the trt extra)")
    from benchmarks import cuda_trt
    from flashface_trt.engine.build import build_engines
    from flashface_trt.models.loading import tiny_models
    from flashface_trt.runtime.backends.ort import OrtBackend
    from flashface_trt.runtime.faces.images import synthetic_face
    from flashface_trt.runtime.sampling.pipeline import generate, register_identity

    from .trt_support import max_diff, request

    faces = [synthetic_face(200, seed=0)]
    with pytest.MonkeyPatch.context() as mp:
        fakes = cuda_trt.install(mp, tiny_models(), real_cuda=False)
        from flashface_trt.runtime.backends.trt import TrtBackend

        be = TrtBackend(build_engines(tiny_export, tmp_path) and tmp_path)
        assert all(isinstance(e.engine, cuda_trt.TorchEngine) for e in be.engines.values())
        got = generate(be, request(steps=4), register_identity(be, faces))
        assert be.graphs.captures == 2 and not fakes.cuda.faults
        assert sum(e.engine.runs for e in be.engines.values()) > 0
    assert max_diff(got, generate(OrtBackend(tiny_export), request(steps=4), faces)) <= 1

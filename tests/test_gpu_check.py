"""`benchmarks/gpu_check.py`: its CUDA part runs here through the CUDA double, and the whole command
skips cleanly (exit 0, a record saying why) where there is no GPU."""

from __future__ import annotations

import json

import pytest

from benchmarks.gpu_check import cuda_layer, main

from .fakes import install


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


def test_gpu_check_skips_cleanly_without_cuda(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from flashface_trt.runtime.backends.cuda import device_count

    if torch.cuda.is_available() or device_count() > 0:
        pytest.skip("a GPU is here: the check would run, not skip")
    assert main(["--out", str(tmp_path), "--parts", "cuda,tiny,w768"]) == 0
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {p: r["status"] for p, r in record["parts"].items()} == dict.fromkeys(
        ("cuda", "tiny", "w768"), "skipped"
    )
    assert "no CUDA device" in record["parts"]["cuda"]["reason"]
    assert record["environment"]["python"] and "skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--parts", "cuda,nope"])

"""The PyTorch benchmark runs on the CPU with the tiny preset and writes its record."""

from __future__ import annotations

import json

import pytest

from benchmarks.bench_torch import main


def test_bench_tiny_cpu(tmp_path):
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "--preset",
                "tiny",
                "--height",
                "64",
                "--width",
                "64",
                "--steps",
                "3",
                "--refs",
                "1",
                "--repeats",
                "1",
                "--device",
                "cpu",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    record = json.loads(out.read_text())
    stages = {"text", "references", "reference_kv", "unet_loop", "decode", "end_to_end"}
    assert stages <= set(record["seconds_median"])
    assert all(v > 0 for v in record["seconds_median"].values())
    assert record["config"]["steps"] == 3 and record["images_per_second"] > 0


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_suite_tiny_cpu_record(tmp_path, precision):
    from benchmarks.suite import main as suite

    out = tmp_path / "suite.json"
    args = [
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--precision",
        precision,
        "--height",
        "64",
        "--width",
        "64",
    ]
    variants = ["--variants", "auto,channels-last"]
    assert suite([*args, "--steps", "4", "--refs", "2", "--repeats", "1", *variants, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["device"] and r["torch"] and r["commit"] and r["config"]["steps"] == 4
    assert list(r["variants"]) == ["auto", "channels-last"]
    assert r["variants"]["auto"]["seconds"] == r["seconds"]["ours"]
    for name, v in r["variants"].items():  # each variant's loop checked against the plain sampler first
        assert r["numerics"][f"loop_{name}_vs_plain_sampler_z0_rel_err"] <= (
            1e-3 if precision == "fp32" else 5e-2
        )
        assert v["speedup_end_to_end"] > 0 and v["images_per_second"] > 0 and v["loop_percent_of_peak"] > 0
    assert r["numerics"]["ours_vs_official_pattern_eps_rel_err"] <= 1e-4
    for name in ("ours", "official_pattern", "ours_cached_identity"):
        assert {"text", "faces", "reference_net", "loop", "decode", "end_to_end"} <= set(r["seconds"][name])
    assert r["seconds"]["ours"]["reference_net"] > 0 and r["seconds"]["ours_cached_identity"]["faces"] == 0
    assert r["tflop"]["official_pattern"]["loop"] > r["tflop"]["ours"]["loop"] > 0
    assert r["matmul_peak_tflops_per_s"] > 0 and 0 < r["loop_percent_of_peak"]
    if precision == "fp16":  # float16 against float32 on the same inputs, checked before timing
        assert r["numerics"]["fp16_vs_fp32_eps_rel_err"] <= 2e-2
        assert r["numerics"]["fp16_vs_fp32_image_psnr_db"] >= 30


def test_loop_flops_add_up_to_a_counted_run():
    """The per-component FLOP counts times the plan equal FlopCounterMode over a whole cold run."""
    import torch

    from benchmarks.workload import Workload, count_flops, loop_flops, make_denoiser
    from flashface_trt.models.backend import TorchBackend
    from flashface_trt.models.loading import tiny_models
    from flashface_trt.runtime.sampler import sample

    backend = TorchBackend(tiny_models())
    w = Workload(height=64, width=48, refs=2, steps=5, samples=2)
    parts = loop_flops(backend, w)
    backend.kv_cache.clear()
    den, x, steps, _ = make_denoiser(backend, w, official_pattern=False)
    with torch.inference_mode():
        whole = count_flops(sample, den, x, steps)
    assert sum(s.three_way for s in steps) not in (0, len(steps))  # both kinds of steps counted
    assert whole == parts["loop"], (whole, parts)


def test_meta_device_counts_equal_a_real_run():
    """The full-size FLOP counts come from the meta device; on the tiny model they equal a real run."""
    from benchmarks.workload import Workload, loop_flops, meta_loop_flops
    from flashface_trt.models.backend import TorchBackend
    from flashface_trt.models.config import TINY
    from flashface_trt.models.loading import tiny_models

    backend = TorchBackend(tiny_models())
    w = Workload(height=64, width=48, refs=2, steps=5, samples=2)
    for official in (False, True):
        assert meta_loop_flops(TINY, w, official) == loop_flops(backend, w, official)


def test_suite_times_the_official_implementation(tmp_path):
    """Only where a checkout of ali-vilab/FlashFace is named by FLASHFACE_OFFICIAL_SRC."""
    import os
    from pathlib import Path

    src = os.environ.get("FLASHFACE_OFFICIAL_SRC")
    if not src or not (Path(src) / "flashface" / "all_finetune").is_dir():
        pytest.skip("set FLASHFACE_OFFICIAL_SRC to a checkout of ali-vilab/FlashFace")
    from benchmarks.suite import main as suite

    out = tmp_path / "suite.json"
    args = ["--preset", "tiny", "--device", "cpu", "--precision", "fp32", "--height", "64", "--width", "64"]
    assert suite([*args, "--steps", "3", "--repeats", "1", "--official-src", src, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["seconds"]["official_implementation"]["loop"] > 0
    assert r["speedup_loop_vs_official_implementation"] > 0


def test_suite_names_an_unknown_variant(capsys):
    from benchmarks.suite import main as suite

    with pytest.raises(SystemExit):
        suite(["--preset", "tiny", "--device", "cpu", "--variants", "auto,fastest"])
    err = capsys.readouterr().err
    assert "'auto,fastest'" in err and "compiled-channels-last" in err

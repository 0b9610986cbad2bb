"""The PyTorch benchmark runs on the CPU with the tiny preset and writes its record."""

from __future__ import annotations

import json

import pytest

from benchmarks.bench_torch import main

STAGES = ("text", "faces", "reference_net", "loop", "decode")


def check_stage_seconds(seconds: dict, stages=STAGES) -> None:
    """The stages of one run, non-negative and, timed one after another, within its end-to-end time."""
    assert set(seconds) == {*stages, "end_to_end"}
    assert min(seconds.values()) >= 0
    assert sum(seconds[k] for k in stages) <= seconds["end_to_end"]


def test_bench_tiny_cpu(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--preset", "tiny", "--height", "64", "--width", "64", "--steps", "2", "--refs", "1"]
    assert main([*args, "--repeats", "1", "--device", "cpu", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    seconds = record["seconds_median"]  # one repeat: the median is that run
    check_stage_seconds(seconds, ("text", "references", "reference_kv", "unet_loop", "decode"))
    assert record["images_per_second"] == pytest.approx(1 / seconds["end_to_end"], rel=1e-12)
    config = {"preset": "tiny", "height": 64, "width": 64, "steps": 2, "refs": 1, "repeats": 1, "json": None}
    assert config.items() <= record["config"].items() and record["config"]["num_samples"] == 1


SIZE, STEPS, REPEATS = 32, 2, 1  # a 4x4 latent, a 2-way and a 3-way step; one repeat
# 64 px reference crops (the oracle's size; the official 224 is counted in the meta-device test):
# float16 convolutions take CPUs' slow path, and the 4 padded crops at 224 px took 15 s a run
REF_SIZE = 64


@pytest.fixture(scope="module")
def backend():
    """The tiny model in float32 on the CPU, shared by the FLOP tests (each clears its K/V cache)."""
    from flashface_trt.models.backend import TorchBackend
    from flashface_trt.models.loading import tiny_models

    return TorchBackend(tiny_models())


def real_counts(backend, workload) -> dict[str, dict[str, int]]:
    """FLOPs counted on a real run of `workload` (ours and the official pattern), one face encoding."""
    from benchmarks.workload import loop_flops
    from flashface_trt.runtime.sampling.identities import identity_from_crops

    identity = identity_from_crops(backend.encode_references, workload.crops())
    return {
        "ours": loop_flops(backend, workload, identity=identity),
        "official_pattern": loop_flops(backend, workload, official_pattern=True, identity=identity),
    }


@pytest.fixture(scope="module")
def record_counts(backend):
    """The real-run FLOPs of the suite tests' workload, counted once for both precisions."""
    from benchmarks.workload import Workload

    return real_counts(backend, Workload(SIZE, SIZE, 1, STEPS, 1, REF_SIZE))


TOP = {
    "device",
    "torch",
    "commit",
    "config",
    "numerics",
    "baseline",
    "notes",
    "speedup_loop",
    "speedup_loop_cached_identity",
    "speedup_end_to_end",
    "speedup_cached_identity",
    "seconds",
    "images_per_second",
    "tflop",
    "loop_tflops_per_s",
    "matmul_peak_tflops_per_s",
    "loop_percent_of_peak",
    "peak_memory_bytes",
    "variants",
}


def run_suite(tmp_path, precision: str, *extra: str) -> tuple[dict, list[str]]:
    """(record, argv) of a tiny CPU suite run: 32x32, 2 steps, 1 reference (64 px crops), 1 repeat, a
    128 matmul peak."""
    from benchmarks.suite import main as suite

    out = tmp_path / "suite.json"
    argv = ["--preset", "tiny", "--device", "cpu", "--precision", precision, "--height", str(SIZE)]
    argv += ["--width", str(SIZE), "--steps", str(STEPS), "--refs", "1", "--repeats", str(REPEATS)]
    argv += ["--ref-size", str(REF_SIZE)]
    argv += ["--matmul-size", "128", *extra, "--json", str(out)]
    assert suite(argv) == 0
    return json.loads(out.read_text()), argv


def expected_speedups(variant: dict, baseline: dict) -> dict:
    """Speedups recomputed from the recorded seconds (the loop includes the ReferenceNet K/V stage)."""
    ours, cached = variant["seconds"], variant["cached_identity"]
    base_loop = baseline.get("reference_net", 0.0) + baseline["loop"]
    e2e = baseline.get("end_to_end")
    return {
        "loop": base_loop / (ours["reference_net"] + ours["loop"]),
        "loop_cached_identity": base_loop / (cached["reference_net"] + cached["loop"]),
        "end_to_end": None if e2e is None else e2e / ours["end_to_end"],
        "cached_identity": None if e2e is None else e2e / cached["end_to_end"],
    }


def check_suite_record(
    r: dict, argv: list[str], variants: list[str], baselines: list[str], counts: dict
) -> None:
    """Everything a record derives, recomputed from its own seconds and FLOPs (CPU, tiny preset)."""
    import subprocess

    import torch

    from flashface_trt.runtime.sampling.sampler import GuidanceParams, plan

    headline = baselines[-1]  # the official implementation when it was timed
    official = {"official_implementation_runs", "official_commit"}
    assert set(r) == TOP | (official if headline == "official_implementation" else set())
    assert r["torch"] == torch.__version__ and r["peak_memory_bytes"] is None
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    assert r["commit"] == head.stdout.strip()
    cfg = r["config"]
    assert (cfg["preset"], cfg["device"], cfg["height"], cfg["width"]) == ("tiny", "cpu", SIZE, SIZE)
    assert (cfg["steps"], cfg["refs"], cfg["samples"], cfg["repeats"]) == (STEPS, 1, 1, REPEATS)
    assert cfg["ref_size"] == REF_SIZE
    assert cfg["precision"] == argv[argv.index("--precision") + 1] and cfg["matmul_size"] == 128
    assert cfg["variants"] == variants and list(r["variants"]) == variants

    assert r["baseline"] == headline
    assert set(r["notes"]) == {"official_pattern", "flops"} | set(baselines)
    assert "re-implementation" in r["notes"]["official_pattern"] and "by construction" in r["notes"]["flops"]

    assert r["tflop"] == {  # counted on the meta device by the suite, on a real run here
        name: {k: pytest.approx(v / 1e12, rel=1e-12) for k, v in c.items()} for name, c in counts.items()
    }
    kinds = [s.three_way for s in plan(STEPS, GuidanceParams())]
    t = r["tflop"]["ours"]
    loop = t["unet_2way_step"] * kinds.count(False) + t["unet_3way_step"] * kinds.count(True)
    assert t["loop"] == pytest.approx(loop + STEPS * t["reference_net_step"], rel=1e-12)

    fp16 = cfg["precision"] == "fp16"
    numerics = {
        "ours_vs_official_pattern_eps_rel_err",
        *(f"loop_{v}_vs_plain_sampler_z0_rel_err" for v in variants),
    }
    if fp16:
        numerics |= {"fp16_vs_fp32_eps_rel_err", "fp16_vs_fp32_image_psnr_db"}
        assert r["numerics"]["fp16_vs_fp32_eps_rel_err"] <= 2e-2
        assert r["numerics"]["fp16_vs_fp32_image_psnr_db"] >= 30
    assert set(r["numerics"]) == numerics
    # float16: the log-sum-exp merge rounds in another order than the official pattern (issue 23)
    assert r["numerics"]["ours_vs_official_pattern_eps_rel_err"] <= (1e-2 if fp16 else 1e-4)
    for name in variants:  # each variant's loop checked against the plain sampler before timing
        assert r["numerics"][f"loop_{name}_vs_plain_sampler_z0_rel_err"] <= (5e-2 if fp16 else 1e-3)

    sec = r["seconds"]
    assert set(sec) == {"ours", "ours_cached_identity", *baselines}
    for name in ("ours", "ours_cached_identity", "official_pattern"):
        check_stage_seconds(sec[name])
    assert sec["official_pattern"]["reference_net"] == 0  # it runs inside every step of its loop
    assert sec["ours_cached_identity"]["faces"] == 0  # a registered identity: no face encoding
    peak = r["matmul_peak_tflops_per_s"]
    for v in r["variants"].values():
        check_stage_seconds(v["seconds"])
        check_stage_seconds(v["cached_identity"])
        assert v["cached_identity"]["faces"] == 0 and v["peak_memory_bytes"] is None
        loop_s = v["seconds"]["reference_net"] + v["seconds"]["loop"]
        assert v["loop_seconds"] == pytest.approx(loop_s, rel=1e-12)
        cached = v["cached_identity"]["reference_net"] + v["cached_identity"]["loop"]
        assert v["loop_seconds_cached_identity"] == pytest.approx(cached, rel=1e-12)
        assert v["images_per_second"] == pytest.approx(1 / v["seconds"]["end_to_end"], rel=1e-12)
        assert v["loop_tflops_per_s"] == pytest.approx(t["loop"] / loop_s, rel=1e-9)
        assert v["loop_percent_of_peak"] == pytest.approx(100 * t["loop"] / loop_s / peak, rel=1e-9)
        assert v["speedup"] == {b: pytest.approx(expected_speedups(v, sec[b]), rel=1e-12) for b in baselines}
    # the top-level figures, recomputed from the top-level seconds, are the first variant's
    top = expected_speedups(
        {"seconds": sec["ours"], "cached_identity": sec["ours_cached_identity"]}, sec[headline]
    )
    assert r["variants"][variants[0]]["speedup"][headline] == pytest.approx(top, rel=1e-12)
    assert r["speedup_loop"] == pytest.approx(top["loop"], rel=1e-12)
    assert r["speedup_loop_cached_identity"] == pytest.approx(top["loop_cached_identity"], rel=1e-12)
    assert r["speedup_end_to_end"] == pytest.approx(top["end_to_end"], rel=1e-12)
    assert r["speedup_cached_identity"] == pytest.approx(top["cached_identity"], rel=1e-12)
    ips = {
        "ours": 1 / sec["ours"]["end_to_end"],
        "official_pattern": 1 / sec["official_pattern"]["end_to_end"],
    }
    assert r["images_per_second"] == pytest.approx(ips, rel=1e-12)
    loop_s = sec["ours"]["reference_net"] + sec["ours"]["loop"]
    assert r["loop_tflops_per_s"] == pytest.approx(t["loop"] / loop_s, rel=1e-9)
    assert r["loop_percent_of_peak"] == pytest.approx(100 * t["loop"] / loop_s / peak, rel=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_suite_tiny_cpu_record(tmp_path, capsys, record_counts, precision):
    """Variants checked against the plain sampler, fp16 against fp32, every derived figure recomputed.

    float16 convolutions are slow on a CPU: there the static loop is the variant (channels-last
    is checked in float32 here and in tests/test_torch_settings.py).
    """
    variants = ["auto", "channels-last"] if precision == "fp32" else ["static"]
    r, argv = run_suite(tmp_path, precision, "--variants", ",".join(variants))
    check_suite_record(r, argv, variants, ["official_pattern"], record_counts)
    printed = capsys.readouterr().out
    speedup_lines = [line for line in printed.splitlines() if "x (" in line]
    assert f"headline ({variants[0]}) vs the official pattern (our re-implementation" in speedup_lines[0]
    assert f"loop {r['speedup_loop']:.2f}x" in speedup_lines[0]
    assert "by construction" in printed


def test_loop_flops_add_up_to_a_counted_run(backend):
    """The per-component FLOP counts times the plan equal FlopCounterMode over a whole cold run.

    3 steps: one 2-way and two 3-way steps, so each kind's count is weighed by its own number.
    """
    import torch

    from benchmarks.workload import Workload, count_flops, loop_flops, make_denoiser
    from flashface_trt.runtime.sampling.sampler import sample

    w = Workload(height=64, width=48, refs=2, steps=3, samples=2)
    den, _, prepared = make_denoiser(backend, w, official_pattern=False)
    steps = prepared.steps
    parts = loop_flops(backend, w, identity=prepared.ctx.identity)
    backend.kv_cache.clear()  # cold: the whole run computes every step's reference K/V
    with torch.inference_mode():
        whole = count_flops(sample, den, prepared.x, steps)
    assert [s.three_way for s in steps] == [False, True, True]
    assert parts["unet_2way_step"] != parts["unet_3way_step"]
    assert whole == parts["loop"], (whole, parts)


def test_meta_device_counts_equal_a_real_run(backend):
    """The full-size FLOP counts come from the meta device; on the tiny model they equal a real run."""
    from benchmarks.workload import Workload, meta_loop_flops
    from flashface_trt.models.config import TINY

    w = Workload(height=64, width=48, refs=2, steps=5, samples=2)
    meta = meta_loop_flops(TINY, w)
    assert {k: meta[k] for k in ("ours", "official_pattern")} == real_counts(backend, w)
    try:  # without the UNet cuts (issue 23) too
        backend.models.unet.set_cuts(())
        assert meta["ours_uncut"] == real_counts(backend, w)["ours"]
    finally:
        backend.models.unet.set_cuts(backend.settings.cuts)


def test_suite_times_the_official_implementation(tmp_path, capsys, record_counts):
    """Only where a checkout of ali-vilab/FlashFace is named by FLASHFACE_OFFICIAL_SRC: the headline."""
    import os
    import statistics
    from pathlib import Path

    src = os.environ.get("FLASHFACE_OFFICIAL_SRC")
    if not src or not (Path(src) / "flashface" / "all_finetune").is_dir():
        pytest.skip("set FLASHFACE_OFFICIAL_SRC to a checkout of ali-vilab/FlashFace")
    r, argv = run_suite(tmp_path, "fp32", "--variants", "auto", "--official-src", src)
    baselines = ["official_pattern", "official_implementation"]
    check_suite_record(r, argv, ["auto"], baselines, record_counts)
    official = r["seconds"]["official_implementation"]
    assert set(official) == {"loop"} and len(r["official_implementation_runs"]) == REPEATS
    assert official["loop"] == statistics.median(r["official_implementation_runs"])
    assert r["speedup_end_to_end"] is None and r["speedup_cached_identity"] is None  # its loop only
    printed = capsys.readouterr().out
    speedup_lines = [line for line in printed.splitlines() if "x (" in line]
    assert "headline (auto) vs the official implementation (ali-vilab/FlashFace" in speedup_lines[0]
    assert f"loop {r['speedup_loop']:.2f}x" in speedup_lines[0]


def test_suite_names_an_unknown_variant(capsys):
    from benchmarks.suite import main as suite

    with pytest.raises(SystemExit):
        suite(["--preset", "tiny", "--device", "cpu", "--variants", "auto,fastest"])
    err = capsys.readouterr().err
    assert "'auto,fastest'" in err and "compiled-channels-last" in err


def test_batching_benchmark_record(tmp_path):
    """benchmarks/batching.py on the tiny preset: every request checked, every ratio from its own figures."""
    from benchmarks.batching import main as batching

    out = tmp_path / "batching.json"
    args = ["--preset", "tiny", "--device", "cpu", "--precision", "fp32", "--height", "64", "--width", "64"]
    assert batching([*args, "--steps", "2", "--refs", "1", "--concurrency", "1,2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert list(r["levels"]) == ["1", "2"] and r["config"]["steps"] == 2
    for c, level in r["levels"].items():
        assert level["z0_rel_err_max"] <= 1e-4  # each batched request against itself alone
        assert level["batch_sizes_max"] == int(c)  # the requests shared their steps
        seq, bat = level["sequential"], level["batched"]
        assert level["throughput_ratio"] == pytest.approx(bat["images_per_s"] / seq["images_per_s"], rel=1e-9)
        assert level["p95_over_solo"] == pytest.approx(bat["p95_s"] / level["solo_latency_s"], rel=1e-9)
        assert seq["p50_s"] <= seq["p95_s"] and bat["p50_s"] <= bat["p95_s"]

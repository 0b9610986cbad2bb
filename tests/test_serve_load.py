"""The service load benchmark at a tiny size: its record checked against the per-job times it holds."""

from __future__ import annotations

import json
import statistics

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from benchmarks import serve_load  # noqa: E402

# --torch-threads 1: on a shared 2-core machine two threads per process mostly wait on each other
SMALL = "--steps 1 --identities 2 --low-load-jobs 3 --direct-repeats 3 --torch-threads 1".split()
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # gives the other tests their thread count back


def _quantiles(values: list[float]) -> list[float]:
    """Cut points 1..99 of `values` by the standard library (the same definition as numpy's linear)."""
    return statistics.quantiles(values, n=100, method="inclusive")


def test_busy_seconds_merges_overlapping_jobs():
    assert serve_load.busy_seconds([]) == 0.0
    assert serve_load.busy_seconds([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0)]) == pytest.approx(3.0)
    assert serve_load.busy_seconds([(1.0, 2.0), (0.0, 5.0)]) == pytest.approx(5.0)  # one inside another


def test_arrivals_fixed_and_poisson():
    rng = np.random.default_rng(0)
    assert serve_load.arrivals(5, 4.0, "fixed", rng) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0], abs=1e-12)
    times = serve_load.arrivals(20000, 4.0, "poisson", rng)
    gaps = np.diff(times)
    assert times[0] == 0.0 and (gaps > 0).all()
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)  # rate 4/s
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential gaps
    assert serve_load.arrivals(0, 1.0, "poisson", rng) == []


def test_serve_load_record(tmp_path):
    out = tmp_path / "serve.json"
    rates = ["--rate", "1x", "--rate", "3", "--arrivals", "fixed"]
    assert serve_load.main(["--jobs", "6", *rates, *SMALL, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["benchmark"] == "serve_load" and r["device"] and r["commit"] and r["in_process"]
    assert r["service_backend"] == "torch/fp32/64px" and r["config"]["steps"] == 1
    assert r["correctness"] == {"first_job_equals_direct": True, "max_abs_pixel_diff": 0, "seed": 0}

    # overhead and capacity from the recorded direct calls and low-load jobs
    direct = [d["seconds"] for d in r["direct"]]
    low = r["low_load"]["jobs"]
    assert len(direct) == len(low) == 3
    assert all(set(d["timings"]) == {"text", "references", "denoise", "decode"} for d in r["direct"])
    o = r["overhead"]
    d_med, s_med = statistics.median(direct), statistics.median(j["latency_s"] for j in low)
    assert o["direct_median_s"] == pytest.approx(d_med) and o["service_median_s"] == pytest.approx(s_med)
    assert o["per_job_ms"] == pytest.approx((s_med - d_med) * 1000)
    assert o["ratio_service_over_direct"] == pytest.approx(s_med / d_med)
    run_med = statistics.median(j["run_s"] for j in low)
    assert r["capacity_jobs_per_s"] == pytest.approx(1 / run_med)
    for j in low:  # the client waits for the queue and the run, so its latency covers both
        assert j["latency_s"] >= j["queue_delay_s"] + j["run_s"] - 2e-3, j

    assert [run["rate_spec"] for run in r["runs"]] == ["1x", "3"]
    assert r["runs"][0]["rate_jobs_per_s"] == pytest.approx(r["capacity_jobs_per_s"])
    assert r["runs"][1]["rate_jobs_per_s"] == 3.0
    identities = None
    for run in r["runs"]:
        jobs = run["jobs"]
        rate = run["rate_jobs_per_s"]
        assert [j["index"] for j in jobs] == list(range(6))
        assert [j["state"] for j in jobs] == ["succeeded"] * 6 and run["succeeded"] == 6
        assert run["rejected"] == run["failed"] == 0 and all(j["images"] == 1 for j in jobs)
        assert len({j["job_id"] for j in jobs}) == 6
        assert [j["scheduled_s"] for j in jobs] == pytest.approx([i / rate for i in range(6)], abs=1e-9)
        ids = [j["identity"] for j in jobs]
        assert ids[0] != ids[1] and ids == ids[:2] * 3  # two identities, in turn
        assert identities in (None, set(ids))
        identities = set(ids)
        for j in jobs:
            assert j["submitted_s"] >= j["scheduled_s"]
            assert j["latency_s"] == pytest.approx(j["completed_s"] - j["submitted_s"])
            assert (
                j["queue_delay_s"] == pytest.approx(j["started"] - j["created"]) and j["queue_delay_s"] >= 0
            )
            assert j["run_s"] == pytest.approx(j["finished"] - j["started"]) and j["run_s"] > 0
            assert j["latency_s"] >= j["queue_delay_s"] + j["run_s"] - 2e-3, j
        window = max(j["completed_s"] for j in jobs) - min(j["submitted_s"] for j in jobs)
        assert run["window_s"] == pytest.approx(window)
        assert run["throughput_jobs_per_s"] == pytest.approx(6 / window)
        assert run["throughput_images_per_s"] == pytest.approx(sum(j["images"] for j in jobs) / window)
        q = _quantiles([j["latency_s"] for j in jobs])
        assert [run["latency_s"][p] for p in ("p50", "p95", "p99")] == pytest.approx([q[49], q[94], q[98]])
        q = _quantiles([j["queue_delay_s"] for j in jobs])
        assert [run["queue_delay_s"][p] for p in ("p50", "p95")] == pytest.approx([q[49], q[94]])
        assert run["run_s_median"] == pytest.approx(statistics.median(j["run_s"] for j in jobs))
        busy = serve_load.busy_seconds([(j["started"], j["finished"]) for j in jobs])
        assert run["worker_utilization"] == pytest.approx(busy / window)
        assert 0 < run["worker_utilization"] <= 1 + 1e-3  # busy at most the window (two clocks: 1 ms)
        assert run["jobs_running_mean"] == pytest.approx(sum(j["run_s"] for j in jobs) / busy)
        assert run["jobs_running_mean"] >= 1 - 1e-9  # jobs that shared steps count together
        lateness = max(j["submitted_s"] - j["scheduled_s"] for j in jobs)
        assert run["submit_lateness_s_max"] == pytest.approx(lateness)


def test_serve_load_times_nothing_when_the_image_differs(tmp_path, monkeypatch, capsys):
    """Correctness before timing: a direct image one level off fails the run and records nothing."""
    from PIL import Image

    real = serve_load.generate

    def one_level_off(*args, **kwargs):
        images = real(*args, **kwargs)
        pixels = np.asarray(images[0]).copy()
        pixels[0, 0, 0] ^= 1
        return [Image.fromarray(pixels), *images[1:]]

    monkeypatch.setattr(serve_load, "generate", one_level_off)
    out = tmp_path / "serve.json"
    assert serve_load.main(["--jobs", "2", *SMALL, "--json", str(out)]) == 1
    assert not out.exists()
    said = capsys.readouterr().out
    assert "correctness check failed" in said and "'max_abs_pixel_diff': 1" in said, said


def test_deployments_are_checked(capsys):
    assert serve_load.parse(["--deployments", "local,ray:2"]).deployments == ["local", "ray:2"]
    for bad in ("ray", "ray:0", "kubernetes"):
        with pytest.raises(SystemExit):
            serve_load.parse(["--deployments", bad])
        assert f"{bad!r} is neither 'local' nor 'ray:N'" in capsys.readouterr().err

"""The PyTorch benchmark runs on the CPU with the tiny preset and writes its record."""

from __future__ import annotations

import json

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

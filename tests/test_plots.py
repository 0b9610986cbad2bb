"""benchmarks/plots.py draws each kind of record into a PNG naming the machine it was measured on."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install -e '.[bench]')")

from benchmarks import plots  # noqa: E402
from benchmarks.records import RESULTS  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
CONFIG = {"preset": "tiny", "height": 64, "width": 64, "steps": 2}
LOOP = {"loop": 9.0}  # the official code's timing: its loop only
MODES = {"batched": 1, "sequential": 3}  # batching's two runs, the second 3 times slower


def _stages(scale: float) -> dict[str, float]:
    seconds = {s: scale * (i + 1) for i, s in enumerate(plots.STAGES)}
    return {**seconds, "end_to_end": sum(seconds.values())}


def _serve_run(rate: float) -> dict:
    return {
        "rate_jobs_per_s": rate,
        "throughput_jobs_per_s": 0.9 * rate,
        "latency_s": {"p50": rate, "p95": 2 * rate},
    }


# one small record of each kind, as the benchmarks write them (the fields the plots read), and one of none
RECORDS = {
    "suite": {
        "device": "Suite Machine", "commit": "aaaaaaa", "config": CONFIG,
        "seconds": {"ours": _stages(1), "official_pattern": _stages(2), "official_implementation": LOOP},
    },
    "batching": {
        "device": "Batch Machine", "commit": "bbbbbbb", "config": CONFIG,
        "levels": {
            str(c): {m: {"images_per_s": c / k, "p95_s": k * c} for m, k in MODES.items()} for c in (1, 2, 4)
        },
    },
    "serve_load": {
        "benchmark": "serve_load", "device": "Serve Machine", "cpu_count": 2, "commit": "ccccccc",
        "config": CONFIG, "service_backend": "torch/fp32", "runs": [_serve_run(r) for r in (1.0, 2.0)],
    },
    "flops": {"samples=1": {}, "note": "no plot"},
}  # fmt: skip


def _texts(fig) -> str:
    """Every text of a figure: titles, labels, legends."""
    return " ".join(t.get_text() for t in fig.findobj(match=lambda o: hasattr(o, "get_text")))


@pytest.mark.parametrize("kind", ["suite", "batching", "serve_load"])
def test_each_kind_names_its_machine_commit_and_setup(kind):
    record = RECORDS[kind]
    assert plots.kind(record) == kind
    fig = plots.PLOTS[kind]([record])
    text = _texts(fig)
    assert record["device"] in text and record["commit"] in text and "tiny 64x64, 2 steps" in text, text
    plots.plt.close(fig)


def test_main_writes_one_png_per_kind(tmp_path):
    paths = []
    for name, record in RECORDS.items():
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(record))
    out = tmp_path / "docs"
    assert plots.main([*map(str, paths), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["batching.png", "serve_load.png", "suite.png"]
    for png in out.iterdir():
        data = png.read_bytes()
        assert data[:8] == PNG and len(data) > 1000, png
    assert plots.main([str(paths[-1]), "--out", str(tmp_path / "none")]) == 1  # nothing to draw


def test_the_committed_records_draw(tmp_path):
    written = plots.draw(sorted(RESULTS.glob("*.json")), tmp_path)
    assert {p.name for p in written} == {"suite.png", "batching.png", "serve_load.png"}
    assert all(p.read_bytes()[:8] == PNG for p in written)


def test_the_plots_draw_the_records_numbers():
    record = RECORDS["suite"]["seconds"]
    fig = plots.plot_suite([RECORDS["suite"]])
    bars = sorted(b.get_width() for b in fig.axes[0].patches if b.get_width() > 0)
    runs = (record["ours"], record["official_pattern"], LOOP)
    assert bars == sorted(v for run in runs for k, v in run.items() if k != "end_to_end")
    plots.plt.close(fig)
    fig = plots.plot_batching([RECORDS["batching"]])
    (rate, p95) = fig.axes[:2]
    assert [list(line.get_ydata()) for line in rate.get_lines()] == [[1, 2, 4], [1 / 3, 2 / 3, 4 / 3]]
    assert [list(line.get_ydata()) for line in p95.get_lines()] == [[1, 2, 4], [3, 6, 12]]
    plots.plt.close(fig)

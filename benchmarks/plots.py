"""Plots of the benchmark records (matplotlib, the `bench` extra): the PNGs the README shows.

    python -m benchmarks.plots                      # every record in benchmarks/results -> docs/*.png
    python -m benchmarks.plots RECORD.json ... --out DIR

Each record is drawn by its kind: `suite` (benchmarks/suite.py: stage seconds, ours against the
official pattern and code), `batching` (benchmarks/batching.py: images/s and p95 latency against
concurrency) and `serve_load` (benchmarks/serve_load.py: latency against throughput). Every plot
names the machine, the configuration and the commit its record was measured on.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .records import RESULTS  # noqa: E402

log = logging.getLogger(__name__)
DOCS = Path(__file__).resolve().parent.parent / "docs"
STAGES = ("text", "faces", "reference_net", "loop", "decode")
RUNS = {  # the suite's runs, as its record names them, and their labels
    "ours": "ours",
    "ours_cached_identity": "ours, identity cached",
    "official_pattern": "official pattern",
    "official_implementation": "official code (loop only)",
}
Record = dict[str, Any]  # a benchmark record, as its JSON file holds it


def kind(record: dict[str, Any]) -> str | None:
    """'suite', 'batching', 'serve_load', or None for a record no plot draws (e.g. FLOP counts)."""
    if record.get("benchmark") == "serve_load":
        return "serve_load"
    if "levels" in record:
        return "batching"
    if "ours" in record.get("seconds", {}):
        return "suite"
    return None


def _setup(record: dict[str, Any]) -> str:
    """'<preset> <H>x<W>, <steps> steps' of a record's configuration."""
    c = record.get("config", {})
    return f"{c.get('preset', '?')} {c.get('height', '?')}x{c.get('width', '?')}, {c.get('steps', '?')} steps"


def _machine(record: dict[str, Any]) -> str:
    cpus = record.get("cpu_count")
    return f"{record['device']}" + (f" ({cpus} CPUs)" if cpus else "")


def plot_suite(records: list[Record]) -> Figure:
    """Per record, each run's stage seconds stacked (one bar a run), end-to-end time at its end."""
    fig, axes = plt.subplots(len(records), 1, figsize=(10, 0.4 + 2.3 * len(records)), squeeze=False)
    colors = dict(zip(STAGES, plt.get_cmap("tab10").colors))
    for ax, record in zip(axes[:, 0], records):
        runs = [r for r in RUNS if r in record["seconds"]][::-1]  # ours on top
        for y, run in enumerate(runs):
            seconds, left = record["seconds"][run], 0.0
            for stage in STAGES:
                width = float(seconds.get(stage) or 0.0)
                ax.barh(y, width, left=left, color=colors[stage], label=stage if y == 0 else None)
                left += width
            ax.text(left, y, f" {seconds.get('end_to_end', left):.2f} s", va="center", fontsize=8)
        ax.set_yticks(range(len(runs)), [RUNS[r] for r in runs])
        ax.set_xlabel("seconds per image")
        ax.set_title(f"{_machine(record)} · {_setup(record)} · {record['commit']}", fontsize=9)
        ax.margins(x=0.15)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(STAGES), fontsize=8)
    fig.suptitle("Stages of one generation, ours against the official")
    fig.tight_layout(rect=(0, 0.4 / fig.get_figheight(), 1, 1))
    return fig


def plot_batching(records: list[Record]) -> Figure:
    """Images/s and p95 latency against concurrency, batched (solid) and one after another (dashed)."""
    fig, (rate, p95) = plt.subplots(1, 2, figsize=(11, 4))
    for record in records:
        levels = sorted(record["levels"].items(), key=lambda kv: int(kv[0]))
        c = [int(k) for k, _ in levels]
        label = f"{_machine(record)} · {_setup(record)} · {record['commit']}"
        for mode, style in (("batched", "-o"), ("sequential", "--s")):
            line = f"{mode}: {label}"
            rate.plot(c, [v[mode]["images_per_s"] for _, v in levels], style, label=line)
            p95.plot(c, [v[mode]["p95_s"] for _, v in levels], style, label=line)
    for ax, what in ((rate, "images / s"), (p95, "p95 latency (s)")):
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(what)
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    rate.legend(fontsize=7)
    fig.suptitle("Step-level batching against one request after another")
    fig.tight_layout()
    return fig


def plot_serve(records: list[Record]) -> Figure:
    """Latency (p50 solid, p95 dashed) against the throughput reached, and throughput against the
    offered rate, per record and deployment."""
    fig, (curve, rate) = plt.subplots(1, 2, figsize=(11, 4))
    for record in records:
        deployments = record.get("deployments") or {record.get("service_backend", "service"): record}
        for deployment, result in deployments.items():
            runs = sorted(result["runs"], key=lambda r: r["rate_jobs_per_s"])
            label = f"{deployment}: {_machine(record)} · {_setup(record)} · {record['commit']}"
            done = [r["throughput_jobs_per_s"] for r in runs]
            (line,) = curve.plot(done, [r["latency_s"]["p50"] for r in runs], "-o", label=label)
            curve.plot(done, [r["latency_s"]["p95"] for r in runs], "--", color=line.get_color())
            rate.plot([r["rate_jobs_per_s"] for r in runs], done, "-o", color=line.get_color())
    top = max(rate.get_xlim()[1], rate.get_ylim()[1])
    rate.plot([0, top], [0, top], ":", color="gray", label="throughput = offered")
    curve.set(xlabel="throughput (jobs/s)", ylabel="latency (s): p50 solid, p95 dashed")
    rate.set(xlabel="offered rate (jobs/s)", ylabel="throughput (jobs/s)")
    for ax in (curve, rate):
        ax.grid(alpha=0.3)
    curve.legend(fontsize=7)
    rate.legend(fontsize=7)
    fig.suptitle("The HTTP service under load (Poisson arrivals)")
    fig.tight_layout()
    return fig


PLOTS: dict[str, Callable[[list[Record]], Figure]] = {
    "suite": plot_suite,
    "batching": plot_batching,
    "serve_load": plot_serve,
}


def draw(paths: list[Path], out: Path) -> list[Path]:
    """`<out>/<kind>.png` for each kind with records among `paths`; the files written."""
    by_kind: dict[str, list[tuple[str, Record]]] = {}
    for path in sorted(paths):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"{path}: not a readable JSON record ({exc})") from exc
        k = kind(record) if isinstance(record, dict) else None
        if k is None:
            log.info("%s: no plot draws this record", path.name)
            continue
        by_kind.setdefault(k, []).append((path.name, record))
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for k, records in by_kind.items():
        fig = PLOTS[k]([record for _, record in records])
        fig.savefig(out / f"{k}.png", dpi=100)
        plt.close(fig)
        written.append(out / f"{k}.png")
        log.info("%s <- %s", written[-1], ", ".join(name for name, _ in records))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("records", nargs="*", type=Path, help="JSON records (default: benchmarks/results/*.json)")
    p.add_argument("--out", type=Path, default=DOCS, help="where the PNGs go (default: docs/)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    written = draw(args.records or sorted(RESULTS.glob("*.json")), args.out)
    if not written:
        log.error("no record of a kind plotted here (suite, batching, serve_load)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

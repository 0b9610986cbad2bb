"""Prometheus metrics of the service (one registry per service, so tests can run several)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

STAGES = ("identity", "text", "references", "denoise", "decode")
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class CacheCollector(Collector):
    """Reference K/V cache counters read when scraped: `stats()` maps each cache's replica (''
    for a single service) to its counters; the totals, and each named replica's with a label."""

    def __init__(self, stats: Callable[[], dict[str, dict[str, int]]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Any]:
        caches = self.stats()
        for name in ("hits", "misses", "evictions", "bytes", "entries", "budget"):
            family = CounterMetricFamily if name in ("hits", "misses", "evictions") else GaugeMetricFamily
            total = family(f"flashface_kv_cache_{name}", f"reference K/V cache {name}")
            total.add_metric([], float(sum(s.get(name, 0) for s in caches.values())))
            yield total
            named = {tag: s for tag, s in caches.items() if tag}
            if named:
                each = family(f"flashface_replica_kv_cache_{name}", f"{name} per replica", labels=["replica"])
                for tag, s in sorted(named.items()):
                    each.add_metric([tag], float(s.get(name, 0)))
                yield each


class Metrics:
    """Queue depth, running jobs, stage latencies, images, jobs and errors by kind, K/V cache, identities."""

    def __init__(
        self, kv_stats: Callable[[], dict[str, dict[str, int]]], identities: Callable[[], int]
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("flashface_queue_depth", "jobs waiting in the queue", registry=r)
        self.running = Gauge("flashface_running_jobs", "jobs running now", registry=r)
        self.stage = Histogram(
            "flashface_stage_seconds",
            "wall seconds per stage of a job",
            ["stage"],
            buckets=BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "flashface_queue_wait_seconds", "seconds from acceptance to start", buckets=BUCKETS, registry=r
        )
        self.job_seconds = Histogram(
            "flashface_job_seconds", "seconds from acceptance to the end", buckets=BUCKETS, registry=r
        )
        self.images = Counter("flashface_images_generated", "images generated", registry=r)
        self.jobs = Counter("flashface_jobs", "jobs that ended, by state", ["state"], registry=r)
        self.errors = Counter("flashface_errors", "errors by kind (jobs and requests)", ["kind"], registry=r)
        self.identities = Gauge("flashface_identities", "registered identities", registry=r)
        self.identities.set_function(lambda: float(identities()))
        r.register(CacheCollector(kv_stats))

    def job_done(self, job: Any, timings: dict[str, float]) -> None:
        for stage in STAGES:
            if stage in timings:
                self.stage.labels(stage).observe(timings[stage])
        if job.started is not None:
            self.queue_wait.observe(max(job.started - job.created, 0.0))
        self.job_seconds.observe(max((job.finished or job.created) - job.created, 0.0))
        self.images.inc(job.images)
        self.jobs.labels("succeeded").inc()

    def job_failed(self, job: Any, kind: str) -> None:
        self.jobs.labels("cancelled" if kind == "cancelled" else "failed").inc()
        if kind != "cancelled":
            self.errors.labels(kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

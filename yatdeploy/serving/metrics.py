"""Prometheus metrics, with Triton's names where they fit, and per-model statistics for /stats."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram

_LABELS = ("model", "version")
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class ModelStats:
    """Triton's statistics extension, per model: counts and cumulative nanoseconds."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_count: int = 0
    queue_ns: int = 0
    compute_count: int = 0
    compute_ns: int = 0
    inference_count: int = 0
    execution_count: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.success = Counter("nv_inference_request_success", "Successful inference requests", _LABELS, registry=r)
        self.failure = Counter("nv_inference_request_failure", "Failed inference requests", _LABELS, registry=r)
        self.inferences = Counter("nv_inference_count", "Inferences performed (batch items)", _LABELS, registry=r)
        self.executions = Counter("nv_inference_exec_count", "Batches executed", _LABELS, registry=r)
        self.request_us = Counter("nv_inference_request_duration_us", "Cumulative request time", _LABELS, registry=r)
        self.queue_us = Counter("nv_inference_queue_duration_us", "Cumulative queue time", _LABELS, registry=r)
        self.compute_us = Counter("nv_inference_compute_infer_duration_us", "Cumulative compute time", _LABELS,
                                  registry=r)
        self.request_seconds = Histogram("yatdeploy_request_duration_seconds", "Request time, server side",
                                         _LABELS, buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("yatdeploy_queue_duration_seconds", "Time in the batching queue", _LABELS,
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram("yatdeploy_compute_duration_seconds", "Time of one batch in the model",
                                         _LABELS, buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("yatdeploy_batch_size", "Batch items per execution", _LABELS,
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.stats: dict[tuple[str, str], ModelStats] = {}

    def model_stats(self, model: str, version: str) -> ModelStats:
        return self.stats.setdefault((model, version), ModelStats())

    def record_batch(self, model: str, version: str, items: int, compute_s: float) -> None:
        labels = (model, version)
        self.executions.labels(*labels).inc()
        self.inferences.labels(*labels).inc(items)
        self.batch_size.labels(*labels).observe(items)
        self.compute_seconds.labels(*labels).observe(compute_s)
        stats = self.model_stats(model, version)
        with stats.lock:
            stats.execution_count += 1
            stats.inference_count += items

    def record_request(self, model: str, version: str, ok: bool, total_s: float, queue_s: float = 0.0,
                       compute_s: float = 0.0) -> None:
        labels = (model, version)
        stats = self.model_stats(model, version)
        if ok:
            self.success.labels(*labels).inc()
            self.request_us.labels(*labels).inc(total_s * 1e6)
            self.queue_us.labels(*labels).inc(queue_s * 1e6)
            self.compute_us.labels(*labels).inc(compute_s * 1e6)
            self.request_seconds.labels(*labels).observe(total_s)
            self.queue_seconds.labels(*labels).observe(queue_s)
        else:
            self.failure.labels(*labels).inc()
        with stats.lock:
            if ok:
                stats.success_count += 1
                stats.success_ns += int(total_s * 1e9)
                stats.queue_count += 1
                stats.queue_ns += int(queue_s * 1e9)
                stats.compute_count += 1
                stats.compute_ns += int(compute_s * 1e9)
            else:
                stats.fail_count += 1
                stats.fail_ns += int(total_s * 1e9)

    def stats_json(self, model: str, version: str) -> dict:
        s = self.model_stats(model, version)
        with s.lock:
            return {
                "name": model,
                "version": version,
                "inference_count": s.inference_count,
                "execution_count": s.execution_count,
                "inference_stats": {
                    "success": {"count": s.success_count, "ns": s.success_ns},
                    "fail": {"count": s.fail_count, "ns": s.fail_ns},
                    "queue": {"count": s.queue_count, "ns": s.queue_ns},
                    "compute_infer": {"count": s.compute_count, "ns": s.compute_ns},
                },
            }

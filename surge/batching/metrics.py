"""Prometheus metrics of the dynamic batchers, one label value per served model.

They live in the server's registry next to the generation metrics (``surge:`` prefix, label
``model_name``), so one scrape of ``/metrics`` shows every model. The batch-size histogram tells
whether batching happens at all; queue time against compute time tells whether ``max_wait_ms``
or the model is what requests wait for.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from surge.batching.batcher import BatchObserver

__all__ = ["BatchMetrics"]

PREFIX = "surge:"
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# Batches of small models take milliseconds; a queue under load waits for a few batches.
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REJECT_REASONS = ("queue_full", "timeout", "cancelled")


class BatchMetrics:
    """The batcher metrics of every pool model, on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.batch_size = Histogram(
            PREFIX + "batch_size", "Items per model call of the dynamic batcher.",
            ["model_name"], buckets=BATCH_SIZE_BUCKETS, registry=registry)
        self.queue_time = Histogram(
            PREFIX + "batch_queue_time_seconds",
            "Seconds an item waited in the batcher queue before its batch started.",
            ["model_name"], buckets=SECONDS_BUCKETS, registry=registry)
        self.compute_time = Histogram(
            PREFIX + "batch_compute_time_seconds", "Seconds one batch took on the model.",
            ["model_name"], buckets=SECONDS_BUCKETS, registry=registry)
        self.queue_depth = Gauge(
            PREFIX + "batch_queue_depth", "Items waiting in the batcher queue.",
            ["model_name"], registry=registry)
        self.rejected = Counter(
            PREFIX + "batch_items_rejected", "Items refused or dropped, by reason.",
            ["model_name", "reason"], registry=registry)

    def observer(self, model_name: str) -> BatchObserver:
        """Hooks for one model's batcher; its series exist (at zero) from now on."""
        for metric in (self.batch_size, self.queue_time, self.compute_time, self.queue_depth):
            metric.labels(model_name)
        for reason in REJECT_REASONS:
            self.rejected.labels(model_name, reason)
        return _ModelObserver(self, model_name)


class _ModelObserver(BatchObserver):
    def __init__(self, metrics: BatchMetrics, model_name: str) -> None:
        self._metrics = metrics
        self._name = model_name

    def on_batch(self, size: int, queue_times: Sequence[float], compute_time: float) -> None:
        metrics, name = self._metrics, self._name
        metrics.batch_size.labels(name).observe(size)
        metrics.compute_time.labels(name).observe(max(compute_time, 0.0))
        queue_time = metrics.queue_time.labels(name)
        for seconds in queue_times:
            queue_time.observe(max(seconds, 0.0))

    def on_queue_depth(self, depth: int) -> None:
        self._metrics.queue_depth.labels(self._name).set(depth)

    def on_rejected(self, reason: str) -> None:
        self._metrics.rejected.labels(self._name, reason).inc()

"""The router's Prometheus metrics (``surge:router_`` prefix), per replica where it matters.

Per-replica counts (requests, failures by kind, ejections, retries) and gauges (in flight,
latency average, state) are plain integers on each ``Replica``, read by a collector when
``/metrics`` is scraped: the hot path only adds one to an int. The latency histogram is kept
the same way (a bisect into bucket counts: prometheus_client's own takes a lock per bucket
update, which costs more than the rest of the bookkeeping of a request). Replicas that left
disappear from the scrape.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from surge.router.replicas import Replica, ReplicaSet

__all__ = ["RouterMetrics"]

PREFIX = "surge:router_"
STATES = ("healthy", "unhealthy", "draining", "standby", "ejected_open", "ejected_half_open",
          "starting")
# Label values shown at zero before they happen, so dashboards and alerts (deploy/) find the
# series: why the router answered a request itself, and the transport kinds of failed attempts
# (a replica's 5xx adds status_<code> when it happens).
NO_REPLICA_REASONS = ("all_failed", "no_healthy_replica", "replicas_busy", "hold_queue_full",
                      "hold_timeout")
ERROR_KINDS = ("connect", "disconnect", "timeout")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class RouterMetrics:
    def __init__(self, replicas: ReplicaSet, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.replicas = replicas
        self.latency: dict[str, _Histogram] = {}  # by replica name
        self.scaling_events = Counter(
            f"{PREFIX}scaling_events", "Autoscaler and supervisor actions: up, down, replace",
            ["direction"], registry=self.registry)
        for direction in ("up", "down", "replace"):
            self.scaling_events.labels(direction)
        self.client_disconnects = Counter(
            f"{PREFIX}client_disconnects", "Clients that left before their answer ended "
            "(the replica's request was cancelled)", registry=self.registry)
        self.no_replica = Counter(
            f"{PREFIX}no_replica", "Requests answered by the router itself because no "
            "replica could take them", ["reason"], registry=self.registry)
        for reason in NO_REPLICA_REASONS:
            self.no_replica.labels(reason)
        self.retries = Counter(
            f"{PREFIX}retries", "Attempts retried on another replica, all replicas together "
            "(per replica: surge:router_replica_retries_total)", registry=self.registry)
        self.midstream_failures = Counter(
            f"{PREFIX}midstream_failures", "Streams that lost their replica after the client "
            "had received data (ended with an SSE error event)", registry=self.registry)
        self.cold_start = Histogram(
            f"{PREFIX}cold_start_seconds", "Scale from zero: from the first request with no "
            "replica running to the first replica ready", registry=self.registry,
            buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0))
        self.held_requests: Callable[[], int] | None = None  # set by scale to zero
        self.desired_replicas: Callable[[], int] | None = None
        self.retry_budget_refused: Callable[[], int] = lambda: 0
        self.registry.register(_ReplicaCollector(self, clock))

    def observe_latency(self, replica: Replica, seconds: float) -> None:
        histogram = self.latency.get(replica.name)
        if histogram is None:
            histogram = self.latency[replica.name] = _Histogram()
        histogram.observe(seconds)

    def forget(self, replica: Replica) -> None:
        """A replica left for good: drop its series."""
        self.latency.pop(replica.name, None)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Histogram:
    """Bucket counts, a sum and a count: what Prometheus needs, updated without a lock (the
    event loop is the only writer; a scrape reads a consistent-enough snapshot)."""

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        buckets, total = [], 0
        for bound, count in zip([*map(str, LATENCY_BUCKETS), "+Inf"], self.counts,
                                strict=True):
            total += count
            buckets.append((bound, total))
        return buckets


class _ReplicaCollector(Collector):
    """Reads the replicas' own counters at scrape time."""

    def __init__(self, metrics: RouterMetrics, clock: Callable[[], float]) -> None:
        self.metrics = metrics
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        replicas = list(self.metrics.replicas)
        yield from self._per_replica(replicas)
        yield from self._totals(replicas)
        latency = HistogramMetricFamily(
            f"{PREFIX}request_latency_seconds", "Time from sending a request to a replica to "
            "its whole answer (to the first body bytes for streams)", labels=["replica"])
        for name, histogram in list(self.metrics.latency.items()):
            latency.add_metric([name], histogram.cumulative(), histogram.sum)
        yield latency

    def _per_replica(self, replicas: list[Replica]) -> Iterator[Metric]:
        gauges = {
            "in_flight": ("Requests a replica is answering now", lambda r: r.in_flight),
            "ewma_latency_seconds": ("Moving average of a replica's recent latencies",
                                     lambda r: r.ewma_latency),
            "healthy": ("1 when the replica may get new requests now",
                        lambda r: float(r.is_routable(self.clock()))),
        }
        for name, (doc, value) in gauges.items():
            family = GaugeMetricFamily(f"{PREFIX}replica_{name}", doc, labels=["replica"])
            for replica in replicas:
                family.add_metric([replica.name], value(replica))
            yield family
        counters = {
            "requests": ("Attempts sent to a replica", lambda r: r.num_requests),
            "ejections": ("Times a replica's breaker opened", lambda r: r.num_ejections),
            "retries": ("Attempts on a replica that were retried on another one",
                        lambda r: r.num_retries),
        }
        for name, (doc, value) in counters.items():
            family = CounterMetricFamily(f"{PREFIX}replica_{name}", doc, labels=["replica"])
            for replica in replicas:
                family.add_metric([replica.name], value(replica))
            yield family
        errors = CounterMetricFamily(f"{PREFIX}replica_errors", "Failed attempts by kind "
                                     "(connect, disconnect, timeout, status_5xx)",
                                     labels=["replica", "kind"])
        for replica in replicas:
            counts = dict.fromkeys(ERROR_KINDS, 0) | replica.errors
            for kind, count in sorted(counts.items()):
                errors.add_metric([replica.name, kind], count)
        yield errors

    def _totals(self, replicas: list[Replica]) -> Iterator[Metric]:
        states = GaugeMetricFamily(f"{PREFIX}replicas", "Replicas by state", labels=["state"])
        for state in STATES:
            count = sum(1 for r in replicas if _state(r) == state)
            states.add_metric([state], count)
        yield states
        if self.metrics.desired_replicas is not None:
            yield GaugeMetricFamily(f"{PREFIX}desired_replicas", "The autoscaler's target",
                                    value=self.metrics.desired_replicas())
        if self.metrics.held_requests is not None:
            yield GaugeMetricFamily(f"{PREFIX}held_requests", "Requests waiting for a replica "
                                    "to start (scale from zero)",
                                    value=self.metrics.held_requests())
        yield CounterMetricFamily(f"{PREFIX}retry_budget_exhausted", "Retries refused because "
                                  "the retry budget was spent",
                                  value=self.metrics.retry_budget_refused())


def _state(replica: Replica) -> str:
    return "starting" if replica.starting else replica.state

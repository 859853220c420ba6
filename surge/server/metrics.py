"""Prometheus metrics named like vLLM's, with a ``surge:`` prefix.

Names, labels and histogram buckets follow vLLM (``vllm:time_to_first_token_seconds`` becomes
``surge:time_to_first_token_seconds``), so an existing vLLM Grafana dashboard works after a
prefix change. Request-level metrics are derived from timestamps the server records per request;
scheduler and KV-cache metrics come from the engine's ``EngineStats`` snapshots.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from surge.engine.protocol import EngineStats
from surge.server.step_metrics import StepBreakdownCollector

__all__ = ["ServerMetrics"]

PREFIX = "surge:"
# Label values created up front, so dashboards and alerts see zeros instead of missing series.
FINISH_REASONS = ("stop", "length", "abort")
REJECT_REASONS = ("queue_full_requests", "queue_full_tokens", "rate_limit_requests",
                  "rate_limit_tokens", "unauthorized", "body_too_large")

# vLLM's buckets (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    """Every server metric, on one registry (a fresh one unless given)."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, model_name: str = "surge"
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model_name = model_name
        # API-server process CPU and memory (process_cpu_seconds_total, ..._resident_memory_bytes).
        ProcessCollector(registry=self.registry)
        self._create_engine_metrics()
        self._create_request_metrics()
        # Cumulative engine counters last seen, to turn snapshots into counter increments.
        self._last_engine_totals: dict[str, int] = {}
        self._steps = StepBreakdownCollector(model_name)  # surge:engine_step_duration_seconds
        self.registry.register(self._steps)

    def record_rejected(self, reason: str) -> None:
        self._rejected.labels(self.model_name, reason).inc()

    def record_request(
        self,
        finish_reason: str,
        num_prompt_tokens: int,
        num_generation_tokens: int,
        arrival: float,
        first_scheduled: float | None,
        first_token: float | None,
        token_times: list[float],
        finished: float,
    ) -> None:
        """Count one finished request and observe its latencies (monotonic seconds).

        ``token_times`` are the times output tokens (or chunks of them) arrived; the first may
        or may not be ``first_token``. Queue time runs from arrival to first scheduled, prefill
        from first scheduled to first token, decode from first to last token.
        """
        self._success.labels(self.model_name, finish_reason).inc()
        self._prompt_tokens.labels(self.model_name).inc(max(num_prompt_tokens, 0))
        self._generation_tokens.labels(self.model_name).inc(max(num_generation_tokens, 0))
        self._observe(self._e2e, finished - arrival)
        if first_scheduled is not None:
            self._observe(self._queue_time, first_scheduled - arrival)
        if first_token is None:
            return
        self._observe(self._ttft, first_token - arrival)
        if first_scheduled is not None:
            self._observe(self._prefill_time, first_token - first_scheduled)
        times = _with_first_token(token_times, first_token)
        self._observe(self._decode_time, times[-1] - first_token)
        for earlier, later in pairwise(times):
            self._observe(self._itl, later - earlier)

    def update_engine(self, stats: EngineStats) -> None:
        """Set gauges, and advance counters by what the engine's cumulative totals gained."""
        model = self.model_name
        self._running.labels(model).set(stats.num_running)
        self._waiting.labels(model).set(stats.num_waiting)
        self._kv_usage.labels(model).set(stats.kv_cache_usage)
        self._advance("prefix_cache_queries", stats.prefix_cache_queries)
        self._advance("prefix_cache_hits", stats.prefix_cache_hits)
        self._advance("num_preemptions", stats.num_preemptions)
        self._steps.latest = stats.step_breakdown

    def track_engine_process(self, pid: Callable[[], int | None]) -> None:
        """Also export the engine process's CPU and memory (``surge_engine_process_*``).

        ``pid`` is called at each scrape, so it can follow an engine that was restarted; while
        it returns None (no engine running) those metrics are left out.
        """
        ProcessCollector(namespace="surge_engine", pid=lambda: str(pid()),
                         registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type, for ``GET /metrics``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _advance(self, name: str, total: int) -> None:
        last = self._last_engine_totals.get(name, 0)
        # A total below the last one means a restarted engine counting from zero again.
        gained = total - last if total >= last else total
        self._last_engine_totals[name] = total
        self._engine_counters[name].labels(self.model_name).inc(gained)

    def _observe(self, histogram: Histogram, seconds: float) -> None:
        # Clocks read on different threads can be a hair out of order; never observe < 0.
        histogram.labels(self.model_name).observe(max(seconds, 0.0))

    def _create_engine_metrics(self) -> None:
        self._running = self._gauge(
            "num_requests_running", "Number of requests in model execution batches.")
        self._waiting = self._gauge(
            "num_requests_waiting", "Number of requests waiting to be processed.")
        self._kv_usage = self._gauge(
            "kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self._engine_counters = {
            "prefix_cache_queries": self._counter(
                "prefix_cache_queries", "Prefix cache queries, in terms of number of tokens."),
            "prefix_cache_hits": self._counter(
                "prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."),
            "num_preemptions": self._counter(
                "num_preemptions", "Cumulative number of preemptions from the engine."),
        }

    def _create_request_metrics(self) -> None:
        self._prompt_tokens = self._counter("prompt_tokens", "Number of prefill tokens processed.")
        self._generation_tokens = self._counter(
            "generation_tokens", "Number of generation tokens processed.")
        self._success = self._counter(
            "request_success", "Count of successfully processed requests.",
            ("finished_reason",), FINISH_REASONS)
        self._rejected = self._counter(
            "request_rejected", "Requests refused before reaching the engine, by reason.",
            ("reason",), REJECT_REASONS)
        self._ttft = self._histogram(
            "time_to_first_token_seconds", "Histogram of time to first token in seconds.",
            TTFT_BUCKETS)
        self._itl = self._histogram(
            "inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS)
        self._e2e = self._histogram(
            "e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.",
            REQUEST_LATENCY_BUCKETS)
        self._queue_time = self._histogram(
            "request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS)
        self._prefill_time = self._histogram(
            "request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.",
            REQUEST_LATENCY_BUCKETS)
        self._decode_time = self._histogram(
            "request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
            REQUEST_LATENCY_BUCKETS)

    def _gauge(self, name: str, documentation: str) -> Gauge:
        gauge = Gauge(PREFIX + name, documentation, ["model_name"], registry=self.registry)
        gauge.labels(self.model_name).set(0)
        return gauge

    def _counter(
        self,
        name: str,
        documentation: str,
        extra_labels: Sequence[str] = (),
        initial_values: Sequence[str] = (),
    ) -> Counter:
        counter = Counter(PREFIX + name, documentation, ["model_name", *extra_labels],
                          registry=self.registry)
        if not extra_labels:
            counter.labels(self.model_name)
        for value in initial_values:
            counter.labels(self.model_name, value)
        return counter

    def _histogram(self, name: str, documentation: str, buckets: Sequence[float]) -> Histogram:
        histogram = Histogram(PREFIX + name, documentation, ["model_name"], buckets=buckets,
                              registry=self.registry)
        histogram.labels(self.model_name)
        return histogram


def _with_first_token(token_times: list[float], first_token: float) -> list[float]:
    """Token arrival times starting at the first token, whichever convention the caller used."""
    if token_times and token_times[0] <= first_token:
        return list(token_times)
    return [first_token, *token_times]

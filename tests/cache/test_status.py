"""The web apps' status page shows the response cache's hit rate, read from the server's
/metrics exposition as the cache writes it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from surge.apps.status import StatusWindow, parse_metrics
from surge.cache.metrics import CacheMetrics


def _summary(registry: CollectorRegistry) -> dict[str, object]:
    window = StatusWindow()
    window.add(parse_metrics(generate_latest(registry).decode(), at=0.0))
    return window.summary()


def test_status_reports_the_response_cache_hit_rate() -> None:
    registry = CollectorRegistry()
    assert _summary(registry)["response_cache_hit_rate"] is None  # no cache on this server
    metrics = CacheMetrics(registry)
    assert _summary(registry)["response_cache_hit_rate"] is None  # on, nothing looked up
    metrics.hits.labels("chat", "local").inc(2)
    metrics.hits.labels("embeddings", "shared").inc(1)
    metrics.misses.labels("chat").inc(1)
    metrics.bypasses.labels("not_reproducible").inc(5)  # not lookups: not in the rate
    assert _summary(registry)["response_cache_hit_rate"] == 0.75

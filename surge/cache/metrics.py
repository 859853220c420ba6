"""The response cache's Prometheus metrics, named like the server's (``surge:`` prefix), on
the server's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["BYPASS_REASONS", "ENDPOINTS", "CacheMetrics"]

PREFIX = "surge:response_cache_"
ENDPOINTS = ("chat", "completions", "embeddings")
BYPASS_REASONS = ("not_reproducible", "no_cache", "shared_tier_down")
TIERS = ("local", "shared", "semantic", "coalesced")
EVICTION_REASONS = ("size", "expired")
# A local hit takes microseconds, a Redis one about a millisecond; a slow Redis its timeout.
LOOKUP_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                  0.1, 0.25, 0.5, 1.0)


class CacheMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.hits = Counter(PREFIX + "hits", "requests answered from the response cache",
                            ["endpoint", "tier"], registry=registry)
        self.misses = Counter(PREFIX + "misses", "cacheable requests not found in the "
                              "response cache", ["endpoint"], registry=registry)
        self.bypasses = Counter(PREFIX + "bypasses", "requests that skipped the response "
                                "cache, by reason", ["reason"], registry=registry)
        self.stores = Counter(PREFIX + "stores", "answers kept", ["endpoint"],
                              registry=registry)
        self.evictions = Counter(PREFIX + "evictions", "entries of the local tier that left "
                                 "it before being replaced or flushed", ["reason"],
                                 registry=registry)
        self.corrupt = Counter(PREFIX + "corrupt_entries", "shared-tier entries that could "
                               "not be read (treated as misses and overwritten)",
                               registry=registry)
        self.shared_errors = Counter(PREFIX + "shared_tier_errors", "Redis calls that failed "
                                     "or timed out", ["operation"], registry=registry)
        self.bytes = Gauge(PREFIX + "bytes", "bytes held by the local tier", registry=registry)
        self.entries = Gauge(PREFIX + "entries", "entries in the local tier",
                             registry=registry)
        self.lookup_seconds = Histogram(PREFIX + "lookup_seconds", "time to look a request "
                                        "up (both tiers)", buckets=LOOKUP_BUCKETS,
                                        registry=registry)
        for endpoint in ENDPOINTS:  # zeros up front, so dashboards see the series
            self.misses.labels(endpoint)
            self.stores.labels(endpoint)
            for tier in TIERS:
                self.hits.labels(endpoint, tier)
        for reason in BYPASS_REASONS:
            self.bypasses.labels(reason)
        for reason in EVICTION_REASONS:
            self.evictions.labels(reason)
        for operation in ("get", "set", "flush"):
            self.shared_errors.labels(operation)

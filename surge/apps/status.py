"""The status page's numbers, from the server's own Prometheus ``/metrics``.

Rates and latency percentiles are computed over a recent window (the difference between the
newest scrape and the oldest one kept in the window), so the page shows what happens now, not
since start. Percentiles are estimated from histogram buckets by linear interpolation, as
Prometheus' ``histogram_quantile`` does.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["MetricsSnapshot", "StatusWindow", "bucket_quantile", "parse_metrics"]

PREFIX = "surge:"
LATENCY_HISTOGRAMS = {"e2e": "e2e_request_latency_seconds",
                      "ttft": "time_to_first_token_seconds",
                      "itl": "inter_token_latency_seconds"}
QUANTILES = (0.5, 0.9, 0.99)
# Where a request's time goes (the breakdown): the engine's phases and each request stage.
PHASE_HISTOGRAMS = {"request_queue_time_seconds": "queue",
                    "request_prefill_time_seconds": "prefill",
                    "request_decode_time_seconds": "decode",
                    "e2e_request_latency_seconds": "e2e"}
STAGE_HISTOGRAM = "stage_duration_seconds"


@dataclass
class MetricsSnapshot:
    """The few series the page needs, summed over models (several may be served)."""

    at: float
    values: dict[str, float]  # gauges and counters
    buckets: dict[str, dict[float, float]]  # histogram -> upper bound -> cumulative count
    # Per tenant (``surge:tenant_*`` series): sample name -> value, and TTFT buckets.
    tenants: dict[str, dict[str, float]] = field(default_factory=dict)
    tenant_ttft: dict[str, dict[float, float]] = field(default_factory=dict)
    # Breakdown phase (queue, prefill, decode, e2e, stage:NAME) -> [sum of seconds, count].
    phases: dict[str, list[float]] = field(default_factory=dict)


def parse_metrics(text: str, at: float | None = None) -> MetricsSnapshot:
    values: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    tenants: dict[str, dict[str, float]] = {}
    tenant_ttft: dict[str, dict[float, float]] = {}
    phases: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(PREFIX):
            continue
        name = family.name[len(PREFIX):]
        for sample in family.samples:
            if name in PHASE_HISTOGRAMS or name == STAGE_HISTOGRAM:
                _add_phase_sample(name, sample.name, sample.labels, sample.value, phases)
            if "tenant" in sample.labels:
                _add_tenant_sample(sample.name[len(PREFIX):], sample.labels, sample.value,
                                   tenants, tenant_ttft)
            if sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                per_bound = buckets.setdefault(name, {})
                per_bound[bound] = per_bound.get(bound, 0.0) + sample.value
            elif not sample.name.endswith(("_created", "_sum")):
                key = sample.name[len(PREFIX):]
                if "finished_reason" in sample.labels:
                    key += ":" + sample.labels["finished_reason"]
                values[key] = values.get(key, 0.0) + sample.value
    return MetricsSnapshot(time.monotonic() if at is None else at, values, buckets, tenants,
                           tenant_ttft, phases)


def _add_phase_sample(family: str, sample: str, labels: dict[str, str], value: float,
                      phases: dict[str, list[float]]) -> None:
    """Sums and counts of the breakdown's histograms (summed over models)."""
    if sample.endswith("_sum"):
        slot = 0
    elif sample.endswith("_count"):
        slot = 1
    else:
        return
    phase = (f"stage:{labels.get('stage', '?')}" if family == STAGE_HISTOGRAM
             else PHASE_HISTOGRAMS[family])
    phases.setdefault(phase, [0.0, 0.0])[slot] += value


def _add_tenant_sample(name: str, labels: dict[str, str], value: float,
                       tenants: dict[str, dict[str, float]],
                       tenant_ttft: dict[str, dict[float, float]]) -> None:
    tenant = labels["tenant"]
    if name == "tenant_time_to_first_token_seconds_bucket":
        per_bound = tenant_ttft.setdefault(tenant, {})
        bound = float(labels["le"])
        per_bound[bound] = per_bound.get(bound, 0.0) + value
        return
    if name.endswith(("_bucket", "_created", "_sum", "_count")):
        return
    key = name + (":" + labels["kind"] if "kind" in labels else "")
    per_tenant = tenants.setdefault(tenant, {})
    per_tenant[key] = per_tenant.get(key, 0.0) + value  # summed over reasons and models


def bucket_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The q-quantile of cumulative ``buckets`` (None when they hold no observation)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # beyond the last finite bucket: its bound is all we know
            share = (rank - lower_count) / (count - lower_count) if count > lower_count else 1
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return lower_bound


class StatusWindow:
    """Recent scrapes, oldest first; numbers are computed between the oldest and newest."""

    def __init__(self, window_seconds: float = 30.0) -> None:
        self.window_seconds = window_seconds
        self._snapshots: deque[MetricsSnapshot] = deque()

    def add(self, snapshot: MetricsSnapshot) -> None:
        self._snapshots.append(snapshot)
        # Keep one snapshot at or beyond the window's start as the baseline.
        while (len(self._snapshots) > 2
               and snapshot.at - self._snapshots[1].at >= self.window_seconds):
            self._snapshots.popleft()

    def summary(self) -> dict[str, Any]:
        newest = self._snapshots[-1]
        oldest = self._snapshots[0]
        elapsed = newest.at - oldest.at
        v = newest.values
        return {
            "window_seconds": round(elapsed, 3),
            "requests_per_second": _rate(oldest, newest, _finished(oldest), _finished(newest)),
            "output_tokens_per_second": _rate(
                oldest, newest, oldest.values.get("generation_tokens_total", 0.0),
                v.get("generation_tokens_total", 0.0)),
            "latency_seconds": {key: _percentiles(oldest, newest, name)
                                for key, name in LATENCY_HISTOGRAMS.items()},
            "requests_running": v.get("num_requests_running", 0.0),
            "queue_depth": v.get("num_requests_waiting", 0.0),
            "kv_cache_usage": v.get("kv_cache_usage_perc", 0.0),
            "requests_total": _finished(newest),
            "requests_rejected_total": v.get("request_rejected_total", 0.0),
            "prefix_cache_hit_rate": _ratio(v.get("prefix_cache_hits_total", 0.0),
                                            v.get("prefix_cache_queries_total", 0.0)),
            # Of the requests the response cache looked up (None: no cache, or no lookups).
            "response_cache_hit_rate": _ratio(
                v.get("response_cache_hits_total", 0.0),
                v.get("response_cache_hits_total", 0.0)
                + v.get("response_cache_misses_total", 0.0)),
            "fairness_index": v.get("tenant_fairness_index"),
            "breakdown": _breakdown(oldest, newest),
            "tenants": _tenants(oldest, newest),
        }


def _tenants(oldest: MetricsSnapshot, newest: MetricsSnapshot) -> list[dict[str, Any]]:
    """Each tenant's output tokens/s and TTFT percentiles in the window, and its totals;
    busiest first."""
    rows = []
    for tenant, now in newest.tenants.items():
        before = oldest.tenants.get(tenant, {}) if oldest is not newest else {}
        key = "tenant_served_tokens_total:output"
        ttft = _window_buckets(oldest.tenant_ttft.get(tenant, {}) if oldest is not newest
                               else {}, newest.tenant_ttft.get(tenant, {}))
        rows.append({
            "tenant": tenant,
            "output_tokens_per_second": _rate(oldest, newest, before.get(key, 0.0),
                                              now.get(key, 0.0)),
            "ttft_seconds": {f"p{round(q * 100)}": bucket_quantile(q, ttft) for q in (0.5, 0.99)},
            "requests_total": now.get("tenant_requests_total", 0.0),
            "rejected_total": now.get("tenant_request_rejected_total", 0.0),
            "weight": now.get("tenant_weight"),
        })
    return sorted(rows, key=lambda r: (-(r["output_tokens_per_second"] or 0.0), r["tenant"]))


def _breakdown(oldest: MetricsSnapshot, newest: MetricsSnapshot) -> list[dict[str, Any]]:
    """Where recent requests' time went: the mean seconds of each phase in the window (of
    everything when the window saw no request), from the server's histograms.

    Rows: each request stage (its own code's time, per request or per streamed choice), the
    engine's queue, prefill and decode, then "other": the rest of the server's end-to-end
    time (HTTP, admission, detokenization and anything not timed apart), then the end to end
    total. Pre-stages run before the end-to-end clock starts; post-stages inside decode.
    The network between client and server is not visible to the server."""
    window = {}
    for phase, (total, count) in newest.phases.items():
        total_before, count_before = (oldest.phases.get(phase, [0.0, 0.0])
                                      if oldest is not newest else [0.0, 0.0])
        window[phase] = (total - total_before, count - count_before)
    if window.get("e2e", (0.0, 0.0))[1] <= 0:  # nothing finished in the window
        window = {phase: (total, count) for phase, (total, count) in newest.phases.items()}
    means = {phase: total / count for phase, (total, count) in window.items() if count > 0}
    rows = [{"phase": phase, "mean_seconds": mean, "count": window[phase][1]}
            for phase, mean in sorted(means.items()) if phase.startswith("stage:")]
    rows += [{"phase": phase, "mean_seconds": means[phase], "count": window[phase][1]}
             for phase in ("queue", "prefill", "decode") if phase in means]
    if "e2e" in means:
        timed = sum(means.get(phase, 0.0) for phase in ("queue", "prefill", "decode"))
        rows.append({"phase": "other", "mean_seconds": max(means["e2e"] - timed, 0.0),
                     "count": window["e2e"][1]})
        rows.append({"phase": "e2e", "mean_seconds": means["e2e"], "count": window["e2e"][1]})
    return rows


def _finished(snapshot: MetricsSnapshot) -> float:
    return sum(value for key, value in snapshot.values.items()
               if key.startswith("request_success_total:"))


def _rate(oldest: MetricsSnapshot, newest: MetricsSnapshot, before: float,
          after: float) -> float | None:
    elapsed = newest.at - oldest.at
    return None if elapsed <= 0 else max(after - before, 0.0) / elapsed


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


def _percentiles(oldest: MetricsSnapshot, newest: MetricsSnapshot,
                 name: str) -> dict[str, float | None]:
    """Percentiles of what was observed in the window; of everything if the window holds
    nothing yet (a page opened after the traffic still shows the latencies)."""
    after = newest.buckets.get(name, {})
    before = oldest.buckets.get(name, {}) if oldest is not newest else {}
    use = _window_buckets(before, after)
    return {f"p{round(q * 100)}": bucket_quantile(q, use) for q in QUANTILES}


def _window_buckets(before: dict[float, float],
                    after: dict[float, float]) -> dict[float, float]:
    """What was observed between two scrapes; everything if nothing was."""
    window = {bound: count - before.get(bound, 0.0) for bound, count in after.items()}
    return window if _observations(window) > 0 else after


def _observations(buckets: dict[float, float]) -> float:
    return max(buckets.values(), default=0.0)  # cumulative: the +Inf bucket counts them all

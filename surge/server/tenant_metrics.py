"""Per-tenant metrics: tokens served, queue time, time to first token, refusals, and Jain's
fairness index of the service rate over a sliding window.

Tenant names come from requests (a ``user`` field, a header), so their number is unbounded:
the first ``max_labels`` tenants seen (those the tenants file names first) get their own label
value, every later one is counted under ``other``, and Prometheus never holds more than
``max_labels + 1`` series per metric.

Jain's index is ``(sum x)^2 / (n * sum x^2)`` over the tenants backlogged in the window, where
``x`` is a tenant's service (prompt tokens + 2 x output tokens, the fair scheduler's cost)
divided by its weight: 1.0 when every backlogged tenant got the same weighted service, 1/n
when one got all of it. A tenant is backlogged in the window when it had to queue behind its
own requests or was refused: a tenant that asked for less than its share is not starved by
getting less, so it is left out.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from surge.engine.protocol import TenantStats
from surge.server.metrics import PREFIX, REQUEST_LATENCY_BUCKETS, TTFT_BUCKETS

__all__ = ["DEFAULT_MAX_TENANT_LABELS", "FAIRNESS_WINDOW_SECONDS", "OTHER_TENANTS",
           "TenantMetrics", "jain_index"]

DEFAULT_MAX_TENANT_LABELS = 32
OTHER_TENANTS = "other"
FAIRNESS_WINDOW_SECONDS = 60.0
# The fair scheduler's weighted cost of a token (surge.engine.fairness); not imported, so
# that this module does not pull the engine's scheduler into the API process.
PROMPT_TOKEN_COST, OUTPUT_TOKEN_COST = 1.0, 2.0
# Window events kept at most (one per finished request or refusal): a safety net for floods.
_MAX_EVENTS = 200_000


def jain_index(values: Iterable[float]) -> float | None:
    """Jain's fairness index of ``values``; None for no values, 1.0 when all are zero."""
    xs = [max(v, 0.0) for v in values]
    if not xs:
        return None
    total, squares = sum(xs), sum(x * x for x in xs)
    return 1.0 if squares == 0 else total * total / (len(xs) * squares)


class TenantMetrics:
    def __init__(self, registry: CollectorRegistry, model_name: str, *,
                 max_labels: int = DEFAULT_MAX_TENANT_LABELS,
                 window: float = FAIRNESS_WINDOW_SECONDS,
                 weight_of: Callable[[str], float] = lambda tenant: 1.0,
                 time_fn: Callable[[], float] = time.monotonic) -> None:
        self.model_name = model_name
        self.max_labels = max_labels
        self.window = window
        self.weight_of = weight_of
        self._time_fn = time_fn
        self._labels: set[str] = set()
        self._lock = threading.Lock()
        # (time, tenant, weighted service) of finished requests; (time, tenant) of backlog.
        self._served: deque[tuple[float, str, float]] = deque(maxlen=_MAX_EVENTS)
        self._backlogged: deque[tuple[float, str]] = deque(maxlen=_MAX_EVENTS)
        labels = ["model_name", "tenant"]
        self._tokens = Counter(PREFIX + "tenant_served_tokens", "Tokens served per tenant "
                               "(kind: prompt or output).", [*labels, "kind"],
                               registry=registry)
        self._requests = Counter(PREFIX + "tenant_requests", "Finished requests per tenant.",
                                 labels, registry=registry)
        self._rejected = Counter(PREFIX + "tenant_request_rejected", "Requests refused per "
                                 "tenant, by reason.", [*labels, "reason"], registry=registry)
        self._ttft = Histogram(PREFIX + "tenant_time_to_first_token_seconds",
                               "Time to first token per tenant.", labels,
                               buckets=TTFT_BUCKETS, registry=registry)
        self._queue = Histogram(PREFIX + "tenant_request_queue_time_seconds",
                                "Time waiting for the engine per tenant.", labels,
                                buckets=REQUEST_LATENCY_BUCKETS, registry=registry)
        self._jain = Gauge(PREFIX + "tenant_fairness_index", "Jain's fairness index of the "
                           "weighted service rate of the tenants backlogged in the last "
                           f"{window:g} s (1 is perfectly fair; 1 with fewer than two).",
                           ["model_name"], registry=registry)
        self._jain.labels(model_name).set_function(lambda: self.fairness_index() or 1.0)
        # From the engine's scheduler (EngineStats.tenants): what it weighs and has served.
        self._weight = Gauge(PREFIX + "tenant_weight", "The engine scheduler's weight of the "
                             "tenant.", labels, registry=registry)
        self._virtual = Gauge(PREFIX + "tenant_virtual_tokens", "The fair scheduler's virtual "
                              "token counter of the tenant (weighted tokens served / weight).",
                              labels, registry=registry)
        self._engine_requests = Gauge(PREFIX + "tenant_num_requests", "The tenant's requests "
                                      "in the engine (state: running or waiting).",
                                      [*labels, "state"], registry=registry)

    def label(self, tenant: str) -> str:
        """The tenant's label value: its name while fewer than ``max_labels`` are in use."""
        if tenant in self._labels:
            return tenant
        if len(self._labels) < self.max_labels and tenant != OTHER_TENANTS:
            self._labels.add(tenant)
            return tenant
        return OTHER_TENANTS

    def reserve(self, tenants: Iterable[str]) -> None:
        """Give these tenants (the tenants file's) their own label first."""
        for tenant in tenants:
            label = self.label(tenant)
            self._requests.labels(self.model_name, label)  # a zero, not a missing series

    def update_engine(self, tenants: Mapping[str, TenantStats]) -> None:
        """Gauges from the engine's per-tenant stats (tenants over the label cap are left
        out: a sum of weights or counters means nothing)."""
        for tenant, stats in tenants.items():
            label = self.label(tenant)
            if label == OTHER_TENANTS:
                continue
            self._weight.labels(self.model_name, label).set(stats.weight)
            self._virtual.labels(self.model_name, label).set(stats.virtual_tokens)
            self._engine_requests.labels(self.model_name, label, "running").set(
                stats.num_running)
            self._engine_requests.labels(self.model_name, label, "waiting").set(
                max(stats.num_waiting, 0))

    def record_request(self, tenant: str, num_prompt_tokens: int, num_output_tokens: int,
                       queue_time: float | None, ttft: float | None) -> None:
        label = self.label(tenant)
        self._requests.labels(self.model_name, label).inc()
        self._tokens.labels(self.model_name, label, "prompt").inc(max(num_prompt_tokens, 0))
        self._tokens.labels(self.model_name, label, "output").inc(max(num_output_tokens, 0))
        if queue_time is not None:
            self._queue.labels(self.model_name, label).observe(max(queue_time, 0.0))
        if ttft is not None:
            self._ttft.labels(self.model_name, label).observe(max(ttft, 0.0))
        service = (num_prompt_tokens * PROMPT_TOKEN_COST
                   + num_output_tokens * OUTPUT_TOKEN_COST)
        with self._lock:
            self._served.append((self._time_fn(), tenant, service))

    def record_rejected(self, tenant: str, reason: str) -> None:
        self._rejected.labels(self.model_name, self.label(tenant), reason).inc()
        self.record_backlogged(tenant)

    def record_backlogged(self, tenant: str) -> None:
        """The tenant had more to send than it was served (a queue of its own, a refusal)."""
        with self._lock:
            self._backlogged.append((self._time_fn(), tenant))

    def window_service(self) -> dict[str, tuple[float, bool]]:
        """Tenant -> (weighted service / weight in the window, backlogged in the window)."""
        with self._lock:
            since = self._time_fn() - self.window
            for events in (self._served, self._backlogged):
                while events and events[0][0] < since:
                    events.popleft()
            service: dict[str, float] = {}
            for _, tenant, amount in self._served:
                service[tenant] = service.get(tenant, 0.0) + amount
            backlogged = {tenant for _, tenant in self._backlogged}
        return {tenant: (service.get(tenant, 0.0) / self.weight_of(tenant),
                         tenant in backlogged)
                for tenant in service.keys() | backlogged}

    def fairness_index(self) -> float | None:
        """Jain's index over the tenants backlogged in the window; None with fewer than
        two (nobody to be unfair to)."""
        rates = [rate for rate, backlogged in self.window_service().values() if backlogged]
        return jain_index(rates) if len(rates) >= 2 else None

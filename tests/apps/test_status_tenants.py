"""The status page's tenant rows and fairness index, read from /metrics exposition as the
server's per-tenant metrics write it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from surge.apps.status import StatusWindow, parse_metrics
from surge.engine.protocol import TenantStats
from surge.server.tenant_metrics import TenantMetrics


def test_status_shows_each_tenants_rate_ttft_refusals_and_the_fairness_index() -> None:
    registry = CollectorRegistry()
    clock = [0.0]
    metrics = TenantMetrics(registry, "m", time_fn=lambda: clock[0],
                            weight_of=lambda tenant: 2.0 if tenant == "acme" else 1.0)
    window = StatusWindow()
    window.add(parse_metrics(generate_latest(registry).decode(), at=0.0))
    for _ in range(4):
        metrics.record_request("acme", 10, 50, 0.1, 0.3)
    metrics.record_request("globex", 10, 20, 0.1, 2.0)
    metrics.record_rejected("acme", "queue_full_requests")
    metrics.record_backlogged("globex")
    metrics.update_engine({"acme": TenantStats(weight=2.0), "globex": TenantStats()})
    window.add(parse_metrics(generate_latest(registry).decode(), at=10.0))
    summary = window.summary()
    rows = {row["tenant"]: row for row in summary["tenants"]}
    assert [row["tenant"] for row in summary["tenants"]] == ["acme", "globex"]  # busiest first
    acme, globex = rows["acme"], rows["globex"]
    assert acme["output_tokens_per_second"] == 20.0 and globex["output_tokens_per_second"] == 2.0
    assert acme["requests_total"] == 4 and acme["rejected_total"] == 1
    assert globex["rejected_total"] == 0 and acme["weight"] == 2.0
    assert 0.25 <= acme["ttft_seconds"]["p50"] <= 0.5 < globex["ttft_seconds"]["p99"]
    # acme: (4 x (10 + 2 x 50)) / 2 = 220 weighted; globex: 10 + 2 x 20 = 50.
    expected = (220 + 50) ** 2 / (2 * (220**2 + 50**2))
    assert abs(summary["fairness_index"] - expected) < 1e-9
    # The non-tenant numbers are untouched by the tenant series.
    assert summary["requests_total"] == 0.0

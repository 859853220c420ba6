"""The status page's "where the time went": mean queue, prefill, decode, each request stage
and the rest of end to end, from the server's own metrics, over the recent window."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from surge.apps.status import StatusWindow, parse_metrics
from surge.server.metrics import ServerMetrics
from surge.stages.pipeline import LoadedStage, StageMetrics
from tests.stages.sample_stages import Scripted, Stopper


def _record(metrics: ServerMetrics, arrival: float, queue: float, prefill: float,
            decode: float, tail: float) -> None:
    scheduled = arrival + queue
    first = scheduled + prefill
    last = first + decode
    metrics.record_request(finish_reason="stop", num_prompt_tokens=5,
                           num_generation_tokens=3, arrival=arrival,
                           first_scheduled=scheduled, first_token=first,
                           token_times=[first, first + decode / 2, last],
                           finished=last + tail)


def _scrape(registry: CollectorRegistry, at: float):  # type: ignore[no-untyped-def]
    return parse_metrics(generate_latest(registry).decode(), at=at)


def test_breakdown_of_the_window() -> None:
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry)
    stages = [LoadedStage("scripted", Scripted()), LoadedStage("Stopper", Stopper())]
    stage_metrics = StageMetrics(registry, stages)
    window = StatusWindow(window_seconds=1)
    window.add(_scrape(registry, 0.0))
    assert window.summary()["breakdown"] == []  # nothing observed yet: no rows, no errors
    # Before the window: slow requests that must not count once the window has its own.
    _record(metrics, 0.0, queue=5.0, prefill=5.0, decode=5.0, tail=5.0)
    window.add(_scrape(registry, 1.0))
    for _ in range(4):
        _record(metrics, 10.0, queue=0.1, prefill=0.2, decode=0.4, tail=0.05)
        stage_metrics.duration.labels("scripted").observe(0.002)
        stage_metrics.duration.labels("Stopper").observe(0.004)
    window.add(_scrape(registry, 2.0))
    rows = {row["phase"]: row for row in window.summary()["breakdown"]}
    assert list(rows) == ["stage:Stopper", "stage:scripted", "queue", "prefill", "decode",
                          "other", "e2e"]
    assert rows["queue"]["mean_seconds"] == pytest.approx(0.1)
    assert rows["prefill"]["mean_seconds"] == pytest.approx(0.2)
    assert rows["decode"]["mean_seconds"] == pytest.approx(0.4)
    assert rows["other"]["mean_seconds"] == pytest.approx(0.05)
    assert rows["e2e"]["mean_seconds"] == pytest.approx(0.75) and rows["e2e"]["count"] == 4
    assert rows["stage:scripted"]["mean_seconds"] == pytest.approx(0.002)
    assert rows["stage:Stopper"]["count"] == 4


def test_breakdown_without_stages_and_an_idle_window() -> None:
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry)
    window = StatusWindow(window_seconds=30)
    window.add(_scrape(registry, 0.0))
    _record(metrics, 0.0, queue=1.0, prefill=1.0, decode=1.0, tail=1.0)
    window.add(_scrape(registry, 1.0))
    window.add(_scrape(registry, 2.0))  # the latest scrapes saw nothing new
    phases = [row["phase"] for row in window.summary()["breakdown"]]
    assert phases == ["queue", "prefill", "decode", "other", "e2e"]

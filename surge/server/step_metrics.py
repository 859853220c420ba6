"""``surge:engine_step_duration_seconds{phase}``: the engine's per-step breakdown (schedule,
forward, sampling, output) as Prometheus histograms.

The engine keeps the histograms itself (``surge.engine.step_stats``) and ships their
cumulative counts in every stats snapshot; this collector exposes the latest snapshot as it
is, so no step is lost between scrapes and a restarted engine reads as a counter reset.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import accumulate

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from surge.engine.protocol import StepBreakdown

__all__ = ["StepBreakdownCollector"]

NAME = "surge:engine_step_duration_seconds"


class StepBreakdownCollector(Collector):
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.latest: StepBreakdown | None = None

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            NAME, "Time engine steps spent per phase (schedule, forward, sampling, output).",
            labels=["model_name", "phase"])
        latest = self.latest
        if latest is not None:
            bounds = [*(f"{b:g}" for b in latest.bounds), "+Inf"]
            for phase, counts in latest.counts.items():
                cumulative = list(accumulate(counts))
                family.add_metric([self.model_name, phase],
                                  list(zip(bounds, cumulative, strict=True)),
                                  latest.sums.get(phase, 0.0))
        yield family

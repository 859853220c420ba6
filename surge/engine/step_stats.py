"""Where each engine step spends its time: schedule, forward, sampling, output.

The engine process keeps cumulative histograms (counts per bucket and sums) and ships them in
every ``EngineStats`` snapshot; the API process exports them as Prometheus histograms
(``surge:engine_step_duration_seconds{phase}``). Cumulative counts survive snapshots that are
never scraped, and a restarted engine starting from zero reads as a counter reset.

On CUDA the forward phase ends when its kernels are queued and sampling waits for them, so
there the split between the two says less than on CPU; their sum is the step's model time.
"""

from __future__ import annotations

from bisect import bisect_left

from surge.engine.protocol import StepBreakdown

__all__ = ["PHASES", "STEP_BUCKETS", "StepStats"]

PHASES = ("schedule", "forward", "sampling", "output")
# Seconds: from tens of microseconds (scheduling a decode batch) to seconds (a CPU prefill).
STEP_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class StepStats:
    """Cumulative per-phase histograms; ``observe`` is called once per step."""

    def __init__(self) -> None:
        self._counts = {phase: [0] * (len(STEP_BUCKETS) + 1) for phase in PHASES}
        self._sums = dict.fromkeys(PHASES, 0.0)

    def observe(self, schedule: float, forward: float, sampling: float, output: float) -> None:
        for phase, seconds in zip(PHASES, (schedule, forward, sampling, output), strict=True):
            seconds = max(seconds, 0.0)
            # le buckets: a value equal to a bound counts in that bound's bucket.
            self._counts[phase][bisect_left(STEP_BUCKETS, seconds)] += 1
            self._sums[phase] += seconds

    def snapshot(self) -> StepBreakdown:
        return StepBreakdown(list(STEP_BUCKETS),
                             {phase: list(counts) for phase, counts in self._counts.items()},
                             dict(self._sums))

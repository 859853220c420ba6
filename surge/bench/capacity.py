"""Capacity planning: how many replicas serve R requests/s with TTFT p99 under S.

A discrete-event model fed by one replica's measured curve (a closed-loop ``surge bench``
concurrency sweep). Requests arrive as a Poisson stream at R req/s; the router sends each to
the replica with the fewest outstanding requests (``least_outstanding``, Surge's default); each
replica is a continuous-batching server:

* up to ``max_batch`` requests run at once; the rest wait in the replica's FIFO queue;
* with n running, the replica finishes requests at X(n) req/s, X being the measured closed-loop
  throughput at concurrency n (linear between measured points, flat past the last one), shared
  equally by the n running requests (processor sharing: one engine step serves the whole batch);
* a request's TTFT is its queueing time plus a draw from the TTFT distribution measured at
  concurrency n (n counting it, when it is admitted), interpolated between measured levels
  quantile by quantile.

All replica counts are simulated on the same arrivals and draws (common random numbers), so a
table of N against TTFT p99 compares like with like. See docs/scaling.md for the limits.
"""

from __future__ import annotations

import bisect
import heapq
import json
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Plan", "ReplicaCurve", "SimResult", "plan_replicas", "simulate"]

_GRID = np.linspace(0.0, 1.0, 201)  # quantile levels kept per concurrency level
_WORKS = ("fixed", "exponential")


@dataclass(frozen=True)
class ReplicaCurve:
    """One replica's measured behaviour at each closed-loop concurrency level."""

    concurrency: tuple[int, ...]
    throughput: tuple[float, ...]  # completed requests/s at that concurrency
    ttft_quantiles: tuple[tuple[float, ...], ...]  # TTFT at each of _GRID's quantile levels
    max_batch: int  # requests a replica runs at once; more wait in its queue

    @classmethod
    def from_points(cls, concurrency: Sequence[int], throughput: Sequence[float],
                    ttft_samples: Sequence[Sequence[float]],
                    max_batch: int | None = None) -> ReplicaCurve:
        """Build from raw measurements: one TTFT sample list per concurrency level."""
        if not concurrency or not len(concurrency) == len(throughput) == len(ttft_samples):
            raise ValueError("a curve needs one throughput and one TTFT sample list per "
                             "concurrency level, and at least one level")
        order = sorted(range(len(concurrency)), key=lambda i: concurrency[i])
        levels = [int(concurrency[i]) for i in order]
        if levels[0] < 1 or len(set(levels)) != len(levels):
            raise ValueError(f"concurrency levels must be distinct integers >= 1 (got {levels})")
        rates = [float(throughput[i]) for i in order]
        if any(not r > 0 or not math.isfinite(r) for r in rates):
            raise ValueError(f"throughput must be > 0 at every level (got {rates})")
        quantiles = []
        for i in order:
            samples = np.asarray(ttft_samples[i], dtype=float)
            if samples.size == 0 or not np.all(np.isfinite(samples)) or np.any(samples < 0):
                raise ValueError(f"concurrency {concurrency[i]}: need finite TTFT samples >= 0")
            quantiles.append(tuple(float(v) for v in np.quantile(samples, _GRID)))
        batch = levels[-1] if max_batch is None else int(max_batch)
        if batch < 1:
            raise ValueError(f"max_batch must be >= 1 (got {max_batch})")
        return cls(tuple(levels), tuple(rates), tuple(quantiles), batch)

    @classmethod
    def from_bench_json(cls, path: str | Path, max_batch: int | None = None,
                        replicas: int = 1) -> ReplicaCurve:
        """Read a ``surge bench --concurrency 1,2,4,... --output FILE.json`` results file.

        ``replicas``: the sweep ran through a router over this many replicas (least_outstanding
        keeps concurrency/replicas on each), so concurrency and throughput are divided by it.
        That profiles a replica as it runs in its deployment, sharing whatever the replicas share.
        """
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1 (got {replicas})")
        doc = json.loads(Path(path).read_text())
        runs = [r for r in doc.get("runs", []) if r.get("load", {}).get("mode") == "closed"]
        if not runs:
            raise ValueError(f"{path}: no closed-loop runs; measure the profile with "
                             "`surge bench --concurrency 1,2,4,8 --output FILE.json`")
        levels, rates, samples = [], [], []
        for run in runs:
            ttfts = [r["ttft"] for r in run["records"]
                     if r.get("error_type") is None and r.get("ttft") is not None]
            if not ttfts:
                raise ValueError(f"{path}: concurrency {run['load']['concurrency']} has no TTFT "
                                 "samples (measure a streamed completions or chat endpoint)")
            level = int(run["load"]["concurrency"])
            if level % replicas:
                raise ValueError(f"{path}: concurrency {level} is not a multiple of the "
                                 f"{replicas} replicas it was spread over")
            levels.append(level // replicas)
            rates.append(float(run["summary"]["request_throughput"]) / replicas)
            samples.append(ttfts)
        return cls.from_points(levels, rates, samples, max_batch)

    @property
    def peak_throughput(self) -> float:
        """Most requests/s one replica sustains (at any running count up to max_batch)."""
        return max(self.rate(n) for n in range(1, self.max_batch + 1))

    def rate(self, n: int) -> float:
        """Requests/s a replica completes with n requests running."""
        if n <= 0:
            return 0.0
        levels, rates = self.concurrency, self.throughput
        if n <= levels[0]:  # below the first level the replica scales linearly from zero
            return rates[0] * n / levels[0]
        if n >= levels[-1]:
            return rates[-1]
        i = bisect.bisect_left(levels, n)
        w = (n - levels[i - 1]) / (levels[i] - levels[i - 1])
        return rates[i - 1] + w * (rates[i] - rates[i - 1])

    def ttft(self, n: int, u: float) -> float:
        """The TTFT at quantile u of a request admitted as the n-th running one."""
        levels = self.concurrency
        n = min(max(n, levels[0]), levels[-1])
        i = bisect.bisect_left(levels, n)
        if levels[i] == n:
            return _quantile(self.ttft_quantiles[i], u)
        w = (n - levels[i - 1]) / (levels[i] - levels[i - 1])
        lo = _quantile(self.ttft_quantiles[i - 1], u)
        return lo + w * (_quantile(self.ttft_quantiles[i], u) - lo)


def _quantile(grid: tuple[float, ...], u: float) -> float:
    pos = u * (len(grid) - 1)
    i = min(int(pos), len(grid) - 2)
    return grid[i] + (pos - i) * (grid[i + 1] - grid[i])


@dataclass
class SimResult:
    replicas: int
    rate: float
    ttft_p50: float
    ttft_p99: float
    throughput: float  # completed requests/s over the measured window
    utilization: float  # rate / (replicas * peak throughput)
    overloaded: bool  # the offered rate is at or past the deployment's peak


@dataclass
class Plan:
    rate: float
    ttft_p99_target: float
    replicas: int | None  # None: no count up to max_replicas meets the target
    rows: list[SimResult] = field(default_factory=list)
    reason: str = ""


@dataclass
class _Replica:
    attained: float = 0.0  # service each running request has received (in request units)
    clock: float = 0.0
    finish: list[tuple[float, int]] = field(default_factory=list)  # (attained at finish, id)
    queue: deque[int] = field(default_factory=deque)
    version: int = 0

    @property
    def outstanding(self) -> int:
        return len(self.finish) + len(self.queue)


def simulate(curve: ReplicaCurve, replicas: int, rate: float, *, num_requests: int = 20_000,
             seed: int = 0, warmup_fraction: float = 0.1, work: str = "fixed",
             shared: float | None = None) -> SimResult:
    """Simulate ``replicas`` replicas under Poisson arrivals at ``rate`` req/s.

    ``shared``: the replicas share one host that runs at most this many of them at full speed
    (e.g. 2 cores for one-thread replicas); with b replicas busy each runs at min(1, shared/b)
    of its profiled speed, TTFT included. None: every replica has its own hardware.
    """
    if replicas < 1 or not rate > 0 or num_requests < 10 or work not in _WORKS:
        raise ValueError(f"need replicas >= 1, rate > 0, num_requests >= 10 and work in {_WORKS}")
    if shared is not None and not shared > 0:
        raise ValueError(f"shared must be > 0 (got {shared})")
    peak = min(replicas, shared or replicas) * curve.peak_throughput
    utilization = rate / peak
    if utilization >= 1.0:
        return SimResult(replicas, rate, math.inf, math.inf, peak, utilization, True)
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, num_requests)).tolist()
    draws = rng.random(num_requests).tolist()
    works = (rng.exponential(1.0, num_requests) if work == "exponential"
             else np.ones(num_requests)).tolist()
    ttft, done = _run(curve, replicas, arrivals, draws, works, shared)
    first = int(num_requests * warmup_fraction)
    kept = np.asarray(ttft[first:])
    window = done[first:]
    span = max(window) - arrivals[first]
    return SimResult(replicas, rate, float(np.quantile(kept, 0.5)), float(np.quantile(kept, 0.99)),
                     len(window) / span if span > 0 else math.inf, utilization, False)


def _run(curve: ReplicaCurve, count: int, arrivals: list[float], draws: list[float],
         works: list[float], shared: float | None = None) -> tuple[list[float], list[float]]:
    """The event loop: returns each request's TTFT and completion time."""
    pool = [_Replica() for _ in range(count)]
    ttft = [0.0] * len(arrivals)
    done = [0.0] * len(arrivals)
    events: list[tuple[float, int, int]] = []  # (completion time, replica, version)
    upcoming, tie, busy, speed = 0, 0, 0, 1.0

    def advance(r: _Replica, now: float) -> None:
        n = len(r.finish)
        if n:
            r.attained += (now - r.clock) * speed * curve.rate(n) / n
        r.clock = now

    def admit(r: _Replica, job: int, now: float) -> None:
        heapq.heappush(r.finish, (r.attained + works[job], job))
        ttft[job] = now - arrivals[job] + curve.ttft(len(r.finish), draws[job]) / speed

    def schedule(index: int) -> None:
        r = pool[index]
        r.version += 1
        if r.finish:
            n = len(r.finish)
            due = r.clock + max(r.finish[0][0] - r.attained, 0.0) * n / (speed * curve.rate(n))
            heapq.heappush(events, (due, index, r.version))

    def set_busy(change: int, now: float) -> None:
        # The host's share per busy replica changed: every running replica's pace changes.
        nonlocal busy, speed
        busy += change
        new = min(1.0, shared / busy) if shared and busy else 1.0
        if new != speed:
            for other in pool:
                advance(other, now)
            speed = new
            for i in range(count):
                schedule(i)

    while upcoming < len(arrivals) or events:
        if events and (upcoming >= len(arrivals) or events[0][0] <= arrivals[upcoming]):
            now, index, version = heapq.heappop(events)
            r = pool[index]
            if version != r.version:
                continue  # superseded: the replica's running set changed since
            advance(r, now)
            _, job = heapq.heappop(r.finish)
            done[job] = now
            if r.queue:
                admit(r, r.queue.popleft(), now)
            elif not r.finish:
                set_busy(-1, now)
        else:
            now, job = arrivals[upcoming], upcoming
            upcoming += 1
            # least_outstanding; ties rotate so an idle deployment spreads requests evenly
            index = min(range(count), key=lambda i: (pool[i].outstanding, (i - tie) % count))
            tie = (index + 1) % count
            r = pool[index]
            advance(r, now)
            if not r.finish:
                set_busy(+1, now)
            if len(r.finish) < curve.max_batch:
                admit(r, job, now)
            else:
                r.queue.append(job)
        schedule(index)
    return ttft, done


def plan_replicas(curve: ReplicaCurve, rate: float, ttft_p99: float, *, max_replicas: int = 256,
                  num_requests: int = 20_000, seed: int = 0, work: str = "fixed",
                  extra_rows: int = 2, shared: float | None = None) -> Plan:
    """The smallest replica count whose simulated TTFT p99 is at most ``ttft_p99``."""
    if not rate > 0 or not ttft_p99 > 0 or max_replicas < 1:
        raise ValueError("need rate > 0, ttft_p99 > 0 and max_replicas >= 1")
    plan = Plan(rate, ttft_p99, None)
    floor = curve.ttft(1, 0.99)
    if floor > ttft_p99:
        plan.reason = (f"one request alone already has TTFT p99 {floor:.3g} s (the profile at "
                       f"concurrency {curve.concurrency[0]}): more replicas cannot help")
        return plan
    first = max(1, math.floor(rate / curve.peak_throughput))  # fewer cannot keep up
    for n in range(first, max_replicas + 1):
        row = simulate(curve, n, rate, num_requests=num_requests, seed=seed, work=work,
                       shared=shared)
        plan.rows.append(row)
        if row.ttft_p99 <= ttft_p99:
            plan.replicas = n
            break
    else:
        plan.reason = f"no count up to --max-replicas {max_replicas} meets the target"
        return plan
    for n in range(plan.replicas + 1, min(plan.replicas + extra_rows, max_replicas) + 1):
        plan.rows.append(simulate(curve, n, rate, num_requests=num_requests, seed=seed,
                                  work=work, shared=shared))
    return plan


def format_plan(curve: ReplicaCurve, plan: Plan) -> str:
    lines = [f"profile: concurrency {list(curve.concurrency)}, peak "
             f"{curve.peak_throughput:.3g} req/s per replica, max batch {curve.max_batch}",
             f"target: {plan.rate:g} req/s with TTFT p99 <= {plan.ttft_p99_target:g} s", ""]
    if plan.rows:
        lines.append(f"{'replicas':>8}  {'util':>6}  {'TTFT p50 s':>10}  {'TTFT p99 s':>10}  "
                     f"{'req/s':>8}")
        for row in plan.rows:
            mark = "  <- smallest" if row.replicas == plan.replicas else ""
            p50, p99 = (("overloaded", "") if row.overloaded
                        else (f"{row.ttft_p50:.4g}", f"{row.ttft_p99:.4g}"))
            lines.append(f"{row.replicas:>8}  {row.utilization:>6.1%}  {p50:>10}  {p99:>10}  "
                         f"{row.throughput:>8.3g}{mark}")
        lines.append("")
    lines.append(f"replicas needed: {plan.replicas}" if plan.replicas is not None
                 else f"no replica count meets the target: {plan.reason}")
    return "\n".join(lines)


def plan_as_dict(plan: Plan) -> dict[str, Any]:
    from dataclasses import asdict

    def clean(value: float) -> float | None:
        return value if math.isfinite(value) else None

    rows = [{k: clean(v) if isinstance(v, float) else v for k, v in asdict(r).items()}
            for r in plan.rows]
    return {"rate": plan.rate, "ttft_p99_target": plan.ttft_p99_target,
            "replicas": plan.replicas, "reason": plan.reason, "rows": rows}

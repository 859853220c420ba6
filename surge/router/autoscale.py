"""Autoscaling replicas on in-flight requests, with separate up and down delays.

The wanted replica count is ``ceil(in-flight requests / target per replica)``, clamped to
``[min_replicas, max_replicas]`` (the rule of Knative's and Ray Serve's autoscalers). A change
happens only when the load has asked for it without interruption for the whole delay:
scale up to the *smallest* count wanted during the last ``scale_up_delay`` seconds, when that
is above the current count; scale down to the *largest* count wanted during the last
``scale_down_delay`` seconds, when that is below. So a burst shorter than the up delay
starts nothing, and a lull shorter than the (longer) down delay stops nothing.

With ``min_replicas`` 0 the deployment scales to zero: no request for ``idle_timeout``
seconds (and none in flight) stops every replica at once; the next request is held by the
proxy's ``ColdStart`` (``coldstart.py``), which starts one.

``Autoscaler`` is pure (samples in, decision out, time passed in); ``AutoscaleLoop`` samples
the router's replicas on an interval and applies decisions to ``LocalReplicas``, which drains
a replica before stopping it. Every decision is logged, counted and kept for the status page.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

from surge.config import require
from surge.http.services import in_background
from surge.router.metrics import RouterMetrics
from surge.router.replicas import ReplicaSet

__all__ = ["AutoscaleConfig", "AutoscaleLoop", "Autoscaler", "Decision"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoscaleConfig:
    min_replicas: int = 1
    max_replicas: int = 1
    target_in_flight: float = 8.0  # per replica
    scale_up_delay: float = 5.0
    scale_down_delay: float = 30.0
    interval: float = 0.5  # seconds between samples
    # With min_replicas 0: no request for this long stops every replica (scale to zero);
    # the proxy's ColdStart (coldstart.py) starts one again when a request arrives.
    idle_timeout: float = 300.0

    def __post_init__(self) -> None:
        require(self.min_replicas >= 0, "min_replicas", self.min_replicas, "an integer >= 0")
        require(self.idle_timeout > 0, "idle_timeout", self.idle_timeout, "seconds > 0")
        require(self.max_replicas >= self.min_replicas, "max_replicas", self.max_replicas,
                f"an integer >= min_replicas ({self.min_replicas})")
        require(self.max_replicas >= 1, "max_replicas", self.max_replicas, "an integer >= 1")
        require(self.target_in_flight > 0, "target_inflight_per_replica",
                self.target_in_flight, "a number > 0")
        require(self.scale_up_delay >= 0, "scale_up_delay", self.scale_up_delay,
                "seconds >= 0")
        require(self.scale_down_delay >= 0, "scale_down_delay", self.scale_down_delay,
                "seconds >= 0")
        require(self.interval > 0, "interval", self.interval, "seconds > 0")

    @property
    def enabled(self) -> bool:
        return self.max_replicas > self.min_replicas


@dataclass(frozen=True)
class Decision:
    at: float
    current: int
    desired: int
    in_flight: float
    reason: str

    @property
    def direction(self) -> str:
        return "up" if self.desired > self.current else "down"


class Autoscaler:
    def __init__(self, config: AutoscaleConfig) -> None:
        self.config = config
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self.last_wanted = config.min_replicas

    def wanted(self, in_flight: float) -> int:
        """Replicas for this load; at least one while not idle (scale to zero is a rule of
        its own, on idle time)."""
        raw = math.ceil(in_flight / self.config.target_in_flight)
        return min(max(raw, self.config.min_replicas, 1), self.config.max_replicas)

    def observe(self, now: float, current: int, in_flight: float,
                idle_for: float = 0.0) -> Decision | None:
        """Record one sample; a decision when one is due (the caller applies it).
        ``idle_for``: seconds since the last request arrived."""
        if self.config.min_replicas == 0:
            if current == 0:  # scaled to zero: the next request wakes a replica, not us
                self._samples.clear()
                self.last_wanted = 0
                return None
            if in_flight == 0 and idle_for >= self.config.idle_timeout:
                self._samples.clear()
                self.last_wanted = 0
                return Decision(now, current, 0, 0.0, f"no request for {idle_for:.0f} s "
                                f"(idle timeout {self.config.idle_timeout:g} s)")
        wanted = self.last_wanted = self.wanted(in_flight)
        self._samples.append((now, wanted))
        horizon = now - max(self.config.scale_up_delay, self.config.scale_down_delay)
        # Keep the newest sample at or before the horizon: it shows the load was sampled
        # for the whole delay.
        while len(self._samples) > 1 and self._samples[1][0] <= horizon:
            self._samples.popleft()
        up = self._sustained(now, self.config.scale_up_delay, min)
        if up is not None and up > current:
            return self._decide(now, current, up, in_flight, self.config.scale_up_delay)
        down = self._sustained(now, self.config.scale_down_delay, max)
        if down is not None and down < current:
            return self._decide(now, current, down, in_flight, self.config.scale_down_delay)
        return None

    def _sustained(self, now: float, delay: float,
                   pick: Callable[[list[int]], int]) -> int | None:
        """``pick`` of the counts wanted over the last ``delay`` seconds; None until samples
        cover that long (the first sample must be at least ``delay`` old)."""
        if not self._samples or self._samples[0][0] > now - delay:
            return None
        return pick([wanted for at, wanted in self._samples if at >= now - delay])

    def _decide(self, now: float, current: int, desired: int, in_flight: float,
                delay: float) -> Decision:
        self._samples.clear()  # the next change needs its own full delay
        per_replica = in_flight / max(current, 1)
        reason = (f"{in_flight:g} requests in flight ({per_replica:.1f} per replica, target "
                  f"{self.config.target_in_flight:g}) for {delay:g} s")
        return Decision(now, current, desired, in_flight, reason)


class Scalable(Protocol):
    """What the loop drives: a replica backend."""

    @property
    def count(self) -> int: ...

    def scale_to(self, target: int) -> None: ...


class AutoscaleLoop:
    """Samples the router's load every ``interval`` and applies the autoscaler's decisions."""

    def __init__(self, autoscaler: Autoscaler, replicas: ReplicaSet, target: Scalable,
                 metrics: RouterMetrics, clock: Callable[[], float] = time.monotonic,
                 idle_for: Callable[[], float] = lambda: 0.0) -> None:
        self.autoscaler = autoscaler
        self.idle_for = idle_for  # seconds since the last request (the proxy's ColdStart)
        self.replicas = replicas
        self.target = target
        self.metrics = metrics
        self.clock = clock
        self.decisions: collections.deque[Decision] = collections.deque(maxlen=50)
        metrics.desired_replicas = lambda: self.autoscaler.last_wanted

    def step(self) -> Decision | None:
        decision = self.autoscaler.observe(self.clock(), self.target.count,
                                           self.replicas.total_in_flight(), self.idle_for())
        if decision is not None:
            logger.warning("autoscaler: %d -> %d replicas: %s", decision.current,
                           decision.desired, decision.reason)
            self.metrics.scaling_events.labels(decision.direction).inc()
            self.decisions.append(decision)
            self.target.scale_to(decision.desired)
        return decision

    def status(self) -> dict[str, object]:
        return {**asdict(self.autoscaler.config), "wanted_now": self.autoscaler.last_wanted,
                "decisions": [{**asdict(d), "direction": d.direction} for d in self.decisions]}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.autoscaler.config.interval)  # the sampling period
            self.step()

    def running(self) -> contextlib.AbstractAsyncContextManager[object]:
        return in_background(self.run(), "surge-router-autoscaler")

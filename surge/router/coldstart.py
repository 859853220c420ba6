"""Scale from zero: requests that arrive while no replica can take them are held, not refused.

With ``--min-replicas 0`` an idle deployment stops its replicas (the autoscaler's idle rule).
The next request finds none: ``ColdStart.hold`` asks the backend for one replica and holds
the request until a replica is routable, then the proxy forwards it as usual. The hold is
bounded twice: at most ``max_held`` requests wait (the next gets a 503 at once), and each
waits at most ``hold_timeout`` seconds (then a 503). Both 503s carry ``Retry-After`` and say
why; a held request is never dropped silently.

The cold start (from the wake-up to the first routable replica) is logged and exported as
``surge:router_cold_start_seconds``. A warm standby (``--standby-replicas 1``) is a replica
kept loaded while the deployment is at zero: waking promotes it at once, so the cold start is
the promotion, not a model load.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from surge.config import require
from surge.http.errors import APIError
from surge.router.autoscale import Scalable
from surge.router.metrics import RouterMetrics
from surge.router.replicas import ReplicaSet

__all__ = ["ColdStart", "ScaleToZeroConfig"]

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.02  # how often a held request looks for a routable replica


@dataclass(frozen=True)
class ScaleToZeroConfig:
    hold_timeout: float = 60.0
    max_held: int = 1000

    def __post_init__(self) -> None:
        require(self.hold_timeout > 0, "hold_timeout", self.hold_timeout, "seconds > 0")
        require(self.max_held >= 1, "max_held_requests", self.max_held, "an integer >= 1")


class ColdStart:
    """The proxy's hold queue, and the clock of the last request (the autoscaler's idle
    time)."""

    def __init__(self, config: ScaleToZeroConfig, replicas: ReplicaSet, backend: Scalable,
                 metrics: RouterMetrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.replicas = replicas
        self.backend = backend
        self.metrics = metrics
        self.clock = clock
        self.last_request = clock()
        self.held = 0
        self.cold_starts = 0
        self.last_cold_start: float | None = None  # seconds
        self._woken_at: float | None = None
        metrics.held_requests = lambda: self.held

    def touch(self) -> None:
        """A request arrived."""
        self.last_request = self.clock()

    def idle_for(self) -> float:
        return 0.0 if self.held else self.clock() - self.last_request

    async def hold(self) -> APIError | None:
        """Wait until a replica is routable, waking one if none runs: None once one is, or
        the 503 to answer (hold queue full, or no replica within the hold timeout)."""
        if self.held >= self.config.max_held:
            self.metrics.no_replica.labels("hold_queue_full").inc()
            return APIError(503, f"{self.held} requests already wait for a replica to start "
                            f"(--max-held-requests {self.config.max_held}): retry later",
                            code="replica_starting", headers={"Retry-After": self._retry_after()})
        self.held += 1
        try:
            self._wake()
            deadline = self.clock() + self.config.hold_timeout
            while not self.replicas.num_routable(self.clock()):
                if self.clock() >= deadline:
                    return self._timed_out()
                await asyncio.sleep(POLL_SECONDS)  # replicas have no "became ready" event
            self._measure()
            return None
        finally:
            self.held -= 1

    def _wake(self) -> None:
        if self.backend.count > 0:
            return  # starting already (or unhealthy now): wait for it
        logger.warning("a request arrived with no replica running: starting one "
                       "(scale from zero)")
        self.metrics.scaling_events.labels("up").inc()
        self._woken_at = self.clock()
        self.backend.scale_to(1)

    def _measure(self) -> None:
        if self._woken_at is None:
            return
        seconds = self.clock() - self._woken_at
        self._woken_at = None
        self.cold_starts += 1
        self.last_cold_start = seconds
        self.metrics.cold_start.observe(seconds)
        logger.warning("cold start: the first replica took %.2f s to be ready", seconds)

    def _timed_out(self) -> APIError:
        self.metrics.no_replica.labels("hold_timeout").inc()
        problem = f"; {self.replicas.problem}" if self.replicas.problem else ""
        return APIError(503, f"no replica was ready within the hold timeout "
                        f"({self.config.hold_timeout:g} s): one is starting{problem}",
                        code="replica_starting", headers={"Retry-After": self._retry_after()})

    def _retry_after(self) -> str:
        """The last cold start's length, rounded up (at least 1 s)."""
        return str(max(1, math.ceil(self.last_cold_start or 1.0)))

    def status(self) -> dict[str, object]:
        return {"hold_timeout_s": self.config.hold_timeout, "max_held": self.config.max_held,
                "held_now": self.held, "idle_s": round(self.idle_for(), 1),
                "cold_starts": self.cold_starts,
                "last_cold_start_s": None if self.last_cold_start is None
                else round(self.last_cold_start, 3)}

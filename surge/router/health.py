"""Active health checks: every replica's health path, polled on an interval.

A replica is marked unhealthy after ``fail_threshold`` failed checks in a row (a non-2xx answer,
a timeout, a refused connection) and healthy again after ``success_threshold`` good ones in a
row, so one slow answer does not flap it. A Surge replica that is draining answers 503 here,
so it stops getting work at the next check, before its own refusals would cost retries. The
passive half (ejection after failed requests) lives in ``replicas.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from dataclasses import dataclass

import aiohttp

from surge.config import require
from surge.http.services import in_background
from surge.router.replicas import Replica, ReplicaSet

__all__ = ["HealthChecker", "HealthConfig", "HealthTracker"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealthConfig:
    path: str | None = "/health"  # None: no active checks (servers without a health route)
    interval: float = 1.0
    timeout: float = 2.0
    fail_threshold: int = 2
    success_threshold: int = 2

    def __post_init__(self) -> None:
        require(self.path is None or self.path.startswith("/"), "health_path", self.path,
                "a path starting with '/', or 'none' to turn active checks off")
        for name, value in [("interval", self.interval), ("timeout", self.timeout)]:
            require(value > 0, f"health_{name}", value, "seconds > 0")
        for name, count in [("fail_threshold", self.fail_threshold),
                            ("success_threshold", self.success_threshold)]:
            require(count >= 1, f"health_{name}", count, "an integer >= 1")


class HealthTracker:
    """The thresholds applied to one replica's check results (pure: no I/O)."""

    def __init__(self, config: HealthConfig) -> None:
        self.config = config
        # replica -> (last result, how many in a row)
        self._streaks: weakref.WeakKeyDictionary[Replica, tuple[bool, int]] = \
            weakref.WeakKeyDictionary()

    def record(self, replica: Replica, ok: bool) -> bool:
        """Apply one check result; returns True when it changed ``replica.healthy``."""
        last, count = self._streaks.get(replica, (ok, 0))
        count = count + 1 if last == ok else 1
        self._streaks[replica] = (ok, count)
        threshold = self.config.success_threshold if ok else self.config.fail_threshold
        if replica.healthy != ok and count >= threshold:
            replica.healthy = ok
            logger.warning("replica %s is %s after %d check(s) in a row", replica.name,
                           "healthy again" if ok else "unhealthy", count)
            return True
        return False


class HealthChecker:
    """Polls every replica of the set concurrently, each interval, until stopped."""

    def __init__(self, replicas: ReplicaSet, config: HealthConfig,
                 session: aiohttp.ClientSession) -> None:
        self.replicas = replicas
        self.config = config
        self.tracker = HealthTracker(config)
        self.session = session

    async def check(self, replica: Replica) -> bool:
        assert self.config.path is not None
        try:
            async with self.session.get(
                    replica.url + self.config.path,
                    timeout=aiohttp.ClientTimeout(total=self.config.timeout)) as response:
                await response.read()
                return 200 <= response.status < 300
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def check_all(self) -> None:
        # Starting replicas are watched by their backend; draining ones get no work anyway.
        replicas = [r for r in self.replicas if not r.starting and not r.draining]
        results = await asyncio.gather(*(self.check(r) for r in replicas))
        for replica, ok in zip(replicas, results, strict=True):
            self.tracker.record(replica, ok)

    async def run(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.config.interval)  # the polling period itself

    def running(self) -> contextlib.AbstractAsyncContextManager[object]:
        if self.config.path is None:
            return contextlib.nullcontext()
        return in_background(self.run(), "surge-router-health")

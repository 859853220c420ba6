"""When the proxy may try another replica: bounded attempts, a retry budget, and backoff.

Retries multiply load exactly when replicas are struggling, so they are rationed (as Finagle
and Envoy do): over a sliding window, retries may be at most ``ratio`` of the requests plus a
small floor per second (so a quiet router can still fail over). Past the budget, the failure
goes back to the client. Each retry waits a random time up to an exponentially growing cap
("full jitter"), so clients that failed together do not retry together.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from surge.config import require

__all__ = ["RetryBudget", "RetryConfig", "backoff_seconds"]


@dataclass(frozen=True)
class RetryConfig:
    max_attempts: int = 3  # per request, the first one included
    budget_ratio: float = 0.2
    budget_floor_per_second: float = 2.0
    budget_window: float = 10.0
    backoff_base: float = 0.01
    backoff_cap: float = 0.25
    retry_429: bool = True  # a replica's 429: try another replica (True) or return it

    def __post_init__(self) -> None:
        require(self.max_attempts >= 1, "max_attempts", self.max_attempts,
                "an integer >= 1 (1: never retry)")
        require(0 <= self.budget_ratio <= 1, "retry_budget", self.budget_ratio,
                "a fraction of requests in [0, 1]")


class RetryBudget:
    """Counts requests and retries in one-second buckets over ``window`` seconds."""

    def __init__(self, config: RetryConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._buckets: dict[int, list[int]] = {}  # second -> [requests, retries]
        self.num_refused = 0

    def record_request(self) -> None:
        self._bucket()[0] += 1

    def try_spend(self) -> bool:
        """Take one retry from the budget; False (and counted) when it is spent."""
        requests, retries = self._totals()
        allowed = (self.config.budget_ratio * requests
                   + self.config.budget_floor_per_second * self.config.budget_window)
        if retries + 1 > allowed:
            self.num_refused += 1
            return False
        self._bucket()[1] += 1
        return True

    def _bucket(self) -> list[int]:
        second = int(self.clock())
        bucket = self._buckets.get(second)
        if bucket is None:
            bucket = self._buckets[second] = [0, 0]
            oldest = second - int(self.config.budget_window)
            for stale in [s for s in self._buckets if s <= oldest]:
                del self._buckets[stale]
        return bucket

    def _totals(self) -> tuple[int, int]:
        oldest = int(self.clock()) - int(self.config.budget_window)
        requests = retries = 0
        for second, (req, ret) in self._buckets.items():
            if second > oldest:
                requests += req
                retries += ret
        return requests, retries


def backoff_seconds(retry: int, config: RetryConfig, rng: random.Random | None = None) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**retry)] for the retry-th retry (0-based)."""
    ceiling = min(config.backoff_cap, config.backoff_base * 2 ** retry)
    return (rng or random).uniform(0.0, ceiling)

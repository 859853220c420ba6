"""What the router knows about each replica, and the one rule for whether it may get work.

A replica is routable when the active health check last said yes, it is not draining, its
circuit breaker lets a request through, and it is below the per-replica in-flight cap. The
breaker is the passive half of health checking: ``eject_after`` consecutive failures (5xx or
connection errors) open it for ``eject_seconds`` (doubling on each ejection in a row, up to
``max_eject_seconds``); then it is half-open and lets exactly one trial request through. The
trial's success closes it (the replica is re-admitted); its failure opens it again for longer.
So a replica that died costs a few failed attempts (which the proxy retries elsewhere), not a
stream of them, and one that recovers is back after one good answer.

Everything here is plain state changed by the proxy and the health checker on the event loop
thread; times are passed in, so the rules are tested with a fake clock.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from surge.config import require

__all__ = ["Breaker", "BreakerConfig", "Replica", "ReplicaSet"]

logger = logging.getLogger(__name__)

# Weight of the newest sample in the latency average: about the last 5 requests count.
EWMA_ALPHA = 0.3


class Breaker(enum.Enum):
    CLOSED = "closed"  # normal: every request may go
    OPEN = "open"  # ejected: no request until the ejection time is over
    HALF_OPEN = "half_open"  # one trial request may go; its outcome decides


@dataclass(frozen=True)
class BreakerConfig:
    """Passive ejection: validated defaults, as `surge route` and `surge serve` expose them."""

    eject_after: int = 3
    eject_seconds: float = 5.0
    max_eject_seconds: float = 60.0
    max_in_flight: int | None = None  # per replica; None: no cap

    def __post_init__(self) -> None:
        require(self.eject_after >= 1, "eject_after", self.eject_after, "an integer >= 1")
        require(self.eject_seconds > 0, "eject_seconds", self.eject_seconds, "seconds > 0")
        require(self.max_eject_seconds >= self.eject_seconds, "max_eject_seconds",
                self.max_eject_seconds, f"seconds >= eject_seconds ({self.eject_seconds})")
        require(self.max_in_flight is None or self.max_in_flight >= 1, "max_in_flight",
                self.max_in_flight, "an integer >= 1 or None")


@dataclass(eq=False)
class Replica:
    """One upstream server. ``name`` labels its metrics; ``url`` has no trailing slash."""

    url: str
    name: str
    weight: float = 1.0
    breaker_config: BreakerConfig = field(default_factory=BreakerConfig)
    healthy: bool = True  # the active health check's verdict
    # Started by a replica backend and not yet ready: the backend watches it (not the active
    # health check) and sets ``healthy`` when it answers.
    starting: bool = False
    draining: bool = False
    standby: bool = False  # started and ready, held back until a replica must be replaced
    tier: str | None = None  # "full" or "fast" when the router routes by tier (tiers.py)
    # Live load and its history.
    in_flight: int = 0
    ewma_latency: float = 0.0  # seconds; 0 until the first answer (so new replicas get tried)
    num_requests: int = 0
    num_failures: int = 0
    num_ejections: int = 0
    num_retries: int = 0  # attempts on this replica that were retried elsewhere
    errors: dict[str, int] = field(default_factory=dict)  # by kind: connect, status_5xx, ...
    # The breaker.
    breaker: Breaker = Breaker.CLOSED
    consecutive_failures: int = 0
    open_until: float = 0.0
    ejections_in_a_row: int = 0
    trial_in_flight: bool = False
    # Set by the replica backend that manages its lifetime: extra facts for status (a pid).
    info: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        require(self.weight > 0, "weight", self.weight, "a number > 0")
        parts = urlsplit(self.url)
        require(parts.scheme in ("http", "https") and bool(parts.hostname), "url", self.url,
                "an http:// or https:// base URL")
        # Where the proxy connects, and the Host header it sends.
        self.host: str = parts.hostname or ""
        self.tls = parts.scheme == "https"
        self.port: int = parts.port or (443 if self.tls else 80)
        self.host_header = parts.netloc.encode("latin-1", "replace")

    # -- may it get work? --------------------------------------------------------------------

    def is_routable(self, now: float) -> bool:
        if not self.healthy or self.draining or self.standby:
            return False
        cap = self.breaker_config.max_in_flight
        if cap is not None and self.in_flight >= cap:
            return False
        if self.breaker is Breaker.CLOSED:
            return True
        if self.breaker is Breaker.OPEN:
            return now >= self.open_until
        return not self.trial_in_flight

    @property
    def state(self) -> str:
        """One word for status pages and metrics."""
        if self.draining:
            return "draining"
        if self.standby:
            return "standby"
        if not self.healthy:
            return "unhealthy"
        return "healthy" if self.breaker is Breaker.CLOSED else f"ejected_{self.breaker.value}"

    # -- a request's life on this replica ----------------------------------------------------

    def begin(self) -> None:
        self.in_flight += 1
        self.num_requests += 1
        if self.breaker is not Breaker.CLOSED:
            # The ejection time is over: this request is the trial.
            self.breaker = Breaker.HALF_OPEN
            self.trial_in_flight = True

    def succeeded(self, latency: float) -> None:
        """The replica answered (any status that is not its fault, 4xx and 429 included)."""
        self.in_flight -= 1
        self.ewma_latency = (latency if self.ewma_latency == 0.0 else
                             EWMA_ALPHA * latency + (1 - EWMA_ALPHA) * self.ewma_latency)
        self.consecutive_failures = 0
        if self.breaker is not Breaker.CLOSED:
            logger.info("replica %s answered its trial request: re-admitted", self.name)
            self.breaker = Breaker.CLOSED
            self.ejections_in_a_row = 0
        self.trial_in_flight = False

    def failed(self, kind: str, now: float) -> None:
        """A 5xx or a connection error: counts toward ejection."""
        self.in_flight -= 1
        self.num_failures += 1
        self.errors[kind] = self.errors.get(kind, 0) + 1
        self.consecutive_failures += 1
        self.trial_in_flight = False
        if self.breaker is not Breaker.CLOSED or \
                self.consecutive_failures >= self.breaker_config.eject_after:
            self._eject(now)

    def abandoned(self) -> None:
        """The client left first: says nothing about the replica's health."""
        self.in_flight -= 1
        self.trial_in_flight = False

    def _eject(self, now: float) -> None:
        config = self.breaker_config
        seconds = min(config.eject_seconds * 2 ** self.ejections_in_a_row,
                      config.max_eject_seconds)
        self.breaker = Breaker.OPEN
        self.open_until = now + seconds
        self.ejections_in_a_row += 1
        self.num_ejections += 1
        logger.warning("replica %s ejected for %.1f s after %d consecutive failures", self.name,
                       seconds, self.consecutive_failures)

    def status(self, now: float) -> dict[str, object]:
        return {
            "name": self.name, "url": self.url, "state": self.state, "weight": self.weight,
            "healthy": self.healthy, "starting": self.starting, "draining": self.draining,
            "standby": self.standby, "tier": self.tier,
            "breaker": self.breaker.value,
            "ejected_for_s": round(max(self.open_until - now, 0.0), 3)
            if self.breaker is Breaker.OPEN else 0.0,
            "in_flight": self.in_flight, "ewma_latency_s": round(self.ewma_latency, 6),
            "requests": self.num_requests, "failures": self.num_failures,
            "errors": dict(self.errors), "ejections": self.num_ejections,
            "retries": self.num_retries, **self.info,
        }


class ReplicaSet:
    """The replicas the router may use, in the order they joined. ``version`` changes whenever
    the membership does, so policies can rebuild what they derive from it."""

    def __init__(self, replicas: list[Replica] | None = None) -> None:
        self._replicas: list[Replica] = []
        self.version = 0
        # Why replicas may be missing, set by the replica backend (a replica it cannot place);
        # the router's 503s say it while no replica can take a request.
        self.problem: str | None = None
        for replica in replicas or []:
            self.add(replica)

    def __iter__(self) -> Iterator[Replica]:
        return iter(self._replicas)

    def __len__(self) -> int:
        return len(self._replicas)

    def add(self, replica: Replica) -> None:
        if any(r.name == replica.name for r in self._replicas):
            raise ValueError(f"replica name {replica.name!r} is taken: allowed is a new name")
        self._replicas.append(replica)
        self.version += 1

    def remove(self, replica: Replica) -> None:
        if replica in self._replicas:
            self._replicas.remove(replica)
            self.version += 1

    def routable(self, now: float, exclude: tuple[Replica, ...] = ()) -> list[Replica]:
        return [r for r in self._replicas if r.is_routable(now) and r not in exclude]

    def num_routable(self, now: float) -> int:
        return sum(1 for r in self._replicas if r.is_routable(now))

    def total_in_flight(self) -> int:
        return sum(r.in_flight for r in self._replicas)

"""Tiered replicas: critical requests to the full-precision tier, the rest to the fast one.

Replicas may carry a tier (``Replica.tier``: ``full`` for the unquantized model, ``fast`` for
an int8/int4 one). With tiers on, the proxy narrows each request's candidates to its tier
before the policy picks among them: a request is *critical* when it says so in the
``X-Surge-Priority: critical`` header, or, with ``critical_below`` set, when its body's
``priority`` (vLLM's: lower is more urgent) is below that number. Critical requests want
``full``, the rest ``fast``. A tier that has no replica able to take the request now (none,
all unhealthy, or all at ``--max-inflight-per-replica``) spills the request over to the other
tier, so a saturated or empty tier costs latency or precision, never an error. Requests per
tier (wanted and served) are counted for ``/metrics`` and the status page.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import msgspec
from prometheus_client import CollectorRegistry, Counter

from surge.config import require
from surge.router.backend import BackendHost, ReplicaBackend
from surge.router.replicas import Replica

__all__ = ["TIERS", "TierRouting", "TieredReplicas", "TiersConfig"]

TIERS = ("full", "fast")
CRITICAL_HEADER = b"x-surge-priority"
_decode = msgspec.json.decode


@dataclass(frozen=True)
class TiersConfig:
    critical_below: int | None = None  # body priority below this is critical

    def __post_init__(self) -> None:
        require(self.critical_below is None or isinstance(self.critical_below, int),
                "critical_priority_below", self.critical_below, "an integer")


class TierRouting:
    def __init__(self, config: TiersConfig, registry: CollectorRegistry) -> None:
        self.config = config
        self.requests = Counter(
            "surge:router_tier_requests", "Requests answered, by the tier they wanted (critical: "
            "full) and the tier that served them (another one when theirs was saturated)",
            ["wanted", "served"], registry=registry)
        self.counts: dict[tuple[str, str], int] = {}
        for wanted in TIERS:
            for served in TIERS:
                self.requests.labels(wanted, served)

    def wanted(self, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> str:
        """The tier a request asks for."""
        for name, value in headers:
            if name.lower() == CRITICAL_HEADER:
                return "full" if value.strip().lower() == b"critical" else "fast"
        if self.config.critical_below is not None and body:
            try:
                payload = _decode(body)
            except msgspec.DecodeError:
                return "fast"
            priority = payload.get("priority") if isinstance(payload, dict) else None
            if isinstance(priority, int) and priority < self.config.critical_below:
                return "full"
        return "fast"

    def narrow(self, candidates: list[Replica], wanted: str) -> list[Replica]:
        """The candidates of the wanted tier, or of the other one when it has none (spill
        over). Replicas without a tier belong to every tier."""
        preferred = [r for r in candidates if r.tier in (wanted, None)]
        return preferred or candidates

    def served(self, wanted: str, replica: Replica) -> None:
        served = replica.tier or wanted
        self.requests.labels(wanted, served).inc()
        self.counts[(wanted, served)] = self.counts.get((wanted, served), 0) + 1

    def status(self) -> dict[str, object]:
        return {"critical_priority_below": self.config.critical_below,
                "requests": [{"wanted": w, "served": s, "count": n}
                             for (w, s), n in sorted(self.counts.items())]}


class TieredReplicas:
    """A replica backend of one group per tier (``surge serve --replicas N --fast-replicas
    M``: N full-precision replicas and M quantized ones), each group a backend of its own
    whose replicas carry its tier. The groups keep their sizes: autoscaling is per group,
    which this composite does not do (the composer refuses the combination)."""

    def __init__(self, groups: dict[str, tuple[ReplicaBackend, int]]) -> None:
        self.groups = groups  # tier -> (backend, replicas)

    @contextlib.asynccontextmanager
    async def running(self, host: BackendHost, initial: int) -> AsyncIterator[TieredReplicas]:
        async with contextlib.AsyncExitStack() as stack:
            for backend, count in self.groups.values():
                await stack.enter_async_context(backend.running(host, count))
            yield self

    @property
    def count(self) -> int:
        return sum(backend.count for backend, _ in self.groups.values())

    def scale_to(self, target: int) -> None:
        raise NotImplementedError("tiered replica groups keep their sizes")

    def status(self) -> list[dict[str, object]]:
        return [{**entry, "tier": tier} for tier, (backend, _) in self.groups.items()
                for entry in backend.status()]

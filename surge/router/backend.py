"""The seam between the router and whatever runs its replicas.

The router routes; a *replica backend* starts, stops and lists the replicas it routes to. The
router never knows what a replica is (a local ``surge serve`` process, a Ray actor, a pod): it
sees only the ``Replica`` entries the backend puts in its ``ReplicaSet``, and it tells the
backend how many replicas to keep (the autoscaler's ``scale_to``). So a new backend is a new
class implementing ``ReplicaBackend``, handed to ``build_router`` in a ``ReplicaPlan``; the
router's code does not change.

The contract, which the router relies on (the full text: the module docstring of
``supervisor.py`` and the project notes):

- ``running(host, initial)`` is entered when the router starts and left, after in-flight
  requests were let finish, when it stops. On entry it begins starting ``initial`` replicas
  and returns at once (the router listens while they start); on exit every replica has been
  drained and stopped.
- A replica it starts joins ``host.replicas`` at once with ``starting=True, healthy=False`` (so
  it gets no work and the active health check leaves it alone), and ``starting=False,
  healthy=True`` once it answers; from then on the router's health checks and circuit breaker
  judge it. A replica that is gone leaves the set (and ``host.metrics.forget(replica)``).
- Retiring a replica (scale-down, shutdown) drains it first: ``replica.draining = True``, wait
  until its ``in_flight`` is 0 (bounded), then stop it.
- ``count`` is the number of replicas that count toward the target (serving or starting; not
  standby or retiring); ``scale_to(n)`` moves toward ``n`` in the background and returns at
  once.
- ``status()`` lists what the backend runs, one JSON-ready dict per replica (with ``name``);
  the router shows it under ``"processes"`` in ``GET /router/replicas``.
- A backend that can never bring a replica up calls ``host.request_exit(1)`` rather than
  retrying forever.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from surge.config import require
from surge.router.autoscale import AutoscaleConfig
from surge.router.coldstart import ScaleToZeroConfig
from surge.router.metrics import RouterMetrics
from surge.router.replicas import ReplicaSet

__all__ = ["BackendHost", "ReplicaBackend", "ReplicaPlan"]


@dataclass(frozen=True)
class BackendHost:
    """What the router lends its backend while it runs."""

    replicas: ReplicaSet  # where started replicas join, and whence gone ones leave
    metrics: RouterMetrics  # counts replacements; forgets a removed replica's series
    request_exit: Callable[[int], None]  # stop the router with this exit status


class ReplicaBackend(Protocol):
    """Starts, stops and lists the replicas behind a router (see the module docstring)."""

    def running(self, host: BackendHost,
                initial: int) -> contextlib.AbstractAsyncContextManager[Any]: ...

    @property
    def count(self) -> int: ...

    def scale_to(self, target: int) -> None: ...

    def status(self) -> list[dict[str, object]]: ...


@dataclass(frozen=True)
class ReplicaPlan:
    """A router whose replicas a backend runs: how many at start, and the autoscaler's bounds
    (autoscaling is on when they allow more than one count)."""

    backend: ReplicaBackend
    initial: int
    autoscale: AutoscaleConfig | None = None
    # Scale to zero (autoscale.min_replicas 0): how requests are held while a replica starts.
    scale_to_zero: ScaleToZeroConfig | None = None

    def __post_init__(self) -> None:
        require(self.initial >= 0, "initial", self.initial, "an integer >= 0")
        require((self.scale_to_zero is not None) == (self.autoscale is not None and
                                                      self.autoscale.min_replicas == 0),
                "scale_to_zero", self.scale_to_zero, "set exactly when min_replicas is 0")

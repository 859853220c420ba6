"""The replica-backend seam: a backend that is not local processes (in-process fake replicas,
standing in for a Ray cluster) plugs into the router unchanged: its replicas get the traffic
once ready, it is listed on the status page, the autoscaler drives it, it can stop the router,
and its replicas stop with the router."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from surge.router.app import RouterSettings, build_router
from surge.router.autoscale import AutoscaleConfig
from surge.router.backend import BackendHost, ReplicaPlan
from surge.router.health import HealthConfig
from surge.router.policies import make_policy
from surge.router.replicas import Replica, ReplicaSet
from tests.router._helpers import FakeReplica, RouterThread, json_handler

WAIT = 10.0


class InProcessBackend:
    """Replicas are FakeReplica servers in this process; follows the backend contract of
    surge/router/backend.py (join as starting, ready once up, drain before stop)."""

    def __init__(self) -> None:
        self.host: BackendHost | None = None
        self.running_replicas: dict[str, tuple[FakeReplica, Replica]] = {}
        self.stopped: list[str] = []
        self._next = 1
        self._retiring: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def running(self, host: BackendHost, initial: int) -> AsyncIterator[None]:
        self.host = host
        self.scale_to(initial)
        try:
            yield
        finally:
            for name in list(self.running_replicas):
                await self._retire(*self.running_replicas.pop(name))
            await asyncio.gather(*self._retiring)

    @property
    def count(self) -> int:
        return len(self.running_replicas)

    def scale_to(self, target: int) -> None:
        while self.count < target:
            self._start()
        for name in list(self.running_replicas)[target:]:
            task = asyncio.ensure_future(self._retire(*self.running_replicas.pop(name)))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    def status(self) -> list[dict[str, object]]:
        return [{"name": name, "url": fake.url}
                for name, (fake, _) in self.running_replicas.items()]

    def _start(self) -> None:
        assert self.host is not None
        name = f"fake-{self._next}"
        self._next += 1
        fake = FakeReplica(json_handler({"served_by": name})).start()
        replica = Replica(fake.url, name, healthy=False, starting=True)
        self.host.replicas.add(replica)  # joins at once, gets no work while starting
        replica.starting, replica.healthy = False, True  # a fake is ready once it listens
        self.running_replicas[name] = (fake, replica)

    async def _retire(self, fake: FakeReplica, replica: Replica) -> None:
        assert self.host is not None
        replica.draining = True
        while replica.in_flight:
            await asyncio.sleep(0.01)  # polling the router's count, as the contract says
        self.host.replicas.remove(replica)
        self.host.metrics.forget(replica)
        fake.stop()
        self.stopped.append(replica.name)


def _router(backend: InProcessBackend, initial: int,
            autoscale: AutoscaleConfig | None = None) -> RouterThread:
    settings = RouterSettings(health=HealthConfig(path=None))
    return RouterThread(build_router(ReplicaSet(), make_policy("round_robin"), settings,
                                     plan=ReplicaPlan(backend, initial, autoscale)))


def _wait_until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)  # polling interval


@pytest.mark.timeout(30)
def test_a_backend_s_replicas_serve_are_listed_and_stop_with_the_router() -> None:
    backend = InProcessBackend()
    with _router(backend, 2) as router:
        _wait_until(lambda: router.status()["processes"] != [] and
                    httpx.get(f"{router.url}/health").status_code == 200, "the replicas")
        with router.client() as client:
            served = {client.post("/v1/completions", json={}).json()["served_by"]
                      for _ in range(4)}
        listed = {p["name"] for p in router.status()["processes"]}
    assert served == listed == {"fake-1", "fake-2"}
    assert sorted(backend.stopped) == ["fake-1", "fake-2"]


@pytest.mark.timeout(30)
def test_the_autoscaler_drives_any_backend() -> None:
    backend = InProcessBackend()
    autoscale = AutoscaleConfig(min_replicas=1, max_replicas=3, target_in_flight=4.0,
                                scale_up_delay=0.1, scale_down_delay=0.2, interval=0.05)
    with _router(backend, 3, autoscale) as router:
        # No load wants the minimum: two of the three are drained and stopped.
        _wait_until(lambda: len(router.status()["replicas"]) == 1, "the scale-down")
        decisions = router.status()["autoscaler"]["decisions"]
    assert [(d["current"], d["desired"]) for d in decisions] == [(3, 1)]
    assert sorted(backend.stopped) == ["fake-1", "fake-2", "fake-3"]


@pytest.mark.timeout(30)
def test_a_backend_can_stop_the_router_with_a_status() -> None:
    backend = InProcessBackend()
    with _router(backend, 1) as router:
        exits: list[int] = []
        router.app.request_exit = exits.append  # what run_router wires to uvicorn
        _wait_until(lambda: backend.host is not None, "the backend to start")
        assert backend.host is not None
        backend.host.request_exit(1)
    assert exits == [1]

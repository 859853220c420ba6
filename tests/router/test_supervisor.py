"""ManagedReplicas over a launcher that is not local processes (in-process fake servers, as a
Ray launcher would hand back actors): the supervision is the launcher's for free. A replica
joins as starting and serves once its /health answers, one that dies is replaced, retiring
drains first, and replicas that never start stop the router instead of restarting forever."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from surge.router.backend import BackendHost
from surge.router.metrics import RouterMetrics
from surge.router.replicas import ReplicaSet
from surge.router.supervisor import LaunchError, ManagedReplicas, SupervisorConfig
from tests.router._helpers import FakeReplica, json_handler

WAIT = 10.0


class FakeLaunched:
    """A LaunchedReplica: a FakeReplica server, 'exited' when stopped or killed."""

    def __init__(self, fake: FakeReplica | None) -> None:
        self.fake = fake
        self.url = fake.url if fake else "http://127.0.0.1:9"  # nothing listens on 9
        self.pid: int | None = None
        self.exited = asyncio.Event()
        self.how = "exit code 0"

    async def wait(self) -> str:
        await self.exited.wait()
        return self.how

    async def stop(self, timeout: float) -> None:
        self.end("stopped")

    def kill(self) -> None:
        self.end("killed")

    def last_output(self) -> str:
        return "fake replica: no such model\n"

    def end(self, how: str) -> None:
        if not self.exited.is_set():
            self.how = how
            if self.fake is not None:
                self.fake.stop()
            self.exited.set()


class FakeLauncher:
    """Starts FakeReplica servers; ``broken`` ones exit at once, as a bad model would."""

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.launched: list[FakeLaunched] = []
        self.closed = False

    async def launch(self, name: str) -> FakeLaunched:
        if self.broken:
            launched = FakeLaunched(None)
            launched.end("exit code 3")
        else:
            launched = FakeLaunched(FakeReplica(json_handler()).start())
        self.launched.append(launched)
        return launched

    async def aclose(self) -> None:
        self.closed = True


class Host:
    def __init__(self) -> None:
        self.replicas = ReplicaSet()
        self.metrics = RouterMetrics(self.replicas)
        self.exits: list[int] = []
        self.host = BackendHost(self.replicas, self.metrics, self.exits.append)

    def states(self) -> dict[str, str]:
        return {r.name: "starting" if r.starting else r.state for r in self.replicas}


async def _until(check: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)  # polling interval


def _run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))


def test_replicas_serve_once_healthy_and_a_dead_one_is_replaced() -> None:
    async def test() -> None:
        host, launcher = Host(), FakeLauncher()
        managed = ManagedReplicas(launcher, SupervisorConfig(drain_timeout=1.0))
        async with managed.running(host.host, 2):
            assert managed.count == 2
            await _until(lambda: host.states() == {"replica-1": "healthy",
                                                   "replica-2": "healthy"}, "2 healthy")
            launcher.launched[0].end("exit code -9, killed by SIGKILL")
            await _until(lambda: host.states() == {"replica-2": "healthy",
                                                   "replica-3": "healthy"}, "the replacement")
            replaced = host.metrics.registry.get_sample_value(
                "surge:router_scaling_events_total", {"direction": "replace"})
        assert replaced == 1
        assert [launched.how for launched in launcher.launched] == [
            "exit code -9, killed by SIGKILL", "stopped", "stopped"]
        assert len(host.replicas) == 0 and launcher.closed

    _run(test)


def test_scaling_down_drains_before_it_stops() -> None:
    async def test() -> None:
        host, launcher = Host(), FakeLauncher()
        managed = ManagedReplicas(launcher, SupervisorConfig(drain_timeout=5.0))
        async with managed.running(host.host, 1):
            await _until(lambda: host.states() == {"replica-1": "healthy"}, "replica-1")
            replica = next(iter(host.replicas))
            replica.begin()  # a request in flight
            managed.scale_to(0)
            await _until(lambda: replica.draining, "the drain")
            await asyncio.sleep(0.3)
            assert not launcher.launched[0].exited.is_set()  # still answering its request
            replica.succeeded(0.1)
            await _until(launcher.launched[0].exited.is_set, "the stop")
            assert managed.count == 0

    _run(test)


@pytest.mark.parametrize("max_start_failures", [1, 2])
def test_replicas_that_never_start_stop_the_router(max_start_failures: int) -> None:
    async def test() -> None:
        host, launcher = Host(), FakeLauncher(broken=True)
        managed = ManagedReplicas(launcher, SupervisorConfig(
            max_start_failures=max_start_failures))
        async with managed.running(host.host, 1):
            await _until(lambda: host.exits == [1], "the router to be stopped")
        assert len(launcher.launched) == max_start_failures

    _run(test)


def test_bad_supervision_settings_say_what_is_allowed() -> None:
    with pytest.raises(ValueError, match="standby=-1 is invalid: allowed is an integer >= 0"):
        SupervisorConfig(standby=-1)
    with pytest.raises(ValueError, match="max_start_failures=0 is invalid"):
        SupervisorConfig(max_start_failures=0)


class UnplaceableLauncher(FakeLauncher):
    """Cannot start a replica (as a Ray launcher when no node has the resources), until
    ``placeable`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.placeable = False
        self.refused = 0

    async def launch(self, name: str) -> FakeLaunched:
        if not self.placeable:
            self.refused += 1
            raise LaunchError("no Ray node has {GPU: 8}")
        return await super().launch(name)


def test_a_replica_that_cannot_be_launched_says_why_and_is_retried() -> None:
    async def test() -> None:
        host, launcher = Host(), UnplaceableLauncher()
        managed = ManagedReplicas(launcher, SupervisorConfig(max_start_failures=5))
        async with managed.running(host.host, 1):
            await _until(lambda: launcher.refused >= 2, "a retry")
            assert "could not be started: no Ray node has {GPU: 8}" in \
                (host.replicas.problem or "")
            assert host.exits == []
            launcher.placeable = True  # as when a Ray autoscaler adds a node
            await _until(lambda: list(host.states().values()) == ["healthy"], "a replica")
            assert host.replicas.problem is None

    _run(test)


def test_launch_failures_before_any_replica_served_stop_the_router() -> None:
    async def test() -> None:
        host, launcher = Host(), UnplaceableLauncher()
        managed = ManagedReplicas(launcher, SupervisorConfig(max_start_failures=2))
        async with managed.running(host.host, 1):
            await _until(lambda: host.exits == [1], "the router to be stopped")
        assert launcher.refused == 2

    _run(test)

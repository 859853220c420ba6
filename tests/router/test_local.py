"""Local replica processes without a model: `surge bench fake-server` children (they start in
about a second) stand in for `surge serve`, so the supervisor and the autoscaler are tested
for real (processes, ports, signals) but fast: scale up under load and back down with a
drain, a killed replica replaced, a standby promoted at once, and a command that cannot start
stopping the router instead of restarting forever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from surge.router.app import RouterSettings
from surge.router.autoscale import AutoscaleConfig
from surge.router.health import HealthConfig
from surge.router.local import LocalReplicaConfig, build_local_router
from surge.router.policies import make_policy
from tests.router._helpers import ClientLoad, RouterThread, process_alive

FAKE_SERVER = (sys.executable, "-m", "surge.bench", "fake-server")
WAIT = 30.0


def _router(initial: int, *, standby: int = 0, autoscale: AutoscaleConfig | None = None,
            command: tuple[str, ...] = FAKE_SERVER, ttft: float = 0.0) -> RouterThread:
    config = LocalReplicaConfig(["--ttft", str(ttft)], command=command, standby=standby,
                                drain_timeout=5.0, relay_output=False)
    settings = RouterSettings(health=HealthConfig(path=None))
    return RouterThread(build_local_router(make_policy("least_outstanding"), settings, config,
                                           initial, autoscale))


def _wait_until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling interval


def _by_state(router: RouterThread) -> dict[str, set[str]]:
    states: dict[str, set[str]] = {}
    for replica in router.status()["replicas"]:
        state = "starting" if replica["starting"] else replica["state"]
        states.setdefault(state, set()).add(replica["name"])
    return states


@pytest.fixture
def processes() -> Iterator[list[int]]:
    """Pids to make sure of at the end: none may outlive its test."""
    pids: list[int] = []
    yield pids
    deadline = time.monotonic() + 10
    while (alive := [p for p in pids if process_alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling interval
    assert not alive, f"processes left behind: {alive}"


def _pids(router: RouterThread) -> list[int]:
    return [p["pid"] for p in router.status()["processes"] if p["pid"]]


@pytest.mark.timeout(90)
def test_autoscaler_scales_up_under_load_and_drains_down_after(processes: list[int]) -> None:
    autoscale = AutoscaleConfig(min_replicas=1, max_replicas=3, target_in_flight=2.0,
                                scale_up_delay=0.3, scale_down_delay=1.0, interval=0.05)
    with _router(1, autoscale=autoscale, ttft=0.5) as router:
        _wait_until(lambda: _by_state(router).get("healthy") == {"replica-1"}, "replica-1")
        with ClientLoad(router.url, 2, {"max_tokens": 1}, timeout=WAIT) as steady:
            with ClientLoad(router.url, 4, {"max_tokens": 1}, timeout=WAIT) as burst:
                _wait_until(lambda: len(_by_state(router).get("healthy", ())) == 3,
                            "3 replicas")
                _wait_until(lambda: len(steady.replicas() | burst.replicas()) == 3,
                            "traffic on all 3")
                processes.extend(_pids(router))
            # Two clients go on (each request 0.5 s, so replicas are mid-request when they
            # are retired) while two of the three replicas are drained and stopped.
            _wait_until(lambda: len(router.status()["replicas"]) == 1, "scale down to 1")
            served_before = len(steady.results)
            _wait_until(lambda: len(steady.results) > served_before + 3, "more answers")
        status = router.status()
        metrics = httpx.get(f"{router.url}/metrics", timeout=5).text
    assert set(steady.statuses()) == set(burst.statuses()) == {200}
    # Drained first: no request was cut (and retried) when the two replicas stopped.
    assert "surge:router_retries_total 0.0" in metrics
    directions = [d["direction"] for d in status["autoscaler"]["decisions"]]
    assert "up" in directions and directions[-1] == "down"
    assert 'surge:router_scaling_events_total{direction="down"} 0.0' not in metrics


@pytest.mark.timeout(90)
def test_a_killed_replica_is_replaced(processes: list[int]) -> None:
    with _router(2) as router:
        _wait_until(lambda: len(_by_state(router).get("healthy", ())) == 2, "2 replicas")
        victim = next(r for r in router.status()["replicas"] if r["name"] == "replica-1")
        os.kill(victim["pid"], signal.SIGKILL)
        _wait_until(lambda: _by_state(router).get("healthy") == {"replica-2", "replica-3"},
                    "the replacement")
        with router.client() as client:
            names = {client.post("/v1/completions", json={"max_tokens": 1}
                                 ).headers["x-surge-replica"] for _ in range(20)}
            metrics = client.get("/metrics").text
        processes.extend(_pids(router))
    assert names == {"replica-2", "replica-3"}
    assert 'surge:router_scaling_events_total{direction="replace"} 1.0' in metrics


@pytest.mark.timeout(90)
def test_a_standby_takes_over_at_once(processes: list[int]) -> None:
    with _router(1, standby=1) as router:
        _wait_until(lambda: _by_state(router) == {"healthy": {"replica-1"},
                                                  "standby": {"replica-2"}}, "the standby")
        with router.client() as client:
            assert {client.post("/v1/completions", json={}).headers["x-surge-replica"]
                    for _ in range(5)} == {"replica-1"}  # a standby gets no work
            os.kill(router.status()["replicas"][0]["pid"], signal.SIGKILL)
            _wait_until(lambda: "replica-2" in _by_state(router).get("healthy", ()),
                        "the promotion", timeout=2.0)
            assert client.post("/v1/completions", json={}).headers["x-surge-replica"] == \
                "replica-2"
        _wait_until(lambda: _by_state(router).get("standby") == {"replica-3"}, "a new standby")
        processes.extend(_pids(router))


@pytest.mark.timeout(60)
def test_a_replica_that_cannot_start_stops_the_router() -> None:
    exits: list[int] = []
    failing = (sys.executable, "-c", "import sys; sys.exit(3)")
    with _router(1, command=failing) as router:
        router.app.request_exit = exits.append
        _wait_until(lambda: exits == [1], "the router to give up")
        assert _by_state(router) == {}


_ROUTER_SCRIPT = """
import sys
from surge.router.app import RouterSettings, run_router
from surge.router.local import LocalReplicaConfig, build_local_router
from surge.router.policies import make_policy
config = LocalReplicaConfig([], command=(sys.executable, "-m", "surge.bench", "fake-server"),
                            relay_output=False)
app = build_local_router(make_policy("round_robin"), RouterSettings(), config, 2)
run_router(app, "127.0.0.1", 0, on_started=lambda host, port: print("port", port, flush=True))
"""


@pytest.mark.timeout(60)
def test_replicas_do_not_outlive_a_killed_router() -> None:
    router = subprocess.Popen([sys.executable, "-c", _ROUTER_SCRIPT], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        assert router.stdout is not None
        port = int(router.stdout.readline().split()[1])
        url = f"http://127.0.0.1:{port}"
        _wait_until(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200 and
                    httpx.get(f"{url}/health", timeout=5).json()["replicas_routable"] == 2,
                    "2 replicas")
        pids = [r["pid"] for r in httpx.get(f"{url}/router/replicas", timeout=5).json()[
            "replicas"]]
        router.kill()  # SIGKILL: the router cannot stop them itself
        router.wait(10)
        _wait_until(lambda: not any(process_alive(pid) for pid in pids), "the replicas to exit",
                    timeout=10.0)
    finally:
        if router.poll() is None:
            router.kill()

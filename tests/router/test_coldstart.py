"""Scale to zero with local replicas (`surge bench fake-server` children, which start in about
a second): an idle deployment stops its replicas; the first request starts one and is held,
never lost, as are the requests that arrive while it starts; the cold start is measured and
exported; past the hold timeout or the hold queue's bound, a 503 with Retry-After says why;
a warm standby makes the cold start a promotion."""

from __future__ import annotations

import concurrent.futures
import sys
import time
from collections.abc import Callable

import httpx
import pytest

from surge.router.app import RouterSettings, build_router
from surge.router.autoscale import AutoscaleConfig
from surge.router.backend import ReplicaPlan
from surge.router.coldstart import ScaleToZeroConfig
from surge.router.health import HealthConfig
from surge.router.local import LocalReplicaConfig, local_replicas
from surge.router.policies import make_policy
from surge.router.replicas import ReplicaSet
from tests.router._helpers import RouterThread
from tests.server._helpers import metric_value

FAKE_SERVER = (sys.executable, "-m", "surge.bench", "fake-server")
WAIT = 30.0


def _router(initial: int, *, idle_timeout: float = 0.5, hold_timeout: float = 30.0,
            max_held: int = 100, standby: int = 0) -> RouterThread:
    config = LocalReplicaConfig([], command=FAKE_SERVER, standby=standby, drain_timeout=5.0,
                                relay_output=False)
    autoscale = AutoscaleConfig(min_replicas=0, max_replicas=2, target_in_flight=4.0,
                                scale_up_delay=0.3, scale_down_delay=1.0, interval=0.05,
                                idle_timeout=idle_timeout)
    plan = ReplicaPlan(local_replicas(config), initial, autoscale,
                       ScaleToZeroConfig(hold_timeout=hold_timeout, max_held=max_held))
    settings = RouterSettings(health=HealthConfig(path=None))
    return RouterThread(build_router(ReplicaSet(), make_policy("least_outstanding"), settings,
                                     plan=plan))


def _wait_until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling interval


def _post_many(url: str, count: int) -> list[httpx.Response]:
    def post(_: int) -> httpx.Response:
        return httpx.post(f"{url}/v1/completions", json={"max_tokens": 1}, timeout=WAIT)

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(post, range(count)))


@pytest.mark.timeout(90)
def test_idle_goes_to_zero_and_the_first_requests_wake_it_all_answered() -> None:
    with _router(1, idle_timeout=0.5) as router:
        # replica-1 starts with the router; no request comes: it is stopped after 0.5 s.
        _wait_until(lambda: router.status()["processes"] == [], "scale to zero")
        assert router.status()["replicas"] == []
        started = time.monotonic()
        answers = _post_many(router.url, 8)  # all arrive with no replica running
        waited = time.monotonic() - started
        status = router.status()
        metrics = httpx.get(f"{router.url}/metrics", timeout=5).text
        # Idle again: back to zero, and woken again by the next request.
        _wait_until(lambda: router.status()["processes"] == [], "scale to zero again")
        again = httpx.post(f"{router.url}/v1/completions", json={}, timeout=WAIT)
    assert [a.status_code for a in answers] == [200] * 8
    assert {a.headers["x-surge-replica"] for a in answers} == {"replica-2"}
    cold = status["scale_to_zero"]
    assert cold["cold_starts"] == 1 and 0 < cold["last_cold_start_s"] <= waited
    assert metric_value(metrics, "surge:router_cold_start_seconds_count") == 1.0
    assert metric_value(metrics, "surge:router_held_requests") == 0.0
    assert again.status_code == 200 and again.headers["x-surge-replica"] == "replica-3"
    decisions = [(d["current"], d["desired"]) for d in status["autoscaler"]["decisions"]]
    assert decisions[0] == (1, 0) and "no request for" in \
        status["autoscaler"]["decisions"][0]["reason"]


@pytest.mark.timeout(60)
def test_past_the_hold_timeout_a_503_with_retry_after_says_why() -> None:
    with _router(0, hold_timeout=0.05, idle_timeout=60.0) as router:
        refused = httpx.post(f"{router.url}/v1/completions", json={}, timeout=WAIT)
        # The replica it woke keeps starting: the next requests are served by it.
        _wait_until(lambda: httpx.post(f"{router.url}/v1/completions", json={},
                                       timeout=WAIT).status_code == 200, "the woken replica")
        metrics = httpx.get(f"{router.url}/metrics", timeout=5).text
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert error["code"] == "replica_starting"
    assert "no replica was ready within the hold timeout (0.05 s): one is starting" in \
        error["message"]
    assert metric_value(metrics, "surge:router_no_replica_total", reason="hold_timeout") >= 1


@pytest.mark.timeout(60)
def test_past_the_hold_queue_bound_a_503_at_once() -> None:
    with _router(0, max_held=2, idle_timeout=60.0) as router:
        answers = _post_many(router.url, 5)
    statuses = sorted(a.status_code for a in answers)
    assert statuses.count(200) >= 2 and set(statuses) <= {200, 503}
    refused = [a for a in answers if a.status_code == 503]
    assert refused, "5 requests at once with room for 2: some must be refused"
    assert all("requests already wait for a replica to start (--max-held-requests 2)"
               in a.json()["error"]["message"] and a.headers["retry-after"] for a in refused)


@pytest.mark.timeout(90)
def test_a_warm_standby_makes_the_cold_start_a_promotion() -> None:
    with _router(1, standby=1, idle_timeout=0.5) as router:
        _wait_until(lambda: any(p["standby"] and p["ready"]
                                for p in router.status()["processes"]), "the standby")
        _wait_until(lambda: all(p["standby"] for p in router.status()["processes"]),
                    "scale to zero (the standby stays)")
        answer = httpx.post(f"{router.url}/v1/completions", json={}, timeout=WAIT)
        cold = router.status()["scale_to_zero"]
        _wait_until(lambda: sum(p["standby"] for p in router.status()["processes"]) == 1 and
                    len(router.status()["processes"]) == 2, "a new standby")
    assert answer.status_code == 200 and answer.headers["x-surge-replica"] == "replica-2"
    # Promoting a loaded replica, not starting a process (about a second here).
    assert cold["cold_starts"] == 1 and cold["last_cold_start_s"] < 0.5

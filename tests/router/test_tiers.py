"""Tiered replicas behind the router (in-process fake replicas, one per tier): critical
requests (the X-Surge-Priority header, or a body priority below the threshold) go to the full
tier and the rest to the fast tier; a saturated or empty tier spills over to the other one
instead of failing; traffic per tier is counted on /metrics and the status page."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from surge.router.app import RouterSettings, build_router
from surge.router.backend import ReplicaPlan
from surge.router.health import HealthConfig
from surge.router.local import LocalProcessLauncher, LocalReplicaConfig
from surge.router.policies import make_policy
from surge.router.replicas import BreakerConfig, Replica, ReplicaSet
from surge.router.supervisor import ManagedReplicas, SupervisorConfig
from surge.router.tiers import TieredReplicas, TiersConfig
from tests.router._helpers import FakeReplica, RouterThread, json_handler
from tests.server._helpers import metric_value


@pytest.fixture
def fakes() -> Iterator[dict[str, FakeReplica]]:
    started = {tier: FakeReplica(json_handler({"tier": tier})).start()
               for tier in ("full", "fast")}
    yield started
    for fake in started.values():
        fake.stop()


def _router(fakes: dict[str, FakeReplica], tiers: tuple[str, ...] = ("full", "fast"),
            cap: int | None = None) -> RouterThread:
    replicas = ReplicaSet([Replica(fakes[tier].url, tier, tier=tier,
                                   breaker_config=BreakerConfig(max_in_flight=cap))
                           for tier in tiers])
    app = build_router(replicas, make_policy("least_outstanding"),
                       RouterSettings(health=HealthConfig(path=None)))
    app.use_tiers(TiersConfig(critical_below=0))
    return RouterThread(app)


@pytest.mark.timeout(30)
def test_critical_requests_go_to_full_and_the_rest_to_fast(
        fakes: dict[str, FakeReplica]) -> None:
    with _router(fakes) as router, router.client() as client:
        critical = [client.post("/v1/completions", json={},
                                headers={"X-Surge-Priority": "critical"}).json()["tier"]
                    for _ in range(5)]
        urgent = [client.post("/v1/completions", json={"priority": -5}).json()["tier"]
                  for _ in range(3)]
        normal = [client.post("/v1/completions", json=body).json()["tier"]
                  for body in ({}, {"priority": 0}, {"priority": 7})]
        lowered = client.post("/v1/completions", json={"priority": -5},
                              headers={"X-Surge-Priority": "normal"}).json()["tier"]
        metrics = client.get("/metrics").text
        status = router.status()
    assert critical == ["full"] * 5 and urgent == ["full"] * 3
    assert normal == ["fast"] * 3 and lowered == "fast"  # the header wins over the body
    assert metric_value(metrics, "surge:router_tier_requests_total", wanted="full",
                        served="full") == 8.0
    assert metric_value(metrics, "surge:router_tier_requests_total", wanted="fast",
                        served="fast") == 4.0
    assert {(r["wanted"], r["served"], r["count"]) for r in status["tiers"]["requests"]} == \
        {("full", "full", 8), ("fast", "fast", 4)}
    assert {r["name"]: r["tier"] for r in status["replicas"]} == {"full": "full",
                                                                  "fast": "fast"}


@pytest.mark.timeout(30)
def test_a_tier_that_cannot_take_the_request_spills_over(
        fakes: dict[str, FakeReplica]) -> None:
    with _router(fakes) as router, router.client() as client:
        full = next(r for r in router.app.replicas if r.tier == "full")
        full.healthy = False  # as the health check marks a replica that stopped answering
        spilled = client.post("/v1/completions", json={},
                              headers={"X-Surge-Priority": "critical"})
        full.healthy = True
        fast = next(r for r in router.app.replicas if r.tier == "fast")
        fast.draining = True
        spilled_up = client.post("/v1/completions", json={})
        metrics = client.get("/metrics").text
    assert spilled.status_code == 200 and spilled.json()["tier"] == "fast"
    assert spilled_up.status_code == 200 and spilled_up.json()["tier"] == "full"
    assert metric_value(metrics, "surge:router_tier_requests_total", wanted="full",
                        served="fast") == 1.0
    assert metric_value(metrics, "surge:router_tier_requests_total", wanted="fast",
                        served="full") == 1.0


@pytest.mark.timeout(30)
def test_a_tier_with_no_replicas_is_served_by_the_other(
        fakes: dict[str, FakeReplica]) -> None:
    with _router(fakes, tiers=("fast",)) as router, router.client() as client:
        answer = client.post("/v1/completions", json={},
                             headers={"X-Surge-Priority": "critical"})
    assert answer.status_code == 200 and answer.json()["tier"] == "fast"


FAKE_SERVER = (sys.executable, "-m", "surge.bench", "fake-server")


@pytest.mark.timeout(60)
def test_tiered_groups_of_local_replicas_serve_their_tiers() -> None:
    """Two groups of local processes (what `surge serve --replicas 1 --fast-replicas 1`
    composes), named and tiered by group."""
    groups = {tier: (ManagedReplicas(LocalProcessLauncher(LocalReplicaConfig(
        ["--served-model", tier], command=FAKE_SERVER, relay_output=False)),
        SupervisorConfig(drain_timeout=2.0, name_prefix=tier, tier=tier)), 1)
        for tier in ("full", "fast")}
    app = build_router(ReplicaSet(), make_policy("least_outstanding"),
                       RouterSettings(health=HealthConfig(path=None)),
                       plan=ReplicaPlan(TieredReplicas(groups), 2))
    app.use_tiers(TiersConfig())
    with RouterThread(app) as router, router.client() as client:
        deadline = time.monotonic() + 30
        while client.get("/health").json().get("replicas_routable") != 2:
            assert time.monotonic() < deadline, "the two groups did not start"
            time.sleep(0.05)  # polling the router's health
        critical = {client.post("/v1/completions", json={"max_tokens": 1}, headers={
            "X-Surge-Priority": "critical"}).headers["x-surge-replica"] for _ in range(4)}
        normal = {client.post("/v1/completions", json={"max_tokens": 1}
                              ).headers["x-surge-replica"] for _ in range(4)}
        processes = router.status()["processes"]
    assert critical == {"full-1"} and normal == {"fast-1"}
    assert sorted((p["name"], p["tier"]) for p in processes) == [("fast-1", "fast"),
                                                                 ("full-1", "full")]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_surge_serve_with_a_fast_int8_tier(tiny_checkpoint: Callable[[str], Path],
                                           tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "surge.cli", "serve", "--model",
               str(tiny_checkpoint("tiny-llama")), "--dtype", "float32", "--port", "0",
               "--num-threads", "1", "--replicas", "1", "--fast-replicas", "1",
               "--fast-quantization", "int8", "--critical-priority-below", "0"]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while not (match := re.search(rb"router listening on (http://[\d.]+:\d+)",
                                      log.read_bytes())):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)  # polling the log for the address
        with httpx.Client(base_url=match.group(1).decode(), timeout=60) as client:
            while client.get("/health").json().get("replicas_routable") != 2:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)  # polling the router's health
            body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0}
            critical = client.post("/v1/completions", json={**body, "priority": -1})
            normal = client.post("/v1/completions", json=body)
            status = client.get("/router/replicas").json()
    finally:
        process.terminate()
        process.wait(60)
    assert critical.status_code == normal.status_code == 200
    assert critical.headers["x-surge-replica"] == "full-1"
    assert normal.headers["x-surge-replica"] == "fast-1"
    assert {(p["name"], p["tier"]) for p in status["processes"]} == {("full-1", "full"),
                                                                     ("fast-1", "fast")}
    assert process.returncode == 0, log.read_text()[-3000:]

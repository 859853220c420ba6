"""The router and tenants: the tenant header reaches the replica unchanged; consistent_hash
by tenant keeps a tenant on one replica; least_outstanding by tenant spreads a tenant's
burst over every replica."""

from __future__ import annotations

import random
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from surge.engine.request import ANONYMOUS_TENANT as ENGINE_ANONYMOUS
from surge.http.tenant import ANONYMOUS_TENANT
from surge.router.app import RouterSettings, build_router
from surge.router.health import HealthConfig
from surge.router.policies import (
    ConsistentHash,
    LeastOutstanding,
    RequestFacts,
    make_policy,
)
from surge.router.replicas import Replica, ReplicaSet
from tests.router._helpers import FakeReplica, RouterThread, json_handler

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def fakes() -> Iterator[Callable[[int], list[FakeReplica]]]:
    started: list[FakeReplica] = []

    def start(count: int) -> list[FakeReplica]:
        started.extend(FakeReplica(json_handler()).start() for _ in range(count))
        return started[-count:]

    yield start
    for replica in started:
        replica.stop()


def _router(urls: list[str], policy: str, **kwargs: Any) -> RouterThread:
    replica_set = ReplicaSet([Replica(url, f"r{i}") for i, url in enumerate(urls)])
    settings = RouterSettings(health=HealthConfig(path=None))
    return RouterThread(build_router(replica_set, make_policy(policy, **kwargs), settings))


def test_the_tenant_header_reaches_the_replica(fakes: Callable[[int], list[FakeReplica]]
                                               ) -> None:
    [replica] = fakes(1)
    with _router([replica.url], "least_outstanding", by_tenant=True,
                 tenant_header="X-Tenant") as router, router.client() as client:
        assert client.post("/v1/completions", json={"prompt": "hi"},
                           headers={"X-Tenant": "acme"}).status_code == 200
    assert replica.seen[-1].headers["X-Tenant"] == "acme"


def test_consistent_hash_by_tenant_keeps_each_tenant_on_one_replica(
        fakes: Callable[[int], list[FakeReplica]]) -> None:
    replicas = fakes(4)
    with _router([r.url for r in replicas], "consistent_hash", by_tenant=True,
                 tenant_header="X-Tenant") as router, router.client() as client:
        placed = {}
        for tenant in ("acme", "globex", "initech", "umbrella", "hooli"):
            # Different sessions and users of one tenant: still one replica.
            by_header = {client.post("/v1/completions", json={"user": f"u{i}"},
                                     headers={"X-Tenant": tenant, "X-Session-ID": f"s{i}"}
                                     ).headers["x-surge-replica"] for i in range(6)}
            assert len(by_header) == 1, (tenant, by_header)
            placed[tenant] = by_header.pop()
        # Without the header the body's user is the tenant, as on the replica.
        by_user = {client.post("/v1/completions", json={"user": "acme"}
                               ).headers["x-surge-replica"] for _ in range(4)}
        assert by_user == {placed["acme"]}
    assert len(set(placed.values())) >= 2  # tenants are spread over replicas


def test_consistent_hash_by_tenant_does_not_pile_the_anonymous_on_one_replica() -> None:
    replicas = [Replica(f"http://127.0.0.1:{9000 + i}", f"r{i}") for i in range(4)]
    policy = ConsistentHash(LeastOutstanding(random.Random(0)), by_tenant=True)
    chosen = {policy.choose(replicas, RequestFacts(tenant=ANONYMOUS_TENANT)).name
              for _ in range(40)}
    assert len(chosen) > 1
    assert ANONYMOUS_TENANT == ENGINE_ANONYMOUS  # the router and engine agree on its name


def test_least_outstanding_by_tenant_spreads_a_burst_evenly() -> None:
    replicas = [Replica(f"http://127.0.0.1:{9000 + i}", f"r{i}") for i in range(4)]
    now = [0.0]
    policy = LeastOutstanding(random.Random(1), by_tenant=True, clock=lambda: now[0])
    counts = {r.name: 0 for r in replicas}
    for _ in range(40):  # a burst: nothing finishes, in-flight counts stay equal
        counts[policy.choose(replicas, RequestFacts(tenant="flood")).name] += 1
    assert max(counts.values()) - min(counts.values()) <= 2, counts
    # Another tenant is placed by its own history, not the flood's.
    light = policy.choose(replicas, RequestFacts(tenant="light"))
    assert light in replicas


def test_by_tenant_only_for_the_policies_that_support_it() -> None:
    with pytest.raises(ValueError, match="--route-by-tenant applies to --policy"):
        make_policy("round_robin", by_tenant=True)
    assert make_policy("least_outstanding").by_tenant is False


@pytest.mark.slow  # two replicas start
@pytest.mark.timeout(240)
def test_sighup_to_the_router_reloads_every_replicas_tenants_file(
        tiny_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    from tests.router.test_replicated import STARTUP_SECONDS, _names, start_router

    path = tmp_path / "tenants.toml"
    path.write_text("[tenants.acme]\nweight = 2\n")
    router = start_router(tiny_checkpoint("tiny-llama"), tmp_path, "--replicas", "2",
                          "--engine-mode", "thread", "--tenants", str(path),
                          "--kv-cache-memory-bytes", str(32 << 20))
    try:
        router.wait_for(lambda: _names(router, "healthy") == {"replica-1", "replica-2"},
                        "2 healthy replicas", STARTUP_SECONDS)
        path.write_text("[tenants.acme]\nweight = 5\n")
        router.process.send_signal(signal.SIGHUP)
        router.wait_for(lambda: router.log_path.read_text(errors="replace").count(
            "tenant 'acme': weight=2 -> weight=5") == 2, "both replicas reloading", 30)
        assert "forwarded to 2 replica process(es)" in router.log()
        assert router.process.poll() is None  # the router did not die of SIGHUP
    finally:
        router.process.send_signal(signal.SIGTERM)
        router.process.wait(60)

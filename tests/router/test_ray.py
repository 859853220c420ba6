"""Replicas as Ray actors on a real multi-node Ray cluster on this machine
(``ray.cluster_utils.Cluster``: a head and worker nodes, each its own raylet, with distinct
custom resources). Replicas are `surge bench fake-server` processes (they start in about a
second) so placement, failover and scaling are tested for real but fast; one test runs the
real `surge serve --backend ray` with a tiny model and `surge route --backend ray` in front of
its actors.

- placement: replicas that need ``zone_b`` run on the node that has it;
- a replica no node can take: 503s that say why, and the router gives up when none ever
  started; one beyond the free capacity: the others serve;
- failover: a node removed under steady load fails no non-streaming request, and a
  replacement serves on another node;
- the autoscaler asks Ray for a replica under load and drains it away after.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from surge.router.app import RouterSettings, build_router
from surge.router.autoscale import AutoscaleConfig
from surge.router.backend import ReplicaPlan
from surge.router.health import HealthConfig
from surge.router.policies import make_policy
from surge.router.ray_backend import (
    PYTHON,
    RAY_MISSING,
    RayReplicaConfig,
    RayUnavailable,
    connect_ray,
    import_ray,
    ray_replicas,
)
from surge.router.replicas import ReplicaSet
from surge.router.supervisor import SupervisorConfig
from tests.router._helpers import ClientLoad, RouterThread

FAKE_SERVER = (PYTHON, "-m", "surge.bench", "fake-server")
WAIT = 60.0
SMALL = {"object_store_memory": 80 << 20}  # bytes; Ray's minimum is 75 MiB
GREEDY = {"prompt": "Hello", "max_tokens": 4, "temperature": 0}


def test_without_ray_the_flag_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets without Ray
    with pytest.raises(RayUnavailable, match='pip install "surge\\[ray\\]"'):
        import_ray()
    assert "(on every node of the cluster too)" in RAY_MISSING


def test_an_unreachable_address_fails_at_once_naming_it() -> None:
    started = time.monotonic()
    with pytest.raises(RayUnavailable, match=r"--ray-address 127\.0\.0\.1:9: no Ray head "
                       r"node answers there"):
        connect_ray("127.0.0.1:9")
    assert time.monotonic() - started < 5.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """A head (no CPUs for replicas) and three worker nodes: a and c may each take one replica
    (``slot``), b has ``zone_b`` for two."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    ray = import_ray()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, **SMALL,
        # Ray notices a dead node in about 1.5 s instead of its default 15-30 s: until it
        # does, it may place a replacement on the dead node (the router itself notices the
        # lost replica sooner, by its refused connections).
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                           "health_check_timeout_ms": 500,
                           "health_check_failure_threshold": 3}})
    cluster.nodes_by_name = {  # type: ignore[attr-defined]
        "a": cluster.add_node(num_cpus=1, resources={"slot": 1}, **SMALL),
        "b": cluster.add_node(num_cpus=1, resources={"zone_b": 2}, **SMALL),
        "c": cluster.add_node(num_cpus=1, resources={"slot": 1}, **SMALL),
    }
    cluster.wait_for_nodes()
    connect_ray(cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        try:
            cluster.shutdown()
        except ValueError:  # a stopped router's last Ray call connected this driver again
            ray.shutdown()
            cluster.shutdown()


def _router(deployment: str, initial: int, *, resources: dict[str, float],
            autoscale: AutoscaleConfig | None = None, placement_timeout: float = 30.0,
            max_start_failures: int = 3, ttft: float = 0.05) -> RouterThread:
    config = RayReplicaConfig(
        FAKE_SERVER, ["--ttft", str(ttft)], num_cpus=0.1, resources=resources,
        placement_timeout=placement_timeout, liveness_seconds=1.0, deployment=deployment,
        relay_output=False, supervision=SupervisorConfig(
            drain_timeout=5.0, max_start_failures=max_start_failures))
    settings = RouterSettings(health=HealthConfig(path=None))
    plan = ReplicaPlan(ray_replicas(config), initial, autoscale)
    return RouterThread(build_router(ReplicaSet(), make_policy("least_outstanding"), settings,
                                     plan=plan))


def _wait_until(check: Callable[[], bool], what: str, timeout: float = WAIT) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling interval
    return time.monotonic() - started


def _healthy(router: RouterThread) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in router.status()["replicas"]
            if r["state"] == "healthy" and not r["starting"]}


def _node_of(cluster: Any, name: str) -> str:
    return cluster.nodes_by_name[name].node_id


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_replicas_run_on_the_node_with_their_resources(cluster: Any) -> None:
    with _router("placed", 2, resources={"zone_b": 1}) as router:
        _wait_until(lambda: len(_healthy(router)) == 2, "2 replicas")
        nodes = {r["node_id"] for r in _healthy(router).values()}
        with router.client() as client:
            served = {client.post("/v1/completions", json={"max_tokens": 1}
                                  ).headers["x-surge-replica"] for _ in range(20)}
        processes = router.status()["processes"]
    assert nodes == {_node_of(cluster, "b")}
    assert served == {"replica-1", "replica-2"}
    assert {p["node_id"] for p in processes} == {_node_of(cluster, "b")}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_replica_no_node_can_take_gets_a_503_saying_why(cluster: Any) -> None:
    exits: list[int] = []
    with _router("nowhere", 1, resources={"zone_z": 1}, placement_timeout=1.0) as router:
        router.app.request_exit = exits.append
        with router.client() as client:
            _wait_until(lambda: "no Ray node has" in client.get("/health").text,
                        "the reason on /health")
            answer = client.post("/v1/completions", json={"max_tokens": 1})
        _wait_until(lambda: exits == [1], "the router to give up")
    assert answer.status_code == 503
    message = answer.json()["error"]["message"]
    assert "replica-1 could not be started: no Ray node has the resources one replica " \
        "needs, {CPU: 0.1, zone_z: 1}" in message, message


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_node_loss_under_load_fails_no_request_and_is_replaced(cluster: Any) -> None:
    """Two replicas, one per node with a ``slot`` (a and c); one of these nodes is killed
    under steady load. The other slot is taken, so a fresh node with a slot joins (as a Ray
    autoscaler would add one) and the replacement must land there."""
    with _router("failover", 2, resources={"slot": 1}) as router:
        _wait_until(lambda: len(_healthy(router)) == 2, "2 replicas")
        by_node = {r["node_id"]: name for name, r in _healthy(router).items()}
        victim_key = next(k for k in ("a", "c") if _node_of(cluster, k) in by_node)
        victim = cluster.nodes_by_name[victim_key]
        with ClientLoad(router.url, 4, {"max_tokens": 1}, timeout=WAIT) as load:
            _wait_until(lambda: len(load.results) > 20, "steady load")
            cluster.remove_node(victim, allow_graceful=False)  # a crash, not a drain
            lost = time.monotonic()
            spare = cluster.add_node(num_cpus=1, resources={"slot": 1}, **SMALL)
            cluster.nodes_by_name[victim_key] = spare
            _wait_until(lambda: len(_healthy(router)) == 2 and
                        by_node[victim.node_id] not in _healthy(router), "the replacement")
            recovered = time.monotonic() - lost
            after = len(load.results)
            _wait_until(lambda: len(load.results) > after + 20, "load on the replacement")
        nodes = {r["node_id"] for r in _healthy(router).values()}
        metrics = httpx.get(f"{router.url}/metrics", timeout=5).text
    assert set(load.statuses()) == {200}, [r for r in load.results if r[0] != 200][:5]
    assert spare.node_id in nodes and victim.node_id not in nodes
    assert recovered < 30.0
    assert 'surge:router_scaling_events_total{direction="replace"} 1.0' in metrics
    print(f"node loss -> replacement serving: {recovered:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_the_autoscaler_asks_ray_for_replicas_and_drains_them_away(cluster: Any) -> None:
    autoscale = AutoscaleConfig(min_replicas=1, max_replicas=3, target_in_flight=2.0,
                                scale_up_delay=0.3, scale_down_delay=1.0, interval=0.05)
    # zone_b has room for two: the third replica waits for a node, then counts as failed
    # (saying so), and the two placed ones serve meanwhile. (The placement timeout covers
    # the actor's start too: a Ray worker process importing Surge, a few seconds here.)
    with _router("scaled", 1, resources={"zone_b": 1}, autoscale=autoscale,
                 placement_timeout=10.0, ttft=0.5) as router:
        _wait_until(lambda: len(_healthy(router)) == 1, "replica-1")
        with ClientLoad(router.url, 6, {"max_tokens": 1}, timeout=WAIT) as load:
            _wait_until(lambda: len(_healthy(router)) == 2, "a second replica")
            _wait_until(lambda: "Ray did not place it within 10 s: no node has "
                        "{CPU: 0.1, zone_b: 1} free now" in (
                            router.app.replicas.problem or ""), "the third's reason")
        _wait_until(lambda: len(router.status()["replicas"]) == 1, "scale down to 1")
        status = router.status()
    assert set(load.statuses()) == {200}
    directions = [d["direction"] for d in status["autoscaler"]["decisions"]]
    assert "up" in directions and directions[-1] == "down"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_surge_serve_on_ray_and_a_second_router_in_front(
        cluster: Any, tiny_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    """The real thing: `surge serve --backend ray` (a tiny model, its engine in the actor's
    child) and `surge route --backend ray` finding the same actors."""
    log = tmp_path / "serve.log"
    serve = _start(["serve", "--model", str(tiny_checkpoint("tiny-llama")), "--dtype",
                    "float32", "--backend", "ray", "--ray-address", cluster.address,
                    "--replicas", "1", "--replica-cpus", "0.5", "--replica-resources",
                    "zone_b=1", "--ray-deployment", "real", "--health-interval", "0.2"], log)
    route_log = tmp_path / "route.log"
    route = None
    try:
        url = _listening(serve, log)
        with httpx.Client(base_url=url, timeout=60) as client:
            _wait_until(lambda: client.get("/health").status_code == 200, "the replica",
                        timeout=180)
            answer = client.post("/v1/completions", json=GREEDY)
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-surge-replica"] == "replica-1"
            status = client.get("/router/replicas").json()
        assert status["processes"][0]["node_id"] == _node_of(cluster, "b")
        route = _start(["route", "--backend", "ray", "--ray-address", cluster.address,
                        "--ray-deployment", "real"], route_log)
        route_url = _listening(route, route_log)
        with httpx.Client(base_url=route_url, timeout=60) as client:
            _wait_until(lambda: client.get("/health").status_code == 200, "discovery")
            again = client.post("/v1/completions", json=GREEDY)
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == \
            answer.json()["choices"][0]["text"]
    finally:
        for process in (route, serve):
            if process is not None:
                process.terminate()
                process.wait(60)
    assert serve.returncode == 0, log.read_text()[-3000:]


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "surge.cli", *argv, "--port", "0"],
                                stdout=out, stderr=subprocess.STDOUT)


def _listening(process: subprocess.Popen[bytes], log: Path) -> str:
    import re

    pattern = re.compile(rb"router listening on (http://[\d.]+:\d+)")
    deadline = time.monotonic() + 120
    while not (match := pattern.search(log.read_bytes())):
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)  # polling the log for the address line
    return match.group(1).decode()

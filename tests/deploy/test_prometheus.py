"""deploy/prometheus and deploy/grafana against a real Prometheus scraping real Surge servers.

promtool checks the configs and the alert rules. Then one Prometheus (Debian's package) scrapes
a `surge serve` with every metric family on (an embedding model, the response cache, a request
stage, tenants), a `surge serve --replicas 2` router with its two replicas, and a port where
nothing listens; and every dashboard query, every alert expression and the HPA adapter's rule
are evaluated through its HTTP API. A query that names a metric no scrape produced fails, and
so does a dashboard panel with no data: a renamed metric or label cannot go unnoticed.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy._files import DASHBOARD, PROMETHEUS, resource
from tests.deploy._promql import expand_grafana, metric_names
from tests.server._helpers import ServerProcess, start_server

SCRAPES_NEEDED = 3  # samples per series before rate() and friends have something to say
READY_SECONDS = 60.0
JOBS = {"surge", "surge-router"}


@pytest.mark.slow
def test_promtool_accepts_the_configs_and_the_rules(prometheus_binaries: tuple[str, str],
                                                    tmp_path: Path) -> None:
    _, promtool = prometheus_binaries
    _promtool(promtool, "check", "config", str(PROMETHEUS / "prometheus.yml"))
    _promtool(promtool, "check", "rules", str(PROMETHEUS / "alerts.yml"))
    # Debian's Prometheus is built without Kubernetes discovery: check the rest of the
    # Kubernetes config (relabelings, rule files) with static targets in its place.
    config = yaml.safe_load((PROMETHEUS / "prometheus-kubernetes.yml").read_text())
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
        job["static_configs"] = [{"targets": ["127.0.0.1:9"]}]
    assert {job["job_name"] for job in config["scrape_configs"]} <= JOBS
    shutil.copy(PROMETHEUS / "alerts.yml", tmp_path)
    (tmp_path / "kubernetes.yml").write_text(yaml.safe_dump(config))
    _promtool(promtool, "check", "config", str(tmp_path / "kubernetes.yml"))


def test_promtool_rejects_a_broken_rule(prometheus_binaries: tuple[str, str],
                                        tmp_path: Path) -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    rules["groups"][0]["rules"][0]["expr"] = "sum by (instance (rate(x[5m]))"
    (tmp_path / "broken.yml").write_text(yaml.safe_dump(rules))
    result = subprocess.run([prometheus_binaries[1], "check", "rules",
                             str(tmp_path / "broken.yml")], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode != 0


# -- a real Prometheus scraping real servers -------------------------------------------------


@dataclass
class Stack:
    url: str
    dead_target: str
    known_names: set[str]

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def get(self, path: str, **params: str) -> Any:
        body = httpx.get(f"{self.url}{path}", params=params, timeout=10).json()
        assert body["status"] == "success", (path, body)
        return body["data"]

    def unknown_names(self, expr: str) -> set[str]:
        return metric_names(expr) - self.known_names


@pytest.fixture(scope="module")
def stack(prometheus_binaries: tuple[str, str],
          tiny_checkpoint: Callable[[str], Path],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("prometheus_stack")
    tenants = root / "tenants.toml"
    tenants.write_text("[tenants.limited]\nrequests_per_minute = 1\n")
    llm = tiny_checkpoint("tiny-llama")
    server = start_server(
        llm, root / "server", "--served-model-name", "tiny", "--no-apps",
        "--extra-model", f"emb={tiny_checkpoint('tiny-bert')}", "--response-cache",
        "--stage", "pii-redactor", "--tenant-header", "X-Tenant", "--tenants", str(tenants),
        wait=False)
    # Autoscaling and scale to zero on, so their gauges exist too; no scale-down during the
    # test (a replica gone mid-test would leave series with too few samples).
    router = start_server(llm, root / "router", "--served-model-name", "tiny", "--no-apps",
                          "--replicas", "2", "--min-replicas", "0", "--max-replicas", "2",
                          "--scale-down-delay", "600", "--idle-timeout", "600", wait=False)
    prometheus: subprocess.Popen | None = None
    try:
        server.wait_healthy()
        router.wait_healthy()
        replicas = _wait_for_replicas(router, 2)
        _traffic(server, router)
        dead = f"127.0.0.1:{_free_port()}"
        config = _scrape_config(root, server, router, replicas, dead)
        port = _free_port()
        log = (root / "prometheus.log").open("wb")
        prometheus = subprocess.Popen(
            [prometheus_binaries[0], f"--config.file={config}",
             f"--storage.tsdb.path={root / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        _wait_for_scrapes(url, prometheus, root / "prometheus.log")
        names = set(Stack(url, dead, set()).get("/api/v1/label/__name__/values"))
        yield Stack(url, dead, names)
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(30)
        router.stop()
        server.stop()


def test_every_dashboard_query_names_scraped_metrics_and_shows_data(stack: Stack) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    problems, count = [], 0
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            count += 1
            expr = expand_grafana(target["expr"])
            unknown = stack.unknown_names(expr)
            if unknown:
                problems.append(f"{panel['title']!r}: no such metric {sorted(unknown)}")
            elif not stack.query(expr):
                problems.append(f"{panel['title']!r}: no data for {expr}")
    assert count >= 40
    assert not problems, "\n".join(problems)


def test_the_dashboard_variables_find_their_values(stack: Stack) -> None:
    for variable in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"])
        assert match, variable["query"]
        selector, label = match.groups()
        assert not stack.unknown_names(selector), selector
        series = stack.get("/api/v1/series", **{"match[]": selector})
        assert any(label in labels for labels in series), (selector, label)


def test_every_alert_evaluates_on_scraped_metrics(stack: Stack) -> None:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    alerts = [rule for group in rules for rule in group["rules"]]
    assert {rule["alert"] for rule in alerts} >= {
        "SurgeHighErrorRate", "SurgeHighTimeToFirstToken", "SurgeQueueBacklog",
        "SurgeReplicaDown"}
    for rule in alerts:
        assert not stack.unknown_names(rule["expr"]), (rule["alert"], rule["expr"])
        stack.query(rule["expr"])
    # Prometheus itself evaluated every rule without an error.
    loaded = [rule for group in stack.get("/api/v1/rules")["groups"] for rule in group["rules"]]
    assert {rule["name"] for rule in loaded} == {rule["alert"] for rule in alerts}
    assert all(rule["health"] == "ok" for rule in loaded), loaded


def test_the_replica_down_alert_sees_the_dead_target_only(stack: Stack) -> None:
    rule = next(rule for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
                ["groups"] for rule in group["rules"] if rule["alert"] == "SurgeReplicaDown")
    down = {sample["metric"]["instance"] for sample in stack.query(rule["expr"])}
    assert down == {stack.dead_target}
    active = stack.get("/api/v1/alerts")["alerts"]
    assert any(alert["labels"]["alertname"] == "SurgeReplicaDown"
               and alert["labels"]["instance"] == stack.dead_target for alert in active), active


def test_the_autoscaler_metric_reaches_the_adapter_per_pod(stack: Stack) -> None:
    """prometheus-adapter's rule, as the adapter expands it for the HPA's pods."""
    config = yaml.safe_load(resource("ConfigMap")["data"]["config.yaml"])
    (rule,) = config["rules"]
    series = stack.get("/api/v1/series", **{"match[]": rule["seriesQuery"]})
    assert series and all(s["__name__"] == "surge:num_requests_waiting" for s in series)
    expr = (rule["metricsQuery"].replace("<<.Series>>", series[0]["__name__"])
            .replace("<<.LabelMatchers>>", 'namespace="test",pod=~"surge-server|surge-dead"')
            .replace("<<.GroupBy>>", "pod"))
    assert not stack.unknown_names(expr)
    assert [sample["metric"] for sample in stack.query(expr)] == [{"pod": "surge-server"}]


# -- helpers ---------------------------------------------------------------------------------


def _promtool(promtool: str, *args: str) -> None:
    result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_replicas(router: ServerProcess, count: int) -> list[str]:
    """host:port of the router's replicas, once `count` of them are healthy."""
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        replicas = httpx.get(f"{router.url}/router/replicas", timeout=5).json()["replicas"]
        healthy = [r["url"].removeprefix("http://") for r in replicas if r["healthy"]]
        if len(healthy) >= count:
            return healthy
        time.sleep(0.2)  # polling the router's status
    raise AssertionError(f"{count} healthy replicas not reached:\n{router.log()[-3000:]}")


def _traffic(server: ServerProcess, router: ServerProcess) -> None:
    """Requests that make every family of series exist (tenants, cache, stages, batching,
    a per-tenant refusal), on the server and through the router."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        completion = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4, "temperature": 0}
        assert client.post("/v1/completions", json=completion,
                           headers={"X-Tenant": "a"}).status_code == 200
        for _ in range(2):  # the second is a cache hit
            assert client.post("/v1/chat/completions", json=chat,
                               headers={"X-Tenant": "b"}).status_code == 200
        assert client.post("/v1/embeddings", json={"model": "emb", "input": "hi"}) \
            .status_code == 200
        statuses = [client.post("/v1/completions", json=completion,
                                headers={"X-Tenant": "limited"}).status_code for _ in range(2)]
        assert statuses == [200, 429]
    with httpx.Client(base_url=router.url, timeout=60) as client:
        for _ in range(4):
            response = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi",
                                                            "max_tokens": 4})
            assert response.status_code == 200, response.text


def _scrape_config(root: Path, server: ServerProcess, router: ServerProcess,
                   replicas: list[str], dead: str) -> Path:
    """deploy/prometheus/prometheus.yml with static targets here and a 1 s interval."""
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS / name) for name in config["rule_files"]]
    host = server.url.removeprefix("http://")
    targets = {
        "surge": [{"targets": [host], "labels": {"namespace": "test", "pod": "surge-server"}},
                  {"targets": replicas, "labels": {"namespace": "test", "pod": "replicas"}},
                  {"targets": [dead], "labels": {"namespace": "test", "pod": "surge-dead"}}],
        "surge-router": [{"targets": [router.url.removeprefix("http://")]}],
    }
    assert {job["job_name"] for job in config["scrape_configs"]} == JOBS
    for job in config["scrape_configs"]:
        job.pop("file_sd_configs")
        job["static_configs"] = targets[job["job_name"]]
    path = root / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _wait_for_scrapes(url: str, process: subprocess.Popen, log: Path) -> None:
    """Until every target was scraped SCRAPES_NEEDED times and the rules ran. The traffic was
    sent before Prometheus started, so every series is there from the first scrape on."""
    expr = f'min(count_over_time(up{{job=~"surge|surge-router"}}[1m])) >= {SCRAPES_NEEDED}'
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"prometheus exited {process.returncode}:\n"
                                 f"{log.read_text()[-3000:]}")
        try:  # 503 "Service Unavailable" (not JSON) until Prometheus is ready
            answers = [httpx.get(f"{url}/api/v1/{path}", params=params, timeout=5)
                       for path, params in (("query", {"query": expr}), ("rules", {}))]
            result, rules = (a.json() if a.status_code == 200 else None for a in answers)
        except httpx.TransportError:
            result = rules = None
        if result and rules and result["data"]["result"] and all(
                rule.get("lastEvaluation", "").startswith("2")
                for group in rules["data"]["groups"] for rule in group["rules"]):
            return
        time.sleep(0.5)  # polling Prometheus
    targets = httpx.get(f"{url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    health = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in targets]
    raise AssertionError(f"no {SCRAPES_NEEDED} scrapes within {READY_SECONDS} s: {health}\n"
                         f"{result}\n{log.read_text()[-3000:]}")

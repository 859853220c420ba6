"""`surge serve --replicas 3 --standby-replicas 1` for real: three `surge serve` children (each
with its engine process) behind the router, and one ready standby. A client hanging up aborts
the generation in the replica; kill -9 of one replica under steady load fails no request and
a replacement serves within 10 s (the standby; a cold `surge serve` takes 4-13 s to start on 2
busy cores, so the standby is what makes 10 s a promise), then a new standby starts; the
killed replica's engine does not outlive it; stopping the router leaves no process behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from surge.http.sse import iter_sse_lines
from tests.router._helpers import ClientLoad, process_alive
from tests.server._helpers import metric_value

pytestmark = pytest.mark.slow  # about 50 s: four replicas start, one twice

STARTUP_SECONDS = 120.0
REPLACEMENT_SECONDS = 10.0
_LISTENING = re.compile(rb"router listening on http://127\.0\.0\.1:(\d+)")


@dataclass
class Router:
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def replicas(self) -> list[dict[str, Any]]:
        return httpx.get(f"{self.url}/router/replicas", timeout=5).json()["replicas"]

    def wait_for(self, check: Callable[[], bool], what: str, timeout: float) -> float:
        """Poll until ``check()``; returns the seconds it took."""
        started = time.monotonic()
        while not check():
            assert self.process.poll() is None, f"the router exited:\n{self.log()}"
            assert time.monotonic() - started < timeout, f"no {what} in {timeout} s:\n" \
                f"{self.log()}"
            time.sleep(0.05)  # polling interval
        return time.monotonic() - started


def start_router(model_dir: Path, log_dir: Path, *args: str) -> Router:
    log_path = log_dir / f"router-{time.monotonic_ns()}.log"
    command = [sys.executable, "-m", "surge.cli", "serve", "--model", str(model_dir),
               "--dtype", "float32", "--port", "0", "--num-threads", "1",
               "--health-interval", "0.2", *args]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_SECONDS
    while not (match := _LISTENING.search(log_path.read_bytes())):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"the router never listened:\n{log_path.read_text()}")
        time.sleep(0.05)  # polling the log for the port line
    return Router(process, log_path, int(match.group(1)))


@pytest.fixture(scope="module")
def router(tiny_checkpoint: Callable[[str], Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    proc = start_router(tiny_checkpoint("tiny-llama"), tmp_path_factory.mktemp("router"),
                        "--replicas", "3", "--standby-replicas", "1",
                        "--kv-cache-memory-bytes", str(32 << 20))
    proc.wait_for(lambda: _names(proc, "healthy") == {"replica-1", "replica-2", "replica-3"}
                  and _names(proc, "standby") == {"replica-4"}, "3 healthy replicas and a "
                  "ready standby", STARTUP_SECONDS)
    yield proc
    if proc.process.poll() is None:
        proc.process.kill()
        proc.process.wait(30)


def _names(router: Router, state: str) -> set[str]:
    """Replicas in that state that finished starting."""
    try:
        return {r["name"] for r in router.replicas()
                if r["state"] == state and not r["starting"]}
    except httpx.TransportError:
        return set()


def _replica_url(router: Router, name: str) -> str:
    return next(r["url"] for r in router.replicas() if r["name"] == name)


@pytest.mark.timeout(120)
def test_a_client_leaving_a_stream_aborts_it_in_the_replica(router: Router) -> None:
    body = {"prompt": "a long story", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=router.url, timeout=30) as client, \
            client.stream("POST", "/v1/completions", json=body) as response:
        name = response.headers["x-surge-replica"]
        replica_url = _replica_url(router, name)
        aborts_before = _aborts(replica_url)
        lines = iter_sse_lines(response)
        assert any(next(lines).startswith("data:") for _ in range(4))
    # Hung up mid-stream: the replica aborts the request and frees its KV blocks.
    router.wait_for(lambda: _aborts(replica_url) > aborts_before and _idle(replica_url),
                    "abort in the replica", 20.0)


def _aborts(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return metric_value(text, "surge:request_success_total", finished_reason="abort")


def _idle(url: str) -> bool:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return (metric_value(text, "surge:num_requests_running") == 0
            and metric_value(text, "surge:kv_cache_usage_perc") == 0)


@pytest.mark.timeout(180)
def test_kill_9_of_a_replica_under_load_fails_no_request(router: Router) -> None:
    victim = next(r for r in router.replicas() if r["name"] == "replica-2")
    engine_pid = httpx.get(f"{victim['url']}/health", timeout=5).json()["engine_pid"]
    body = {"prompt": "hello there", "max_tokens": 16, "ignore_eos": True}
    with ClientLoad(router.url, 4, body) as load:
        router.wait_for(lambda: load.served_by("replica-2") >= 2, "traffic to replica-2", 30)
        os.kill(victim["pid"], signal.SIGKILL)
        took = router.wait_for(lambda: load.served_by("replica-4") > 0,
                               "replacement serving traffic", 60.0)
        # A new standby starts cold, while the load goes on.
        router.wait_for(lambda: _names(router, "standby") == {"replica-5"}, "a new standby",
                        STARTUP_SECONDS)
    failed = [result for result in load.results if result[0] != 200]
    assert failed == [], f"{len(failed)} of {len(load.results)} requests failed: {failed[:5]}"
    assert took <= REPLACEMENT_SECONDS, f"the replacement served after {took:.1f} s"
    assert _names(router, "healthy") == {"replica-1", "replica-3", "replica-4"}
    # The killed server's engine process notices its parent is gone and exits.
    router.wait_for(lambda: not process_alive(engine_pid), "engine exit", 10.0)
    metrics = httpx.get(f"{router.url}/metrics", timeout=5).text
    assert metric_value(metrics, "surge:router_scaling_events_total", direction="replace") == 1


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, stack = set(), [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.add(child)
            stack.append(child)
    return found


@pytest.mark.timeout(120)
def test_stopping_the_router_stops_every_replica_and_engine(router: Router) -> None:
    processes = _descendants(router.process.pid)
    assert len(processes) >= 8  # 4 servers + 4 engines (+ multiprocessing helpers)
    router.process.send_signal(signal.SIGTERM)
    assert router.process.wait(60) == 0
    deadline = time.monotonic() + 30
    while (alive := {pid for pid in processes if process_alive(pid)}) and \
            time.monotonic() < deadline:
        time.sleep(0.1)  # polling interval
    assert not alive, f"left behind: {alive}"
    assert "stopping replica-1" in router.log_path.read_text()

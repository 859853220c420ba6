"""Loading, engine crashes and shutdown, each on a server of its own (they break or stop it)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from surge.http.sse import aiter_sse_lines, iter_sse_lines
from tests.server._helpers import ServerProcess, metric_value, start_server

pytestmark = pytest.mark.slow

LONG = {"prompt": "a long story", "max_tokens": 1500, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def restartable(model_dir: Path, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[ServerProcess, list[int]]]:
    """A process-engine server, and the /health statuses seen while it started."""
    server = start_server(model_dir, tmp_path_factory.mktemp("crash"), wait=False)
    statuses = server.wait_healthy()
    yield server, statuses
    server.stop()


@pytest.mark.timeout(180)
def test_health_is_503_while_loading_then_200(
        restartable: tuple[ServerProcess, list[int]]) -> None:
    server, statuses = restartable
    answered = [s for s in statuses if s != 0]
    # The server listens at once; the engine process still imports torch and loads.
    assert answered[0] == 503 and answered[-1] == 200
    assert server.health().json()["engine_pid"] > 0


@pytest.mark.timeout(120)
def test_engine_crash_fails_in_flight_requests_then_restarts(
        restartable: tuple[ServerProcess, list[int]]) -> None:
    server, _ = restartable
    old_pid = server.health().json()["engine_pid"]

    async def crash() -> tuple[httpx.Response, list[str], float]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            plain = asyncio.ensure_future(http.post("/v1/completions", json=LONG))
            async with http.stream("POST", "/v1/completions",
                                   json={**LONG, "stream": True}) as stream:
                lines = aiter_sse_lines(stream)
                first = await anext(lines)
                await _wait_running(http, 2)
                os.kill(old_pid, signal.SIGKILL)
                killed = time.monotonic()
                events = [first] + [line async for line in lines]
            return await plain, [e for e in events if e.startswith("data: ")], killed

    plain, events, killed = asyncio.run(crash())
    assert time.monotonic() - killed < 15, "in-flight requests hung after the crash"
    assert plain.status_code == 503
    assert plain.json()["error"]["code"] == "engine_dead"
    # The error event, then [DONE], as the router ends a stream whose replica failed.
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: "):])
    assert last["error"]["code"] == "engine_dead" and "died" in last["error"]["message"]
    # The supervisor restarts the engine; /health says 503 until it is back.
    assert server.health().status_code == 503
    server.wait_healthy()
    health = server.health().json()
    assert health["engine_pid"] != old_pid and health["engine_restarts"] == 1
    again = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 3})
    assert again.status_code == 200


@pytest.mark.timeout(180)
def test_no_engine_restart_fails_requests_and_exits_nonzero(
        model_dir: Path, tmp_path: Path) -> None:
    server = start_server(model_dir, tmp_path, "--no-engine-restart")
    try:
        pid = server.health().json()["engine_pid"]
        with httpx.stream("POST", f"{server.url}/v1/completions",
                          json={**LONG, "stream": True}, timeout=60) as stream:
            lines = iter_sse_lines(stream)
            next(lines)
            os.kill(pid, signal.SIGKILL)
            events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][len("data: "):])["error"]["code"] == "engine_dead"
        code = server.process.wait(timeout=30)
        assert code != 0
        assert "restarts are off" in server.log()
    finally:
        server.stop(signal.SIGKILL)


@pytest.mark.timeout(180)
def test_sigterm_drains_in_flight_then_exits_zero(model_dir: Path, tmp_path: Path) -> None:
    server = start_server(model_dir, tmp_path, "--drain-timeout", "4", "--max-num-seqs", "4")
    engine_pid = server.health().json()["engine_pid"]
    # The short request takes a seat first and finishes well within the drain; the endless
    # one (16 x 2000 tokens through the 3 seats left) cannot.
    short = {"prompt": "short", "max_tokens": 12, "ignore_eos": True, "stream": True,
             "stream_options": {"include_usage": True}}
    endless = {"prompt": "endless", "max_tokens": 2000, "n": 16, "ignore_eos": True,
               "stream": True}

    async def drain() -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            async def events(body: dict[str, Any], started: asyncio.Event) -> list[dict]:
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    found = []
                    async for line in aiter_sse_lines(response):
                        started.set()
                        if line.startswith("data: {"):
                            found.append(json.loads(line[len("data: "):]))
                    return found

            started = [asyncio.Event(), asyncio.Event()]
            tasks = []
            for body, event in zip((short, endless), started, strict=True):
                tasks.append(asyncio.ensure_future(events(body, event)))
                await event.wait()
            server.process.send_signal(signal.SIGTERM)
            refused = await _wait_refused(server)
            short_events, endless_events = await asyncio.gather(*tasks)
            return short_events, endless_events, refused

    short_events, endless_events, refused = asyncio.run(drain())
    assert refused in (0, 503)  # the listener closed, or draining answers 503
    # finished within the drain
    assert short_events[-1].get("usage", {}).get("completion_tokens") == 12, short_events[-1]
    assert endless_events[-1]["error"]["code"] == "server_shutdown"  # aborted at the timeout
    assert server.process.wait(timeout=30) == 0
    assert _gone(engine_pid), "the engine process outlived the server"


async def _wait_running(http: httpx.AsyncClient, count: int) -> None:
    deadline = time.monotonic() + 20
    while metric_value((await http.get("/metrics")).text, "surge:num_requests_running") < count:
        assert time.monotonic() < deadline, "the requests never started"
        await asyncio.sleep(0.05)  # polling interval


async def _wait_refused(server: ServerProcess) -> int:
    """The status a new request gets once draining began (0: connection refused)."""
    deadline = time.monotonic() + 10
    async with httpx.AsyncClient(timeout=5) as fresh:
        while time.monotonic() < deadline:
            try:
                status = (await fresh.get(f"{server.url}/health",
                                          headers={"Connection": "close"})).status_code
            except httpx.TransportError:
                return 0
            if status != 200:
                return status
            await asyncio.sleep(0.05)  # polling interval
    raise AssertionError("the server kept accepting requests after SIGTERM")


def _gone(pid: int) -> bool:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split()[2]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.05)  # polling interval
    return False

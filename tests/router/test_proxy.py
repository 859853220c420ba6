"""The router over real HTTP against fake replicas: faithful forwarding, spreading, retries,
ejection and re-admission, health checks, draining, 429 handling, unbuffered streams,
disconnects reaching the replica, mid-stream failure, the router's own routes."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from surge.http.sse import iter_sse_lines
from surge.router.app import RouterSettings, build_router
from surge.router.health import HealthConfig
from surge.router.policies import make_policy
from surge.router.proxy import ProxyConfig
from surge.router.replicas import BreakerConfig, Replica, ReplicaSet
from surge.router.retry import RetryConfig
from tests.router._helpers import FakeReplica, RouterThread, json_handler

WAIT = 10.0  # seconds any expected event may take


@pytest.fixture
def replicas() -> Iterator[Callable[..., FakeReplica]]:
    started: list[FakeReplica] = []

    def start(handler: Any = None, health_status: int = 200) -> FakeReplica:
        replica = FakeReplica(handler or json_handler(), health_status).start()
        started.append(replica)
        return replica

    yield start
    for replica in started:
        replica.stop()


def _router(urls: list[str], policy: str = "round_robin", *, breaker: BreakerConfig | None = None,
            retry: RetryConfig | None = None, health: HealthConfig | None = None,
            proxy: ProxyConfig | None = None, fallback: Any = None) -> RouterThread:
    breaker = breaker or BreakerConfig()
    replica_set = ReplicaSet([Replica(url, f"r{i}", breaker_config=breaker)
                              for i, url in enumerate(urls)])
    settings = RouterSettings(retry=retry or RetryConfig(backoff_base=0.001),
                              proxy=proxy or ProxyConfig(),
                              health=health or HealthConfig(path=None))
    return RouterThread(build_router(replica_set, make_policy(policy), settings, fallback))


def _closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there now: connections are refused


def _wait_until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)  # polling interval


# -- forwarding --------------------------------------------------------------------------------


def test_requests_and_answers_pass_through_faithfully(replicas: Callable[..., FakeReplica]
                                                      ) -> None:
    compressed = gzip.compress(b'{"answer": 42}')

    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=compressed, status=201, headers={
            "Content-Type": "application/json", "Content-Encoding": "gzip",
            "X-Custom": "kept", "Set-Cookie": "a=b"})

    replica = replicas(handle)
    body = b'{"prompt": "hi", "max_tokens": 3}'
    with _router([replica.url]) as router, router.client() as client:
        response = client.post("/v1/completions?x=1&y=%20z", content=body, headers={
            "Authorization": "Bearer key", "X-Request-Id": "abc", "Content-Type":
            "application/json", "Connection": "keep-alive, X-Hop", "X-Hop": "dropped",
            "Accept-Encoding": "gzip"})
    seen = replica.seen[0]
    assert (seen.method, seen.path_qs, seen.body) == ("POST", "/v1/completions?x=1&y=%20z",
                                                      body)
    assert seen.headers["Authorization"] == "Bearer key"
    assert seen.headers["X-Request-Id"] == "abc"
    assert seen.headers["X-Forwarded-For"] == "127.0.0.1"
    assert "X-Hop" not in seen.headers  # named in Connection: hop-by-hop
    assert "User-Agent" in seen.headers  # httpx's own, passed on; the router adds none
    assert response.status_code == 201
    assert response.headers["x-custom"] == "kept" and response.headers["set-cookie"] == "a=b"
    assert response.headers["content-encoding"] == "gzip"  # not decompressed on the way
    assert response.headers["x-surge-replica"] == "r0"
    assert json.loads(response.content) == {"answer": 42}  # httpx decompressed it


def test_round_robin_spreads_over_replicas(replicas: Callable[..., FakeReplica]) -> None:
    fakes = [replicas() for _ in range(3)]
    with _router([f.url for f in fakes]) as router, router.client() as client:
        names = [client.post("/v1/completions", json={}).headers["x-surge-replica"]
                 for _ in range(30)]
    assert {name: names.count(name) for name in set(names)} == {"r0": 10, "r1": 10, "r2": 10}


def test_sessions_stick_to_a_replica(replicas: Callable[..., FakeReplica]) -> None:
    fakes = [replicas() for _ in range(4)]
    with _router([f.url for f in fakes], "consistent_hash") as router, \
            router.client() as client:
        for user in ("alice", "bob", "carol"):
            by_header = {client.post("/v1/chat/completions", json={},
                                     headers={"X-Session-ID": user}
                                     ).headers["x-surge-replica"] for _ in range(5)}
            by_field = {client.post("/v1/chat/completions", json={"user": user}
                                    ).headers["x-surge-replica"] for _ in range(5)}
            assert len(by_header) == 1 and by_header == by_field


# -- failover ----------------------------------------------------------------------------------


def test_a_refused_connection_is_retried_on_another_replica(
        replicas: Callable[..., FakeReplica]) -> None:
    good = replicas()
    with _router([_closed_port(), good.url], breaker=BreakerConfig(eject_after=100)) \
            as router, router.client() as client:
        statuses = [client.post("/v1/completions", json={}).status_code for _ in range(20)]
        status = router.status()
        metrics = client.get("/metrics").text
    assert statuses == [200] * 20
    dead = status["replicas"][0]
    assert dead["errors"] == {"connect": dead["failures"]} and dead["failures"] >= 5
    assert dead["retries"] == dead["failures"]
    assert f'surge:router_replica_retries_total{{replica="r0"}} {dead["retries"]}.0' in metrics
    assert 'surge:router_replica_errors_total{kind="connect",replica="r0"}' in metrics


def test_consecutive_failures_eject_and_a_trial_readmits(
        replicas: Callable[..., FakeReplica]) -> None:
    flaky_status = {"value": 503}

    async def flaky(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "down"}}, status=flaky_status["value"])

    bad, good = replicas(flaky), replicas()
    breaker = BreakerConfig(eject_after=2, eject_seconds=0.3)
    with _router([bad.url, good.url], breaker=breaker) as router, router.client() as client:
        assert all(client.post("/v1/completions", json={}).status_code == 200
                   for _ in range(10))
        assert len(bad.seen) == 2  # two failures, then ejected: no more attempts
        assert router.status()["replicas"][0]["breaker"] == "open"
        flaky_status["value"] = 200  # it recovers; after 0.3 s a trial request re-admits it
        _wait_until(lambda: client.post("/v1/completions", json={}).headers[
            "x-surge-replica"] == "r0", "the re-admitted replica to get a request")
        status = router.status()["replicas"][0]
    assert status["breaker"] == "closed" and status["ejections"] == 1


def test_a_500_is_returned_not_retried(replicas: Callable[..., FakeReplica]) -> None:
    broken = replicas(json_handler({"error": {"message": "bug"}}, status=500))
    other = replicas()
    with _router([broken.url, other.url]) as router, router.client() as client:
        responses = [client.post("/v1/completions", json={}) for _ in range(4)]
    failed = [r for r in responses if r.status_code == 500]
    assert len(failed) == 2 and failed[0].json() == {"error": {"message": "bug"}}
    assert len(broken.seen) == 2 and len(other.seen) == 2  # no retries


def test_when_every_attempt_fails_the_last_answer_is_returned(
        replicas: Callable[..., FakeReplica]) -> None:
    fakes = [replicas(json_handler({"error": {"message": f"busy {i}"}}, status=503,
                                   headers={"Retry-After": "7"})) for i in range(3)]
    with _router([f.url for f in fakes], retry=RetryConfig(max_attempts=2)) as router, \
            router.client() as client:
        response = client.post("/v1/completions", json={})
    assert response.status_code == 503 and response.headers["retry-after"] == "7"
    assert sum(len(f.seen) for f in fakes) == 2  # bounded attempts
    assert response.json()["error"]["message"].startswith("busy")


def test_connection_failures_everywhere_give_a_502_in_openai_shape() -> None:
    with _router([_closed_port(), _closed_port()]) as router, router.client() as client:
        response = client.post("/v1/completions", json={})
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "replica_unavailable" and "connect" in error["message"]


def test_the_retry_budget_caps_retries(replicas: Callable[..., FakeReplica]) -> None:
    busy = [replicas(json_handler({"error": {}}, status=503)) for _ in range(2)]
    retry = RetryConfig(max_attempts=2, budget_ratio=0.0, budget_floor_per_second=0.3,
                        budget_window=10.0)  # 3 retries per 10 s, whatever the traffic
    with _router([b.url for b in busy], retry=retry,
                 breaker=BreakerConfig(eject_after=1000)) as router, router.client() as client:
        for _ in range(10):
            assert client.post("/v1/completions", json={}).status_code == 503
        metrics = client.get("/metrics").text
    assert sum(len(b.seen) for b in busy) == 10 + 3
    assert "surge:router_retry_budget_exhausted_total 7.0" in metrics


@pytest.mark.parametrize("on_429", ["retry", "return"])
def test_a_429_is_retried_elsewhere_or_returned(replicas: Callable[..., FakeReplica],
                                               on_429: str) -> None:
    full = replicas(json_handler({"error": {"code": "queue_full"}}, status=429,
                                 headers={"Retry-After": "3"}))
    free = replicas()
    retry = RetryConfig(retry_429=on_429 == "retry")
    with _router([full.url, free.url], retry=retry) as router, router.client() as client:
        responses = [client.post("/v1/completions", json={}) for _ in range(4)]
        status = router.status()["replicas"][0]
    if on_429 == "retry":
        assert [r.status_code for r in responses] == [200] * 4
    else:
        assert sorted(r.status_code for r in responses) == [200, 200, 429, 429]
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.headers["retry-after"] == "3"
    assert status["breaker"] == "closed" and status["failures"] == 0  # busy is not broken


# -- health and draining -----------------------------------------------------------------------


def test_active_checks_take_a_failing_replica_out_and_back(
        replicas: Callable[..., FakeReplica]) -> None:
    sick, well = replicas(), replicas()
    health = HealthConfig(interval=0.05, fail_threshold=2, success_threshold=2)
    with _router([sick.url, well.url], health=health) as router, router.client() as client:
        sick.health_status = 503  # what a draining Surge server answers
        _wait_until(lambda: router.status()["replicas"][0]["state"] == "unhealthy",
                    "the check to mark it unhealthy")
        before = len(sick.seen)
        assert {client.post("/v1/completions", json={}).headers["x-surge-replica"]
                for _ in range(10)} == {"r1"}
        assert len(sick.seen) == before
        sick.health_status = 200
        _wait_until(lambda: router.status()["replicas"][0]["state"] == "healthy",
                    "the check to mark it healthy again")


def test_a_draining_replica_gets_no_new_work(replicas: Callable[..., FakeReplica]) -> None:
    fakes = [replicas(), replicas()]
    with _router([f.url for f in fakes]) as router, router.client() as client:
        next(r for r in router.app.replicas if r.name == "r0").draining = True
        names = {client.post("/v1/completions", json={}).headers["x-surge-replica"]
                 for _ in range(10)}
        assert names == {"r1"} and router.status()["replicas"][0]["state"] == "draining"


def test_health_and_errors_when_no_replica_can_answer(
        replicas: Callable[..., FakeReplica]) -> None:
    fake = replicas()
    with _router([fake.url]) as router, router.client() as client:
        assert client.get("/health").json()["replicas_routable"] == 1
        router.app.replicas.routable(0.0)[0].healthy = False
        health = client.get("/health")
        response = client.post("/v1/completions", json={})
    assert health.status_code == 503
    assert health.json()["error"]["code"] == "no_healthy_replica"
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "no_healthy_replica"


def test_every_replica_at_its_cap_gives_429(replicas: Callable[..., FakeReplica]) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({})

    fake = replicas(slow)
    with _router([fake.url], breaker=BreakerConfig(max_in_flight=1)) as router, \
            router.client() as first, router.client() as second:
        pending = threading.Thread(target=first.post, args=("/v1/completions",),
                                   kwargs={"json": {}})
        pending.start()
        _wait_until(lambda: len(fake.seen) == 1, "the first request to arrive")
        response = second.post("/v1/completions", json={})
        fake.call(release.set)
        pending.join(WAIT)
    assert response.status_code == 429 and response.json()["error"]["code"] == "replicas_busy"


# -- streams -----------------------------------------------------------------------------------


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def test_streams_are_forwarded_as_they_arrive(replicas: Callable[..., FakeReplica]) -> None:
    go_on = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_sse({"n": 1}))
        await go_on.wait()  # the rest only after the client saw the first event
        await response.write(_sse({"n": 2}) + b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    fake = replicas(stream)
    with _router([fake.url]) as router, router.client(timeout=WAIT) as client, \
            client.stream("POST", "/v1/completions", json={"stream": True}) as response:
        lines = iter_sse_lines(response)
        assert next(lines) == 'data: {"n": 1}'  # arrived while the replica still works
        fake.call(go_on.set)
        rest = [line for line in lines if line]
    assert rest == ['data: {"n": 2}', "data: [DONE]"]
    assert response.headers["content-type"] == "text/event-stream"


def _disconnect_recorder() -> tuple[Callable[..., Any], threading.Event, threading.Event]:
    arrived, cancelled = threading.Event(), threading.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        arrived.set()
        try:
            if not json.loads(await request.read()).get("stream"):
                await asyncio.sleep(60)
                return web.json_response({})
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            while True:
                await response.write(_sse({"token": "x"}))
                await asyncio.sleep(0.02)
        except (asyncio.CancelledError, ConnectionResetError):
            cancelled.set()  # the router closed its connection: the replica stops
            raise

    return endless, arrived, cancelled


def test_a_client_leaving_a_stream_cancels_the_replica_request(
        replicas: Callable[..., FakeReplica]) -> None:
    handler, _arrived, cancelled = _disconnect_recorder()
    fake = replicas(handler)
    with _router([fake.url]) as router:
        with router.client(timeout=WAIT) as client, client.stream(
                "POST", "/v1/completions", json={"stream": True}) as response:
            assert next(iter_sse_lines(response)).startswith("data:")
        # The client closed the connection mid-stream.
        assert cancelled.wait(WAIT), "the replica's request was not cancelled"
        _wait_until(lambda: router.status()["replicas"][0]["in_flight"] == 0,
                    "the router to release the request")
        metrics = httpx.get(f"{router.url}/metrics", timeout=5).text
    assert "surge:router_client_disconnects_total 1.0" in metrics


def test_a_client_leaving_a_long_request_cancels_the_replica_request(
        replicas: Callable[..., FakeReplica]) -> None:
    handler, arrived, cancelled = _disconnect_recorder()
    fake = replicas(handler)
    body = b'{"stream": false}'
    with _router([fake.url]) as router:
        with socket.create_connection(("127.0.0.1", router.port), timeout=WAIT) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
            assert arrived.wait(WAIT)
        assert cancelled.wait(WAIT), "the replica's request was not cancelled"


def test_a_replica_failing_mid_stream_ends_it_with_an_error_event(
        replicas: Callable[..., FakeReplica]) -> None:
    async def dies(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_sse({"n": 1}) + b'data: {"n": 2, "half": ')
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()  # the replica dies: connection reset mid-event
        return response

    fake, spare = replicas(dies), replicas()
    with _router([fake.url, spare.url]) as router, router.client(timeout=WAIT) as client:
        with client.stream("POST", "/v1/completions", json={"stream": True}) as response:
            events = [line for line in iter_sse_lines(response) if line]
        status = router.status()["replicas"][0]
    assert events[0] == 'data: {"n": 1}'  # the half event was never forwarded
    error = json.loads(events[1].removeprefix("data: "))["error"]
    assert error["code"] == "replica_failed" and error["type"] == "server_error"
    assert set(error) == {"message", "type", "param", "code"}
    assert events[2:] == ["data: [DONE]"]
    assert len(spare.seen) == 0  # output had started: no retry
    assert status["errors"] == {"disconnect": 1}


def test_a_replica_dying_before_its_json_answer_is_retried(
        replicas: Callable[..., FakeReplica]) -> None:
    async def dies(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        return web.Response()

    with _router([replicas(dies).url, replicas().url]) as router, router.client() as client:
        assert all(client.post("/v1/completions", json={}).status_code == 200
                   for _ in range(6))


def test_a_silent_replica_times_out_and_the_request_is_retried(
        replicas: Callable[..., FakeReplica]) -> None:
    async def hangs(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.json_response({})

    silent, good = replicas(hangs), replicas()
    with _router([silent.url, good.url], proxy=ProxyConfig(read_timeout=0.4)) as router, \
            router.client() as client:
        started = time.monotonic()
        response = client.post("/v1/completions", json={})
        took = time.monotonic() - started
        status = router.status()["replicas"][0]
    assert response.status_code == 200 and response.headers["x-surge-replica"] == "r1"
    assert 0.4 <= took < 5.0
    assert status["errors"] == {"timeout": 1} and status["in_flight"] == 0


# -- the router's own side ---------------------------------------------------------------------


def test_a_too_large_body_gets_413_without_reaching_a_replica(
        replicas: Callable[..., FakeReplica]) -> None:
    fake = replicas()
    with _router([fake.url], proxy=ProxyConfig(max_body_bytes=2048)) as router, \
            router.client() as client:
        response = client.post("/v1/completions", content=b"x" * 4096)
    assert response.status_code == 413
    assert "allowed is at most 2048" in response.json()["error"]["message"]
    assert fake.seen == []


def test_other_paths_go_to_the_fallback_app(replicas: Callable[..., FakeReplica]) -> None:
    lifespan: list[str] = []

    async def ui(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                lifespan.append(message["type"])
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/html")]})
        await send({"type": "http.response.body", "body": f"ui {scope['path']}".encode()})

    fake = replicas()
    with _router([fake.url], fallback=ui) as router, router.client() as client:
        assert client.get("/").text == "ui /"
        assert client.get("/ui/chat").text == "ui /ui/chat"
        assert client.post("/v1/completions", json={}).json() == {"ok": True}
        assert client.get("/health").json()["status"] == "ok"
    assert lifespan == ["lifespan.startup", "lifespan.shutdown"]


def test_unknown_paths_without_a_fallback_get_an_openai_404(
        replicas: Callable[..., FakeReplica]) -> None:
    with _router([replicas().url]) as router, router.client() as client:
        response = client.get("/nope")
    assert response.status_code == 404
    assert "does not exist on the router" in response.json()["error"]["message"]


def test_metrics_are_labelled_per_replica(replicas: Callable[..., FakeReplica]) -> None:
    fakes = [replicas(), replicas()]
    with _router([f.url for f in fakes]) as router, router.client() as client:
        for _ in range(4):
            client.post("/v1/completions", json={})
        text = client.get("/metrics").text
    for name in ("r0", "r1"):
        assert f'surge:router_replica_requests_total{{replica="{name}"}} 2.0' in text
        assert f'surge:router_replica_in_flight{{replica="{name}"}} 0.0' in text
        assert f'surge:router_request_latency_seconds_count{{replica="{name}"}} 2.0' in text
    assert 'surge:router_replicas{state="healthy"} 2.0' in text

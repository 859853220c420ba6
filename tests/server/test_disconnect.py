"""A client that hangs up has its request aborted in the engine and its KV blocks freed."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from surge.http.sse import iter_sse_lines
from tests.server._helpers import ServerProcess, metric_value

# Long enough that the request cannot finish by itself while the test watches.
LONG = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0}


def _metrics(server: ServerProcess) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=10).text


def _wait_idle_after_abort(server: ServerProcess, aborts_before: float) -> str:
    """Poll /metrics until nothing runs, no KV block is held and the abort was counted."""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        text = _metrics(server)
        if (metric_value(text, "surge:num_requests_running") == 0
                and metric_value(text, "surge:kv_cache_usage_perc") == 0
                and _aborts(text) > aborts_before):
            return text
        time.sleep(0.05)  # polling interval
    raise AssertionError(f"the request was not aborted:\n{_metrics(server)}")


def _aborts(text: str) -> float:
    return metric_value(text, "surge:request_success_total", finished_reason="abort")


def _wait_running(server: ServerProcess) -> None:
    deadline = time.monotonic() + 10.0
    while metric_value(_metrics(server), "surge:num_requests_running") < 1:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.05)  # polling interval


@pytest.mark.timeout(120)
def test_stream_disconnect_aborts_in_engine(server: ServerProcess) -> None:
    aborts_before = _aborts(_metrics(server))
    lengths_before = metric_value(_metrics(server), "surge:request_success_total",
                                  finished_reason="length")
    with httpx.Client(base_url=server.url, timeout=30) as http, http.stream(
            "POST", "/v1/completions", json={"prompt": "tell a long story", "stream": True,
                                             **LONG}) as response:
        lines = iter_sse_lines(response)
        data = [line for line in (next(lines) for _ in range(6)) if line.startswith("data:")]
        assert data, "no token arrived before hanging up"
    # The connection is closed here, mid-stream.
    text = _wait_idle_after_abort(server, aborts_before)
    assert metric_value(text, "surge:request_success_total",
                        finished_reason="length") == lengths_before


@pytest.mark.timeout(60)
def test_non_streaming_disconnect_aborts_in_engine(server: ServerProcess) -> None:
    aborts_before = _aborts(_metrics(server))
    body = json.dumps({"prompt": "another long story", **LONG}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        _wait_running(server)
    # The socket is closed while the engine works on the request.
    _wait_idle_after_abort(server, aborts_before)

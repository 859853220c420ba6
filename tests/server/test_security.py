"""API keys (401), per-key request rate limits (429) and per-request timeouts (504)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from surge.cli import build_parser
from surge.entrypoints.serve import settings_from_args
from surge.http.sse import iter_sse_lines
from tests.server._helpers import ServerProcess, metric_value, start_server

RPM = 4
TIMEOUT_S = 1.5
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
# Two waves of 4 sequences of 2000 tokens: 4000 steps, far more than the timeout allows.
SLOW = {"prompt": "a slow one", "max_tokens": 2000, "n": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def locked_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[ServerProcess]:
    server = start_server(
        model_dir, tmp_path_factory.mktemp("locked"), "--engine-mode", "thread",
        "--api-key", "key-a", "--api-key", "key-b", "--api-key", "key-c",
        "--rate-limit-rpm", str(RPM), "--request-timeout", str(TIMEOUT_S),
        "--max-num-seqs", "4")
    yield server
    server.stop()


def _post(server: ServerProcess, path: str, body: dict, key: str | None = None,
          **kwargs: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60,
                      **kwargs)


@pytest.mark.timeout(180)
def test_missing_or_wrong_key_is_401(locked_server: ServerProcess) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "key-a"}):
        response = httpx.post(f"{locked_server.url}/v1/chat/completions", json=CHAT,
                              headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    client = openai.OpenAI(base_url=f"{locked_server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    text = httpx.get(f"{locked_server.url}/metrics").text
    assert metric_value(text, "surge:request_rejected_total", reason="unauthorized") >= 4


@pytest.mark.timeout(30)
def test_every_configured_key_works_and_operations_need_none(
        locked_server: ServerProcess) -> None:
    for key in ("key-a", "key-b"):
        client = openai.OpenAI(base_url=f"{locked_server.url}/v1", api_key=key, max_retries=0)
        out = client.chat.completions.create(model=str(locked_server_model(locked_server)),
                                             **CHAT)
        assert out.choices[0].finish_reason in ("stop", "length")
    assert locked_server.health().status_code == 200
    assert httpx.get(f"{locked_server.url}/metrics").status_code == 200


@pytest.mark.timeout(60)
def test_rate_limit_is_per_key(locked_server: ServerProcess) -> None:
    statuses = [_post(locked_server, "/v1/chat/completions", CHAT, "key-b")
                for _ in range(RPM + 1)]
    limited = [r for r in statuses if r.status_code == 429]
    assert limited, [r.status_code for r in statuses]
    assert all(r.status_code == 200 for r in statuses[:statuses.index(limited[0])])
    error = limited[0].json()["error"]
    assert error["code"] == "rate_limit_exceeded" and f"{RPM} requests" in error["message"]
    assert int(limited[0].headers["Retry-After"]) >= 1
    # Another key has its own bucket.
    assert _post(locked_server, "/v1/chat/completions", CHAT, "key-a").status_code == 200


@pytest.mark.timeout(60)
def test_request_timeout_is_504_and_aborts(locked_server: ServerProcess) -> None:
    started = time.monotonic()
    response = _post(locked_server, "/v1/completions", SLOW, "key-c")
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "request_timeout"
    assert time.monotonic() - started < TIMEOUT_S + 10
    _wait_engine_idle(locked_server)


@pytest.mark.timeout(60)
def test_stream_timeout_ends_with_an_error_event(locked_server: ServerProcess) -> None:
    with httpx.stream("POST", f"{locked_server.url}/v1/completions",
                      json={**SLOW, "stream": True},
                      headers={"Authorization": "Bearer key-c"}, timeout=60) as response:
        assert response.status_code == 200
        events = [line for line in iter_sse_lines(response) if line.startswith("data: ")]
    last = json.loads(events[-1][len("data: "):])
    assert last["error"]["code"] == "request_timeout"
    assert "data: [DONE]" not in events
    _wait_engine_idle(locked_server)


@pytest.mark.timeout(30)
def test_api_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SURGE_API_KEY", "from-env")
    args = build_parser().parse_args(["serve"])
    assert settings_from_args(args).api_keys == ["from-env"]
    args = build_parser().parse_args(["serve", "--api-key", "x", "--api-key", "y"])
    assert settings_from_args(args).api_keys == ["x", "y"]


def locked_server_model(server: ServerProcess) -> str:
    models = httpx.get(f"{server.url}/v1/models", headers={"Authorization": "Bearer key-a"})
    return models.json()["data"][0]["id"]


def _wait_engine_idle(server: ServerProcess) -> None:
    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(f"{server.url}/metrics").text
        if metric_value(text, "surge:num_requests_running") == 0 and metric_value(
                text, "surge:kv_cache_usage_perc") == 0:
            return
        assert time.monotonic() < deadline, "the timed-out request still runs"
        time.sleep(0.05)  # polling interval

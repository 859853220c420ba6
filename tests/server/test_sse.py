"""SSE framing on the wire, byte for byte as OpenAI and vLLM frame it."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest


def _events(client: httpx.Client, path: str, body: dict[str, Any]) -> tuple[httpx.Response,
                                                                              list[str]]:
    with client.stream("POST", path, json=body) as response:
        raw = b"".join(response.iter_bytes()).decode()
    assert raw.endswith("\n\n")
    return response, raw[:-2].split("\n\n")


def _payloads(events: list[str]) -> list[dict[str, Any]]:
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


@pytest.mark.timeout(120)
def test_completion_stream_framing(client: httpx.Client) -> None:
    response, events = _events(client, "/v1/completions", {
        "prompt": "Continuous batching means", "max_tokens": 6, "temperature": 0,
        "ignore_eos": True, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = _payloads(events)
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


@pytest.mark.timeout(60)
def test_chat_stream_role_first_usage_last(client: httpx.Client) -> None:
    _, events = _events(client, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "n": 2,
        "temperature": 0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}})
    chunks = _payloads(events)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 10
    assert all(c["usage"] is None for c in chunks[:-1])
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert all("role" not in m["delta"] for m in mine[1:])
        assert mine[-1]["finish_reason"] == "length"
        assert sum(m["finish_reason"] is not None for m in mine) == 1


@pytest.mark.timeout(60)
def test_stream_error_before_start_is_plain_json(client: httpx.Client) -> None:
    """Refusals come before the stream starts: a JSON error with a status, not SSE."""
    response = client.post("/v1/completions", json={"prompt": "x", "stream": True,
                                                    "max_tokens": 10**6})
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["code"] == "context_length_exceeded"

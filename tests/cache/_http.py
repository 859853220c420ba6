"""Requests to a cached `surge serve`, and what its answers look like."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.server._helpers import ServerProcess, metric_value

CACHE = "x-surge-cache"


def auth(key: str = "key-a") -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def post(server: ServerProcess, path: str, body: dict[str, Any], key: str = "key-a",
         cache_control: str | None = None) -> httpx.Response:
    headers = auth(key) | ({"Cache-Control": cache_control} if cache_control else {})
    response = httpx.post(server.url + path, json=body, headers=headers, timeout=60.0)
    assert response.status_code == 200, response.text
    return response


def chat(text: str, **fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": text}],
            "temperature": 0, "max_tokens": 12, **fields}


def stopping(server: ServerProcess, body: dict[str, Any], path: str = "/v1/chat/completions"
             ) -> dict[str, Any]:
    """``body`` with a stop string its answer reaches, so it ends with ``stop`` (kept)
    rather than ``length`` (never kept). Found by a first answer with ``no-store``."""
    probe = post(server, path, {**body, "stream": False}, cache_control="no-store")
    assert probe.headers[CACHE] in ("miss", "bypass")
    choice = probe.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        return body
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    assert len(text) >= 2, f"a random-weight answer too short to stop in: {text!r}"
    return {**body, "stop": [text[-2:]]}


def events(response: httpx.Response) -> list[Any]:
    """An SSE body's events: JSON payloads, then the string [DONE]."""
    found: list[Any] = []
    for frame in response.text.split("\n\n"):
        if frame:
            assert frame.startswith("data: "), frame
            data = frame[len("data: "):]
            found.append(data if data == "[DONE]" else json.loads(data))
    return found


def without_identity(payloads: list[Any]) -> list[Any]:
    """Events with their id and creation time removed (a hit gets new ones)."""
    return [{k: v for k, v in p.items() if k not in ("id", "created")}
            if isinstance(p, dict) else p for p in payloads]


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10.0).text
    return metric_value(text, name, **labels)

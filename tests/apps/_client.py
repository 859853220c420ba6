"""Talking to the apps' HTTP endpoints the way a program (or the page) does."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from surge.http.sse import iter_sse_lines
from tests.server._helpers import metric_value

API = "/api/apps"
# Sampled with this seed, the tiny checkpoint answers "tell me a long story" with well over a
# thousand tokens before its end-of-text token, so a test can stop it mid-answer (the server's
# limit of 256 tokens once let it finish before the stop, on an AMX Xeon).
LONG_ANSWER = {"content": "tell me a long story", "temperature": 1.0, "seed": 4,
               "max_tokens": 1024}


def new_user() -> dict[str, str]:
    return {"X-User-ID": f"test-{secrets.token_hex(8)}"}


@dataclass
class Turn:
    """What one streamed message gave back."""

    status_code: int
    events: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "".join(e["text"] for e in self.events if e["type"] == "delta")

    @property
    def done(self) -> dict[str, Any]:
        return next(e for e in self.events if e["type"] == "done")


def send_message(http: httpx.Client, session_id: str, body: dict[str, Any],
                 headers: dict[str, str] | None = None) -> Turn:
    with http.stream("POST", f"{API}/chat/sessions/{session_id}/messages", json=body,
                     headers=headers or {}) as response:
        turn = Turn(response.status_code, headers=dict(response.headers))
        if response.status_code != 200:
            response.read()
            turn.error = response.json()["error"]
            return turn
        for line in iter_sse_lines(response):
            if line.startswith("data:"):
                turn.events.append(json.loads(line[5:]))
    return turn


def create_session(http: httpx.Client, headers: dict[str, str]) -> str:
    response = http.post(f"{API}/chat/sessions", json={}, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def wait_engine_idle(http: httpx.Client, aborts_before: float, timeout: float = 15.0) -> str:
    """Poll /metrics until nothing runs and one more abort was counted."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = http.get("/metrics").text
        if (metric_value(text, "surge:num_requests_running") == 0
                and aborts(text) > aborts_before):
            return text
        time.sleep(0.05)  # polling interval
    raise AssertionError(f"the engine did not abort the answer:\n{http.get('/metrics').text}")


def aborts(text: str) -> float:
    return metric_value(text, "surge:request_success_total", finished_reason="abort")

"""Overload's 429s are answered outside the app, from pre-encoded bytes, and only then: with a
real admission queue and the server's own shedding rule."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from surge.http.auth import ApiKeyAuth, RateLimiter
from surge.http.gate import FastRefusals
from surge.server.admission import AdmissionController
from surge.server.app import _QUEUED_ROUTES, _shed_when_full
from surge.server.context import RequestContext
from surge.server.metrics import ServerMetrics

pytestmark = pytest.mark.timeout(10)

KEY = "sk-fast-refusals"
BODY = json.dumps({"model": "m", "prompt": "hi"}).encode()


class App:
    """The rest of the stack: records what reached it and the body it read."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        self.bodies.append(message.get("body", b""))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"served"})


def _context(max_queued: int = 2) -> RequestContext:
    return RequestContext(AdmissionController(max_queued, 10_000), RateLimiter(None, None),
                          ServerMetrics(model_name="m"), None)


def _refusals(app: App, context: RequestContext, keys: list[str] | None = None,
              max_body_bytes: int = 1 << 20) -> FastRefusals:
    return FastRefusals(app, auth=ApiKeyAuth(keys or []), max_body_bytes=max_body_bytes,
                        paths=_QUEUED_ROUTES, busy=context.admission.is_full,
                        shed=_shed_when_full(context))


def _call(asgi: FastRefusals, body: bytes = BODY, path: str = "/v1/completions",
          headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, bytes, int]:
    """(status, body, how many body messages the middleware read)."""
    sent: list[Message] = []
    reads = 0

    async def receive() -> Message:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope: dict[str, Any] = {"type": "http", "method": "POST", "path": path,
                             "headers": [(b"content-type", b"application/json"),
                                         *(headers or [])]}
    asyncio.run(asgi(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), reads


def test_with_room_in_the_queue_requests_pass_unread() -> None:
    app, context = App(), _context()
    status, body, reads = _call(_refusals(app, context))
    assert (status, body) == (200, b"served")
    assert reads == 1 and app.bodies == [BODY]  # the app read it, not the middleware


def test_a_full_queue_is_refused_before_the_app_with_the_same_bytes_each_time() -> None:
    app, context = App(), _context()
    tickets = [context.admit(1) for _ in range(2)]
    asgi = _refusals(app, context)
    first, second = _call(asgi), _call(asgi, path="/v1/chat/completions")
    assert first[0] == 429 and first[:2] == second[:2]
    assert json.loads(first[1])["error"]["code"] == "queue_full_requests"
    assert app.bodies == []  # no request record, no routing, no validation
    for ticket in tickets:
        context.release(ticket)
    assert _call(asgi)[0] == 200  # room again: served


def test_a_user_with_room_of_its_own_passes_with_its_body_replayed() -> None:
    """The body names a tenant (``user``) whose share of the full queue is still free."""
    app, context = App(), _context()
    tickets = [context.admit(1) for _ in range(2)]
    named = json.dumps({"model": "m", "prompt": "hi", "user": "light"}).encode()
    status, _, _ = _call(_refusals(app, context), body=named)
    assert status == 200 and app.bodies == [named]
    for ticket in tickets:
        context.release(ticket)


def test_a_bad_key_is_left_to_the_gate_and_other_routes_pass() -> None:
    app, context = App(), _context()
    tenant = ApiKeyAuth([KEY]).authenticate(f"Bearer {KEY}")  # the key's id is its tenant
    assert tenant is not None
    tickets = [context.admit(1, tenant) for _ in range(2)]
    asgi = _refusals(app, context, keys=[KEY])
    assert _call(asgi, headers=[(b"authorization", b"Bearer wrong")])[0] == 200  # gate: 401
    assert _call(asgi, path="/v1/embeddings")[0] == 200  # not a generation queue
    assert _call(asgi, headers=[(b"authorization", f"Bearer {KEY}".encode())])[0] == 429
    assert len(app.bodies) == 2
    for ticket in tickets:
        context.release(ticket)


def test_a_body_over_the_limit_gets_413_not_a_replay() -> None:
    """The body is read to learn its ``user``: one over the limit is refused as the gate would."""
    app, context = App(), _context()
    tickets = [context.admit(1) for _ in range(2)]
    named = json.dumps({"model": "m", "prompt": "x" * 100, "user": "light"}).encode()
    status, body, _ = _call(_refusals(app, context, max_body_bytes=64), body=named)
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    assert app.bodies == []
    for ticket in tickets:
        context.release(ticket)

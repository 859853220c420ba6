"""Answers: JSON, server-sent events, and the race between a handler's work and the client
hanging up. One place, so every endpoint family (and the router) frames them alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from surge.http.errors import APIError

__all__ = [
    "SSE_DONE",
    "SSE_HEADERS",
    "SSEResponse",
    "client_closed",
    "json_response",
    "send_json",
    "sse_event",
    "unless_disconnected",
    "wait_for_disconnect",
]

T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_DONE = b"data: [DONE]\n\n"
_encode = msgspec.json.encode


def json_response(payload: Any, status: int = 200) -> Response:
    """msgspec is several times faster than the json module on large answers."""
    return Response(_encode(payload), status_code=status, media_type="application/json")


async def send_json(send: Send, payload: Any, status: int = 200) -> None:
    """The same answer for an app that speaks ASGI directly."""
    body = _encode(payload)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def sse_event(payload: Any) -> bytes:
    return b"data: " + _encode(payload) + b"\n\n"


def client_closed() -> APIError:
    # 499 is nginx's "client closed request": nobody reads it, but logs and metrics do.
    return APIError(499, "the client closed the connection", code="client_closed")


async def wait_for_disconnect(receive: Receive) -> None:
    """Returns when the client hangs up. Call only once the body was read (the request
    gate reads it), so nothing but the disconnect can arrive."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """``work``'s result, or ``client_closed()`` raised as soon as the client hangs up; the
    work is cancelled either way once this returns, so nothing keeps running for nobody."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            raise client_closed()
        return task.result()
    finally:
        task.cancel()
        gone.cancel()
        with contextlib.suppress(BaseException):
            await task


class SSEResponse(StreamingResponse):
    """A ``text/event-stream`` answer that always closes its generator, so cleanup (aborting
    engine requests, releasing an admission ticket) runs as soon as the client goes away
    rather than whenever the generator is garbage-collected; ``on_close`` (plain or async)
    runs after it, for a generator closed before its first step (which never ran its own
    cleanup) and for work outside the generator (stopping a chat turn)."""

    def __init__(self, content: AsyncIterator[bytes],
                 on_close: Callable[[], Awaitable[None] | None] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={**SSE_HEADERS, **(headers or {})})
        self._events = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()  # type: ignore[attr-defined]
            if self._on_close is not None:
                result = self._on_close()
                if inspect.isawaitable(result):
                    await result

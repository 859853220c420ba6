"""How the apps reach the model: over HTTP, through an OpenAI-compatible base URL.

Why HTTP rather than calling the engine in-process: the same apps run on a single server and on
the router, and behind the router a chat request must go *through* the router with an
``X-Session-ID`` header so its consistent-hash policy keeps a conversation on one replica (its
prompt prefix stays in that replica's KV cache). By default the base URL is the serving
process's own loopback address, learned once uvicorn has bound its socket
(``app.state.listen_address``); ``--apps-upstream`` points elsewhere.

Errors the model server gives before streaming (401, 429 with Retry-After, 503, ...) come back
as ``APIError`` with the same status, message and headers, so the page can show them as they are.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from surge.http.errors import APIError
from surge.http.sse import aiter_sse_lines

__all__ = [
    "SESSION_HEADER",
    "ChatDelta",
    "ChatStream",
    "LLMBackend",
    "UpstreamStreamError",
    "loopback_url",
]

SESSION_HEADER = "X-Session-ID"
# Headers of the model server's refusals that a client needs to act on.
_PASSED_HEADERS = ("retry-after", "www-authenticate")
# Connecting must be quick; reading may wait long (a queued request), and the model server
# has its own --request-timeout.
_TIMEOUT = httpx.Timeout(10.0, read=None)


def loopback_url(host: str, port: int) -> str:
    """The URL this process can reach a server bound to ``host:port`` at."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass
class ChatDelta:
    text: str
    finish_reason: str | None = None


class UpstreamStreamError(Exception):
    """The model server ended a stream it had started with an error event."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message", "the model server failed mid-answer"))
        self.error = error


class ChatStream:
    """An accepted streaming chat completion: iterate ``deltas()``; ``aclose()`` hangs up,
    which makes the model server abort the generation in its engine."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    @property
    def answered_from_cache(self) -> bool:
        """The model server's response cache answered (X-Surge-Cache: hit or semantic-hit)."""
        return self._response.headers.get("x-surge-cache", "").endswith("hit")

    async def deltas(self) -> AsyncIterator[ChatDelta]:
        async for line in aiter_sse_lines(self._response):
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            event = json.loads(data)
            if "error" in event:
                raise UpstreamStreamError(event["error"])
            for choice in event.get("choices", []):
                content = (choice.get("delta") or {}).get("content") or ""
                if content or choice.get("finish_reason"):
                    yield ChatDelta(content, choice.get("finish_reason"))

    async def aclose(self) -> None:
        await self._response.aclose()


class LLMBackend:
    """One pooled HTTP client to the model server, opened with the app and closed with it."""

    def __init__(self, upstream: str | None, listen_url: Callable[[], str | None]) -> None:
        self._upstream = upstream
        self._listen_url = listen_url
        self._client: httpx.AsyncClient | None = None

    @property
    def base_url(self) -> str:
        url = self._upstream or self._listen_url()
        if url is None:
            raise APIError(503, "the apps do not know the model server's address yet: retry "
                           "in a moment, or start with --apps-upstream URL",
                           code="upstream_unknown", headers={"Retry-After": "1"})
        return url

    async def start(self) -> None:
        # Many users chat at once, each holding a streaming connection to the model server.
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=64)
        self._client = httpx.AsyncClient(timeout=_TIMEOUT, limits=limits)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def open_chat_stream(self, body: dict[str, Any], session_id: str,
                               authorization: str | None) -> ChatStream:
        """POST a streaming chat completion; returns once the server accepted it (200)."""
        headers = {SESSION_HEADER: session_id, **_auth(authorization)}
        request = self.client.build_request("POST", f"{self.base_url}/v1/chat/completions",
                                            json={**body, "stream": True}, headers=headers)
        response = await self._send(request, stream=True)
        if response.status_code != 200:
            await response.aread()
            await response.aclose()
            raise _refusal(response)
        return ChatStream(response)

    async def create_chat(self, body: dict[str, Any], session_id: str,
                          authorization: str | None) -> dict[str, Any]:
        """A non-streaming chat completion's JSON (a tool-call step of the support chat)."""
        headers = {SESSION_HEADER: session_id, **_auth(authorization)}
        request = self.client.build_request("POST", f"{self.base_url}/v1/chat/completions",
                                            json={**body, "stream": False}, headers=headers)
        response = await self._send(request, stream=False)
        if response.status_code != 200:
            raise _refusal(response)
        try:
            answer: dict[str, Any] = response.json()
        except ValueError as exc:
            raise APIError(502, f"the model server answered with invalid JSON: {exc}",
                           code="upstream_error") from exc
        return answer

    async def get(self, path: str, authorization: str | None = None) -> httpx.Response:
        request = self.client.build_request("GET", f"{self.base_url}{path}",
                                            headers=_auth(authorization))
        return await self._send(request, stream=False)

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("LLMBackend.start() was not called (the app is not running)")
        return self._client

    async def _send(self, request: httpx.Request, stream: bool) -> httpx.Response:
        try:
            return await self.client.send(request, stream=stream)
        except httpx.TransportError as exc:
            raise APIError(502, f"the model server at {self.base_url} cannot be reached: "
                           f"{exc!r}", code="upstream_unreachable") from exc


def _auth(authorization: str | None) -> dict[str, str]:
    return {"Authorization": authorization} if authorization else {}


def _refusal(response: httpx.Response) -> APIError:
    """The model server's refusal, as our own error with its status and message."""
    try:
        error = response.json()["error"]
        message, code, param = error["message"], error.get("code"), error.get("param")
    except (ValueError, KeyError, TypeError):
        message = f"the model server answered {response.status_code}: {response.text[:200]}"
        code, param = "upstream_error", None
    headers = {k: v for k, v in response.headers.items() if k.lower() in _PASSED_HEADERS}
    return APIError(response.status_code, message, param=param, code=code, headers=headers)

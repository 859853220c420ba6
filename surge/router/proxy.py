"""The forwarding half of the router: one client request, one or more attempts on replicas.

The request body is read once (bounded) so it can be sent again. The policy picks a replica
among the routable ones; the request goes out on a keep-alive connection of the lean upstream
client (``upstream.py``): what the client sent is what the replica gets, minus hop-by-hop
headers, plus ``X-Forwarded-For``; what the replica answers is what the client gets, plus
``x-surge-replica`` naming it. Nothing is decompressed or re-encoded.

Failover follows one rule: an attempt may be retried on another replica only while nothing has
reached the client. Refused or broken connections and 502/503 answers are retried (bounded
attempts, a retry budget, jittered backoff); so is 429 when ``retry_429`` is set. A JSON answer
is read whole before it is sent, so a replica that dies mid-answer is still retried. A stream
(``text/event-stream``) is forwarded event by event as it arrives; if its replica fails after
the client got the first bytes, the stream ends with an SSE error event in the shape Surge's
server uses (``data: {"error": {...}}``) and ``data: [DONE]``.

The client hanging up cancels the attempt: its connection to the replica is closed, so a Surge
replica aborts the generation and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from starlette.types import Receive, Scope, Send

from surge.config import require
from surge.http.errors import APIError, send_error, sse_error_event
from surge.http.gate import header, read_body
from surge.http.responses import SSE_DONE
from surge.http.tenant import resolve_tenant, tenant_before_body
from surge.router.coldstart import ColdStart
from surge.router.metrics import RouterMetrics
from surge.router.policies import Policy, RequestFacts
from surge.router.replicas import Replica, ReplicaSet
from surge.router.retry import RetryBudget, RetryConfig, backoff_seconds
from surge.router.tiers import TierRouting
from surge.router.upstream import UpstreamError, UpstreamPool, UpstreamResponse

__all__ = ["PROXIED_PREFIXES", "Proxy", "ProxyConfig"]

logger = logging.getLogger(__name__)

PROXIED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
# Never forwarded (RFC 9110 7.6.1), plus what the client library sets itself.
_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"proxy-connection"})
_REQUEST_SKIP = _HOP_BY_HOP | {b"host", b"content-length", b"expect"}
_RETRY_STATUSES = frozenset({502, 503})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
WATCH_DISCONNECT_AFTER = 0.02
_SSE = b"text/event-stream"
_decode = msgspec.json.decode


@dataclass(frozen=True)
class ProxyConfig:
    max_body_bytes: int = 32 << 20
    connect_timeout: float = 5.0
    # Longest silence from a replica (between bytes) before the attempt fails; None: no limit.
    read_timeout: float | None = 600.0
    # Non-stream answers up to this size are read whole before sending (retryable throughout).
    buffer_bytes: int = 16 << 20

    def __post_init__(self) -> None:
        require(self.max_body_bytes >= 1024, "max_body_bytes", self.max_body_bytes,
                "an integer >= 1024")
        require(self.read_timeout is None or self.read_timeout > 0, "read_timeout",
                self.read_timeout, "seconds > 0, or 0 for no limit")


@dataclass
class _Outbound:
    """One client request, ready to send to any replica: only the Host line differs."""

    request_line: bytes  # b"POST /v1/completions?x=y HTTP/1.1\r\nhost: "
    rest: bytes  # b"\r\n" + the forwarded headers + content-length + the blank line
    body: bytes | None
    is_head: bool

    def head(self, replica: Replica) -> bytes:
        return self.request_line + replica.host_header + self.rest


@dataclass
class _Failure:
    """Why an attempt did not answer the client; ``answer`` is the replica's own response,
    when it gave one, so the last failure can be passed on faithfully."""

    replica: Replica
    reason: str
    answer: tuple[int, list[tuple[bytes, bytes]], bytes] | None = None


class Proxy:
    def __init__(self, replicas: ReplicaSet, policy: Policy, retry: RetryConfig,
                 config: ProxyConfig, metrics: RouterMetrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.replicas = replicas
        self.policy = policy
        self.retry = retry
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.budget = RetryBudget(retry, clock)
        metrics.retry_budget_refused = lambda: self.budget.num_refused
        self.pool = UpstreamPool(config.connect_timeout, config.read_timeout)
        # surge.http.tracing.Tracing when tracing is on: a span per request, and its
        # traceparent forwarded to the replica.
        self.tracing: Any = None
        # Scale to zero: holds a request while no replica can take it (set by the app).
        self.cold_start: ColdStart | None = None
        # Replica tiers: critical requests to full precision (set by the app).
        self.tiers: TierRouting | None = None

    def close(self) -> None:
        self.pool.close()

    # -- one client request ------------------------------------------------------------------

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.tracing is not None:
            return await self.tracing.traced(scope, receive, send, self._handle)
        await self._handle(scope, receive, send)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            body = await read_body(scope, receive, self.config.max_body_bytes)
        except APIError as exc:  # 413
            return await send_error(send, exc)
        if body is None:
            return  # the client left while sending
        outbound = _outbound(scope, body)
        facts = self._facts(scope, body)
        if self.tiers is not None:
            facts = dataclasses.replace(facts, tier=self.tiers.wanted(scope["headers"], body))
        if self.cold_start is not None:
            self.cold_start.touch()
        self.budget.record_request()
        await self._forward_until_disconnect(outbound, facts, receive, send)

    async def _forward_until_disconnect(self, outbound: _Outbound, facts: RequestFacts,
                                        receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        exchange = _Exchange(send, receive, task)
        try:
            await self._forward(outbound, facts, exchange.send)
        except asyncio.CancelledError:
            if not exchange.client_gone:
                raise
            task.uncancel()
            self.metrics.client_disconnects.inc()
        finally:
            exchange.close()

    async def _forward(self, outbound: _Outbound, facts: RequestFacts, send: Send) -> None:
        tried: list[Replica] = []
        failure: _Failure | None = None
        for attempt in range(self.retry.max_attempts):
            if failure is not None:
                if not self.budget.try_spend():
                    break
                failure.replica.num_retries += 1
                self.metrics.retries.inc()
                await asyncio.sleep(backoff_seconds(attempt - 1, self.retry))
            replica = self._choose(facts, tried)
            if replica is None and not tried and self.cold_start is not None:
                refusal = await self.cold_start.hold()
                if refusal is not None:
                    return await send_error(send, refusal)
                replica = self._choose(facts, tried)
            if replica is None:
                break
            tried.append(replica)
            failure = await self._attempt(replica, outbound, send)
            if failure is None:
                if self.tiers is not None and facts.tier is not None:
                    self.tiers.served(facts.tier, replica)
                return
            logger.debug("attempt %d on %s failed: %s", attempt + 1, replica.name,
                         failure.reason)
        await self._give_up(failure, send)

    def _choose(self, facts: RequestFacts, tried: list[Replica]) -> Replica | None:
        candidates = self.replicas.routable(self.clock(), tuple(tried))
        if candidates and self.tiers is not None and facts.tier is not None:
            candidates = self.tiers.narrow(candidates, facts.tier)
        return self.policy.choose(candidates, facts) if candidates else None

    async def _give_up(self, failure: _Failure | None, send: Send) -> None:
        if failure is not None and failure.answer is not None:
            status, headers, content = failure.answer
            return await _send_whole(send, status, headers, content, failure.replica)
        if failure is not None:
            self.metrics.no_replica.labels("all_failed").inc()
            return await send_error(send, APIError(
                502, f"no replica could answer: the last one ({failure.replica.name}) failed "
                f"with {failure.reason}", code="replica_unavailable",
                headers={"Retry-After": "1"}))
        reason = self._why_none_routable()
        self.metrics.no_replica.labels(reason.code or "none").inc()
        await send_error(send, reason)

    def _why_none_routable(self) -> APIError:
        now = self.clock()
        live = [r for r in self.replicas if r.healthy and not r.draining]
        cap = live[0].breaker_config.max_in_flight if live else None
        if cap is not None and any(r.in_flight >= cap for r in live) and \
                all(r.in_flight >= cap or not r.is_routable(now) for r in live):
            return APIError(429, f"every replica is at --max-inflight-per-replica ({cap}): "
                            "retry later", code="replicas_busy", headers={"Retry-After": "1"})
        problem = f"; {self.replicas.problem}" if self.replicas.problem else ""
        return APIError(503, f"no healthy replica to send this request to ({len(self.replicas)} "
                        "known, none healthy and admitted now): retry when GET /health "
                        f"answers 200{problem}", code="no_healthy_replica",
                        headers={"Retry-After": "1"})

    # -- one attempt -------------------------------------------------------------------------

    async def _attempt(self, replica: Replica, outbound: _Outbound,
                       send: Send) -> _Failure | None:
        replica.begin()
        started = self.clock()
        try:
            response = await self.pool.request(
                replica.host, replica.port, replica.tls, outbound.head(replica), outbound.body,
                outbound.is_head)
        except asyncio.CancelledError:
            replica.abandoned()
            raise
        except UpstreamError as exc:
            return self._failed(replica, exc)
        try:
            return await self._answer(replica, response, started, send)
        except asyncio.CancelledError:
            replica.abandoned()
            raise
        finally:
            # Reused when complete; closed otherwise, which tells the replica to stop.
            response.release()

    async def _answer(self, replica: Replica, response: UpstreamResponse,
                      started: float, send: Send) -> _Failure | None:
        status = response.status
        if status in _RETRY_STATUSES or (status == 429 and self.retry.retry_429):
            return await self._refused(replica, response, started)
        if _is_stream(response) or not self._fits_buffer(response):
            await self._stream(replica, response, started, send)
            return None
        try:
            content = await response.read()
        except UpstreamError as exc:
            return self._failed(replica, exc)
        self._finished(replica, status, started)
        await _send_whole(send, status, response.headers, content, replica)
        return None

    async def _refused(self, replica: Replica, response: UpstreamResponse,
                       started: float) -> _Failure:
        """A 502/503 (or a 429 to retry): keep the answer in case it is the last one."""
        try:
            content = await response.read()
        except UpstreamError as exc:
            return self._failed(replica, exc)
        status = response.status
        if status == 429:
            replica.succeeded(self.clock() - started)  # busy, not broken
        else:
            replica.failed(f"status_{status}", self.clock())
        return _Failure(replica, f"HTTP {status}", (status, response.headers, content))

    def _failed(self, replica: Replica, error: UpstreamError) -> _Failure:
        replica.failed(error.kind, self.clock())
        return _Failure(replica, f"{error.kind} ({error})")

    def _finished(self, replica: Replica, status: int, started: float) -> None:
        self.metrics.observe_latency(replica, self.clock() - started)
        self._settle(replica, status, started)

    def _settle(self, replica: Replica, status: int, started: float) -> None:
        """The replica answered in full: its status says whether that counts against it."""
        latency = self.clock() - started
        if status >= 500:
            replica.failed(f"status_{status}", self.clock())
        else:
            replica.succeeded(latency)

    def _fits_buffer(self, response: UpstreamResponse) -> bool:
        length = response.content_length
        return length is not None and length <= self.config.buffer_bytes

    async def _stream(self, replica: Replica, response: UpstreamResponse,
                      started: float, send: Send) -> None:
        """Forward the body as it arrives; SSE is cut only at event boundaries, so an error
        event appended after a failure is never glued to half an event."""
        sse = _is_stream(response)
        headers = _response_headers(response.headers, replica, keep_length=not sse)
        await send({"type": "http.response.start", "status": response.status,
                    "headers": headers})
        pending = b""
        first = True
        try:
            async for chunk in response.chunks():
                if first:
                    self.metrics.observe_latency(replica, self.clock() - started)
                    first = False
                if sse:
                    chunk, pending = _complete_events(pending + chunk)
                    if not chunk:
                        continue
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamError as exc:
            replica.failed(exc.kind, self.clock())
            self.metrics.midstream_failures.inc()
            if not sse:
                raise  # the client sees a cut connection: nothing else can be said
            logger.warning("replica %s failed mid-stream: %r", replica.name, exc)
            await send({"type": "http.response.body", "more_body": False,
                        "body": _midstream_error(replica, exc)})
            return
        if first:
            self.metrics.observe_latency(replica, self.clock() - started)
        self._settle(replica, response.status, started)
        await send({"type": "http.response.body", "body": pending, "more_body": False})

    # -- the request's side ------------------------------------------------------------------

    def _facts(self, scope: Scope, body: bytes) -> RequestFacts:
        """Only what the policy uses; the JSON body is parsed only when it must be."""
        if getattr(self.policy, "by_tenant", False):
            return _tenant_facts(scope, body, self.policy.tenant_header)
        if not self.policy.needs_body:
            return _NO_FACTS
        session = header(scope, b"x-session-id")
        if session and self.policy.name == "consistent_hash":
            return RequestFacts(session_key=session)
        try:
            payload = _decode(body) if body else None
        except msgspec.DecodeError:
            payload = None
        if not isinstance(payload, dict):
            return RequestFacts(session_key=session)
        user = payload.get("user")
        return RequestFacts(session_key=session or (user if isinstance(user, str) else None),
                            prompt=_prompt_of(payload))


_NO_FACTS = RequestFacts()


def _tenant_facts(scope: Scope, body: bytes, tenant_header: str | None) -> RequestFacts:
    """The request's tenant as the replica will resolve it (surge.http.tenant; the router
    checks no API key, so a header or the body's ``user``); the body is parsed only when no
    header names the tenant."""
    session = header(scope, b"x-session-id")
    try:
        tenant = tenant_before_body(scope, tenant_header)
        if tenant is None:
            try:
                payload = _decode(body) if body else None
            except msgspec.DecodeError:
                payload = None
            user = payload.get("user") if isinstance(payload, dict) else None
            tenant = resolve_tenant(scope, user if isinstance(user, str) else None, None)
    except APIError:  # a header that names no tenant: the replica answers 400
        tenant = None
    return RequestFacts(session_key=session, tenant=tenant)


def _prompt_of(payload: dict[str, Any]) -> str | list[int] | None:
    """The text (or token ids) whose prefix decides prefix affinity."""
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, int):
            return prompt
        if isinstance(first, str | list):
            return first  # a batch of prompts: the first one decides
    messages = payload.get("messages")
    if isinstance(messages, list):
        return "".join(_message_text(m) for m in messages if isinstance(m, dict))
    return None


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return f"<{message.get('role')}>{content or ''}\n"


class _Exchange:
    """One client's request and answer, for noticing that the client hung up.

    Watching for the disconnect costs a task per request, so it starts only once the answer
    has taken ``WATCH_DISCONNECT_AFTER`` seconds: quick answers (most non-generation calls, and
    the proxy benchmark's) never pay for it, and a slow one is cancelled that much later at
    worst. The send wrapper knows when the answer is complete: uvicorn reports a disconnect
    after that, which must not cancel anything.
    """

    def __init__(self, send: Send, receive: Receive, task: asyncio.Task[Any]) -> None:
        self._send = send
        self._receive = receive
        self._task = task
        self.complete = False
        self.client_gone = False
        self._watcher: asyncio.Future[None] | None = None
        self._timer = asyncio.get_running_loop().call_later(WATCH_DISCONNECT_AFTER, self._watch)

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True
        await self._send(message)

    def close(self) -> None:
        self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()

    def _watch(self) -> None:
        if not self.complete:
            self._watcher = asyncio.ensure_future(self._cancel_on_disconnect())

    async def _cancel_on_disconnect(self) -> None:
        """The body was read, so the next message can only be the client hanging up."""
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if not self.complete:
            self.client_gone = True
            self._task.cancel()


# -- HTTP details ------------------------------------------------------------------------------


def _outbound(scope: Scope, body: bytes) -> _Outbound:
    method: str = scope["method"]
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if raw else scope["path"]
    query = scope.get("query_string", b"")
    target = f"{path}?{query.decode('latin-1')}" if query else path
    parts = [b"\r\n"]
    for name, value in _request_headers(scope):
        parts += [name, b": ", value, b"\r\n"]
    if body or method in _BODY_METHODS:
        parts.append(b"content-length: %d\r\n" % len(body))
    parts.append(b"\r\n")
    return _Outbound(f"{method} {target} HTTP/1.1\r\nhost: ".encode("latin-1"),
                     b"".join(parts), body or None, method == "HEAD")


def _request_headers(scope: Scope) -> list[tuple[bytes, bytes]]:
    forwarded_for = None
    named: frozenset[bytes] = frozenset()  # headers the Connection header calls hop-by-hop
    out = []
    for name, value in scope["headers"]:
        if name in _REQUEST_SKIP:
            if name == b"connection":
                named |= _connection_tokens(value)
            continue
        if name == b"x-forwarded-for":
            forwarded_for = value
            continue
        out.append((name, value))
    if named:
        out = [(name, value) for name, value in out if name not in named]
    client = scope.get("client")
    if client:
        address = client[0].encode("latin-1")
        out.append((b"x-forwarded-for",
                    forwarded_for + b", " + address if forwarded_for else address))
    return out


def _connection_tokens(value: bytes) -> frozenset[bytes]:
    """Headers named in Connection are hop-by-hop too."""
    return frozenset(t for t in (token.strip().lower() for token in value.split(b",")) if t)


def _response_headers(raw: Any, replica: Replica,
                      keep_length: bool = True) -> list[tuple[bytes, bytes]]:
    skip = _HOP_BY_HOP if keep_length else _HOP_BY_HOP | {b"content-length"}
    out = [(name.lower(), value) for name, value in raw if name.lower() not in skip]
    out.append((b"x-surge-replica", replica.name.encode("latin-1", "replace")))
    return out


def _is_stream(response: UpstreamResponse) -> bool:
    return response.content_type.startswith(_SSE)


def _complete_events(data: bytes) -> tuple[bytes, bytes]:
    """(the complete SSE events in data, the incomplete rest)."""
    lf, crlf = data.rfind(b"\n\n"), data.rfind(b"\r\n\r\n")
    end = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
    return data[:end], data[end:]


def _midstream_error(replica: Replica, exc: BaseException) -> bytes:
    error = APIError(502, f"the replica serving this stream ({replica.name}) failed before it "
                     f"ended ({type(exc).__name__}); the output so far is incomplete",
                     code="replica_failed")
    return sse_error_event(error) + SSE_DONE


async def _send_whole(send: Send, status: int, headers: list[tuple[bytes, bytes]],
                      content: bytes, replica: Replica) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": _response_headers(headers, replica)})
    await send({"type": "http.response.body", "body": content})

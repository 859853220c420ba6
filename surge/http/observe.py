"""Where one API request's time went: a record per request, its spans, and who reads it.

An ASGI middleware (``ObservedRequests``) opens a ``RequestRecord`` for every API request
(``/v1/...``, ``/tokenize``, ``/detokenize``, ``/debug/...``) and makes it the current one (a
context variable, so tasks the request spawns see it too). Code on the request's path adds
to it: ``span("tokenization")`` around a piece of work, ``add_span`` with times measured
elsewhere, ``add_engine`` with the engine's timestamps of one generation (queued, scheduled,
first token, finished: ``time.monotonic()``, one clock for every process of a host), and
``set`` for facts such as the model or the token counts. When the answer has been sent the
middleware hands the record to an ``Observer``, which keeps it among the recent ones, writes
one log line for it (``--log-format json``) and exports it as a trace (``--otlp-endpoint``).

Everything is measured with ``time.monotonic()``; turning it into wall-clock time is the
exporter's business. Recording costs a few microseconds a request, so it is always on; the
log line and the trace are only made when asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from surge.http.gate import header, key_id

__all__ = ["RECENT", "EngineTimes", "ObservedRequests", "Observer", "RequestRecord",
           "Span", "TraceExporter", "current_record", "span", "traces_url"]

logger = logging.getLogger(__name__)
request_logger = logging.getLogger("surge.request")

OBSERVED_PREFIXES = ("/v1/", "/tokenize", "/detokenize", "/debug/")
# Finished records kept for the status page (newest last).
RECENT: deque[RequestRecord] = deque(maxlen=256)

_RECORD: ContextVar[RequestRecord | None] = ContextVar("surge_request_record", default=None)


@dataclass(slots=True)
class Span:
    name: str
    start: float
    end: float
    attributes: dict[str, Any]


@dataclass(slots=True)
class EngineTimes:
    """One engine request of an HTTP request (choice ``index``): engine-side timestamps, when
    known, and what the API process saw of it."""

    index: int
    sent: float  # handed to the engine client
    queued: float | None = None  # the engine queued it
    scheduled: float | None = None  # first given a seat: queue time ends, prefill begins
    first_token: float | None = None  # first token sampled
    finished: float | None = None  # finished in the engine (None: aborted here)
    first_received: float | None = None  # first token reached the API process
    last_received: float | None = None
    detokenize_first: float | None = None  # first and last detokenization of an update
    detokenize_last: float | None = None
    detokenize_seconds: float = 0.0  # time spent detokenizing, in all
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    finish_reason: str | None = None
    num_preemptions: int = 0


class RequestRecord:
    """Everything observed about one API request; see the module docstring."""

    __slots__ = ("end", "engine", "fields", "handler_start", "method", "path",
                 "request_id", "response_start", "spans", "start", "status", "traceparent")

    def __init__(self, method: str, path: str, start: float,
                 traceparent: str | None = None) -> None:
        self.method, self.path, self.start = method, path, start
        self.traceparent = traceparent
        self.end: float | None = None
        self.status: int | None = None
        self.handler_start: float | None = None  # the route's code began: the gate is past
        self.response_start: float | None = None  # the answer's first byte left
        self.request_id: str | None = None
        self.fields: dict[str, Any] = {}
        self.spans: list[Span] = []
        self.engine: list[EngineTimes] = []

    def set(self, **fields: Any) -> None:
        """Facts for the log line and the trace's root span (model, tenant, tokens, ...)."""
        self.fields.update(fields)

    def add_span(self, name: str, start: float, end: float, **attributes: Any) -> None:
        self.spans.append(Span(name, start, end, attributes))

    def add_engine(self, times: EngineTimes) -> None:
        self.engine.append(times)

    def mark_handler(self) -> None:
        if self.handler_start is None:
            self.handler_start = time.monotonic()

    @property
    def gate_end(self) -> float | None:
        """When the gate (auth, body, validation) was behind the request: the route's code
        began, or anything it timed did, whichever came first."""
        marks = [self.handler_start, *(s.start for s in self.spans),
                 *(e.sent for e in self.engine)]
        known = [m for m in marks if m is not None]
        return min(known) if known else None

    @property
    def duration(self) -> float:
        return (self.end if self.end is not None else time.monotonic()) - self.start

    def timings(self) -> dict[str, float]:
        """Milliseconds by phase: e2e, gate, each span, and the first engine request's queue,
        prefill, decode, time to first token and detokenization."""
        ms: dict[str, float] = {"e2e": _ms(self.duration)}
        gate_end = self.gate_end
        if gate_end is not None:
            ms["gate"] = _ms(gate_end - self.start)
        for item in self.spans:
            ms[item.name] = ms.get(item.name, 0.0) + _ms(item.end - item.start)
        if self.engine:
            first = self.engine[0]
            decode_end = first.finished or first.last_received
            if first.scheduled is not None:
                ms["queue"] = _ms(first.scheduled - first.sent)
                if first.first_token is not None:
                    ms["prefill"] = _ms(first.first_token - first.scheduled)
            if first.first_token is not None and decode_end is not None:
                ms["decode"] = _ms(decode_end - first.first_token)
            if first.first_received is not None:
                ms["ttft"] = _ms(first.first_received - self.start)
            ms["detokenize"] = _ms(sum(e.detokenize_seconds for e in self.engine))
        if self.response_start is not None and self.end is not None:
            ms["response"] = _ms(self.end - self.response_start)
        return ms


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def current_record() -> RequestRecord | None:
    """The record of the API request this code runs for, if any."""
    return _RECORD.get()


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[None]:
    """Time the block as a span of the current request (nothing outside a request)."""
    record = _RECORD.get()
    if record is None:
        yield
        return
    start = time.monotonic()
    try:
        yield
    finally:
        record.add_span(name, start, time.monotonic(), **attributes)


def traces_url(endpoint: str) -> str:
    """``--otlp-endpoint`` is the collector's base URL (``http://host:4318``) or its full
    traces URL; OTLP/HTTP takes traces at ``/v1/traces``."""
    if not endpoint.startswith(("http://", "https://")):
        raise ValueError(f"--otlp-endpoint={endpoint!r} is invalid: allowed is an http:// or "
                         "https:// URL of an OTLP/HTTP collector, e.g. http://127.0.0.1:4318")
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


class TraceExporter(Protocol):
    def export(self, record: RequestRecord) -> None: ...

    def shutdown(self) -> None: ...


class Observer:
    """What becomes of a finished record: kept among the recent ones, one JSON log line
    (``json_logs``; the prompt and output text only with ``log_prompts``), one trace."""

    def __init__(self, *, json_logs: bool = False, log_prompts: bool = False,
                 tracing: TraceExporter | None = None) -> None:
        self.json_logs = json_logs
        self.log_prompts = log_prompts
        self.tracing = tracing

    def finish(self, record: RequestRecord, scope: Scope) -> None:
        if record.request_id is None:
            given = header(scope, b"x-request-id")
            record.request_id = given or f"req-{uuid.uuid4().hex}"
        if "tenant" not in record.fields:
            tenant = key_id(scope)
            if tenant is not None:
                record.fields["tenant"] = tenant
        RECENT.append(record)
        try:
            if self.json_logs:
                request_logger.info("request", extra={"surge": self.log_fields(record)})
            if self.tracing is not None:
                self.tracing.export(record)
        except Exception:  # observing must never fail a request that succeeded
            logger.exception("could not log or trace request %s", record.request_id)

    def log_fields(self, record: RequestRecord) -> dict[str, Any]:
        fields = {"request_id": record.request_id, "method": record.method,
                  "path": record.path, "status": record.status}
        for name, value in record.fields.items():
            if name in ("prompt", "output") and not self.log_prompts:
                continue
            fields[name] = value
        fields["timings_ms"] = record.timings()
        return fields

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """A service of the app: when the server stops, pending spans are flushed (off the
        event loop: the exporter may wait on the network)."""
        try:
            yield
        finally:
            if self.tracing is not None:
                await asyncio.to_thread(self.tracing.shutdown)


class ObservedRequests:
    """ASGI middleware: one ``RequestRecord`` per API request, finished once the answer is
    sent (or the request failed: 500; or the client left first: 499)."""

    def __init__(self, app: ASGIApp, observer: Observer) -> None:
        self.app = app
        self.observer = observer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(OBSERVED_PREFIXES):
            await self.app(scope, receive, send)
            return
        record = RequestRecord(scope["method"], scope["path"], time.monotonic(),
                               header(scope, b"traceparent"))
        token = _RECORD.set(record)

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                record.response_start = time.monotonic()
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                # The answer is complete when its last bytes are handed over: a proxy in
                # front may have them (and end its own span) before this coroutine resumes.
                record.end = time.monotonic()
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except BaseException:
            record.status = record.status or 500
            raise
        finally:
            if record.end is None:  # failed or abandoned before the answer was complete
                record.end = time.monotonic()
            record.status = record.status or 499  # nothing was sent: the client left
            _RECORD.reset(token)
            self.observer.finish(record, scope)

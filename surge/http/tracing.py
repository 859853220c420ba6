"""OpenTelemetry traces of API requests, exported over OTLP/HTTP (``--otlp-endpoint``).

Imported only when tracing is on: the SDK and its exporter stay out of a server that does
not trace. One trace per request: a W3C ``traceparent`` header from the client (or from the
router in front) makes the server's span its child; the router's own span is the parent of
the replica's, whose ``traceparent`` it rewrites.

The server's spans are made when the request is over, from its ``RequestRecord``: the root
span (the whole request) and, as its children, ``gate`` (auth, body, validation),
``tokenization``, each ``stage:*``, ``admission``, one ``engine`` span per engine request
with ``queue``, ``prefill`` and ``decode`` inside it, ``detokenization`` and ``stream`` (the
answer's bytes leaving). The engine process exports nothing: its timestamps come back with
its outputs, so there is one exporter per API process and no clock to align but
``time.monotonic()``'s, shared by every process of a host.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import Message, Receive, Scope, Send

from surge.http.gate import header
from surge.http.observe import EngineTimes, RequestRecord, traces_url

__all__ = ["Tracing"]

logger = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
# Finished records waiting for their spans to be built; past this many, new ones are dropped
# (counted in ``num_dropped``) rather than grow without bound behind a stalled exporter.
MAX_PENDING_RECORDS = 4096


class Tracing:
    """One tracer provider with a batching OTLP/HTTP exporter. A finished record's spans are
    built on a thread of their own (about ten SDK spans cost a few hundred microseconds: not
    the event loop's to pay), and sent in batches from the exporter's thread."""

    def __init__(self, endpoint: str, service_name: str) -> None:
        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=traces_url(endpoint), timeout=5)))
        self.tracer = self.provider.get_tracer("surge")
        # monotonic seconds + offset = Unix seconds (measured once: both clocks tick alike).
        self._offset = time.time() - time.monotonic()
        self.num_dropped = 0
        self._pending: queue.Queue[RequestRecord | None] = queue.Queue(MAX_PENDING_RECORDS)
        self._builder = threading.Thread(target=self._build_spans, daemon=True,
                                         name="surge-trace-spans")
        self._builder.start()

    def export(self, record: RequestRecord) -> None:
        """Queue a finished request's record; its spans are built on the builder thread."""
        try:
            self._pending.put_nowait(record)
        except queue.Full:
            self.num_dropped += 1

    def shutdown(self) -> None:
        """Build the spans of every queued record, flush them, then stop the exporter."""
        self._pending.put(None)
        self._builder.join(timeout=30)
        self.provider.shutdown()

    def _build_spans(self) -> None:
        while (record := self._pending.get()) is not None:
            try:
                self.export_now(record)
            except Exception:  # one odd record must not end tracing
                logger.exception("could not trace request %s", record.request_id)

    def _ns(self, monotonic: float) -> int:
        return int((monotonic + self._offset) * 1e9)

    # -- the server: a finished record becomes spans ------------------------------------------

    def export_now(self, record: RequestRecord) -> None:
        """The record's spans, made and handed to the exporter on the calling thread."""
        end = record.end if record.end is not None else time.monotonic()
        parent = _PROPAGATOR.extract({"traceparent": record.traceparent}) \
            if record.traceparent else None
        root = self.tracer.start_span(
            f"{record.method} {record.path}", context=parent, kind=SpanKind.SERVER,
            start_time=self._ns(record.start), attributes=_root_attributes(record))
        if record.status is not None and record.status >= 500:
            root.set_status(Status(StatusCode.ERROR, f"HTTP {record.status}"))
        inside = trace.set_span_in_context(root)

        def child(name: str, start: float | None, stop: float | None,
                  context: Any = inside, **attributes: Any) -> Span | None:
            if start is None or stop is None:
                return None
            start, stop = max(start, record.start), min(max(stop, start), end)
            made = self.tracer.start_span(name, context=context, start_time=self._ns(start),
                                          attributes=attributes)
            made.end(end_time=self._ns(max(stop, start)))
            return made

        child("gate", record.start, record.gate_end)
        for item in record.spans:
            child(item.name, item.start, item.end, **_plain(item.attributes))
        first_sent = min((e.sent for e in record.engine), default=None)
        admitted = [s.end for s in record.spans if s.name == "tokenization"]
        if first_sent is not None and admitted:
            child("admission", max(admitted), first_sent)
        for times in record.engine:
            self._engine_spans(times, child, end)
        child("stream", record.response_start, end)
        root.end(end_time=self._ns(end))

    def _engine_spans(self, times: EngineTimes,
                      child: Callable[..., Span | None], end: float) -> None:
        done = times.finished or times.last_received or end
        engine = child("engine", times.sent, done, choice=times.index,
                       prompt_tokens=times.num_prompt_tokens,
                       output_tokens=times.num_output_tokens,
                       finish_reason=times.finish_reason or "abort",
                       preemptions=times.num_preemptions)
        if engine is None:
            return
        inside = trace.set_span_in_context(engine)
        child("queue", times.sent, times.scheduled, inside)
        child("prefill", times.scheduled, times.first_token, inside)
        child("decode", times.first_token, done, inside)
        child("detokenization", times.detokenize_first, times.detokenize_last,
              choice=times.index, busy_seconds=round(times.detokenize_seconds, 6))

    # -- the router: a span around forwarding, its id sent on ---------------------------------

    async def traced(self, scope: Scope, receive: Receive, send: Send,
                     app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        """Run ``app`` (the router's proxy) inside a SERVER span; the request it forwards
        carries that span's ``traceparent``."""
        given = header(scope, b"traceparent")
        parent = _PROPAGATOR.extract({"traceparent": given}) if given else None
        span = self.tracer.start_span(f"route {scope['method']} {scope['path']}",
                                      context=parent, kind=SpanKind.SERVER)
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"traceparent",
                                                                     b"tracestate")]
        headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in carrier.items()]

        async def observed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                span.set_attribute("http.response.status_code", message["status"])
                if message["status"] >= 500:
                    span.set_status(Status(StatusCode.ERROR, f"HTTP {message['status']}"))
            await send(message)

        try:
            await app({**scope, "headers": headers}, receive, observed_send)
        finally:
            span.end()


def _root_attributes(record: RequestRecord) -> dict[str, Any]:
    attributes: dict[str, Any] = {"http.request.method": record.method,
                                  "url.path": record.path,
                                  "surge.request_id": record.request_id or ""}
    if record.status is not None:
        attributes["http.response.status_code"] = record.status
    for name, value in record.fields.items():
        if name not in ("prompt", "output"):  # never user text in a trace
            attributes[f"surge.{name}"] = value
    return _plain(attributes)


def _plain(attributes: dict[str, Any]) -> dict[str, Any]:
    """OTLP attributes are str, bool, int, float or lists of one of them; None is left out."""
    out: dict[str, Any] = {}
    for name, value in attributes.items():
        if value is None:
            continue
        out[name] = value if isinstance(value, str | bool | int | float) else str(value)
    return out

"""One trace across router -> replica -> engine: `surge serve --replicas 1 --max-replicas 2
--otlp-endpoint` (a router in front of one replica) for real, exporting to an OTLP receiver in
the test. The router's span is the child of the client's ``traceparent`` and the parent of the
replica's server span."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from surge.testing.otlp import OTLPReceiver, ReceivedSpan
from tests.router.test_replicated import STARTUP_SECONDS, Router, start_router

pytestmark = pytest.mark.slow  # a router and a replica with its engine start


@pytest.fixture(scope="module")
def traced(tiny_checkpoint: Callable[[str], Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Router, OTLPReceiver]]:
    with OTLPReceiver() as receiver, pytest.MonkeyPatch.context() as patch:
        patch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # router and replica export promptly
        router = start_router(tiny_checkpoint("tiny-llama"), tmp_path_factory.mktemp("traced"),
                              "--replicas", "1", "--max-replicas", "2",
                              "--otlp-endpoint", receiver.endpoint,
                              "--kv-cache-memory-bytes", str(32 << 20))
        try:
            router.wait_for(lambda: _healthy(router), "a healthy replica", STARTUP_SECONDS)
            yield router, receiver
        finally:
            router.process.kill()
            router.process.wait(30)


def _healthy(router: Router) -> bool:
    try:
        return httpx.get(f"{router.url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.timeout(120)
def test_router_replica_and_engine_spans_form_one_trace(
        traced: tuple[Router, OTLPReceiver]) -> None:
    router, receiver = traced
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    response = httpx.post(f"{router.url}/v1/completions", timeout=60, json={
        "prompt": "trace me", "max_tokens": 4, "ignore_eos": True},
        headers={"traceparent": f"00-{trace_id}-{client_span}-01"})
    assert response.status_code == 200

    def complete(spans: list[ReceivedSpan]) -> bool:
        names = {s.name for s in spans if s.trace_id == trace_id}
        return {"route POST /v1/completions", "POST /v1/completions", "decode"} <= names

    spans = [s for s in receiver.wait_for(complete, timeout=30) if s.trace_id == trace_id]
    (routed,) = [s for s in spans if s.name == "route POST /v1/completions"]
    (served,) = [s for s in spans if s.name == "POST /v1/completions"]
    assert routed.service == "surge-router" and served.service == "surge-server"
    assert routed.parent_span_id == client_span
    assert served.parent_span_id == routed.span_id
    assert routed.start_ns <= served.start_ns <= served.end_ns <= routed.end_ns
    assert routed.attributes["http.response.status_code"] == 200
    (engine,) = [s for s in spans if s.name == "engine"]
    assert engine.parent_span_id == served.span_id

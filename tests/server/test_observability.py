"""Tracing, JSON request logs, the profiler and the step breakdown, against a real
`surge serve` (engine in its own process) exporting to a real OTLP/HTTP receiver."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from surge.testing.otlp import OTLPReceiver, ReceivedSpan
from tests.server._helpers import ServerProcess, metric_value, start_server

KEY = "observability-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ENGINE_CHILDREN = {"queue", "prefill", "decode"}
ROOT_CHILDREN = {"gate", "tokenization", "admission", "engine", "detokenization", "stream"}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def observed(model_dir: Path, receiver: OTLPReceiver,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(model_dir, tmp_path_factory.mktemp("observed"),
                        "--served-model-name", "tiny", "--api-key", KEY,
                        "--otlp-endpoint", receiver.endpoint, "--log-format", "json",
                        "--enable-profiler", "--stage", "pii-redactor",
                        env={"OTEL_BSP_SCHEDULE_DELAY": "100"})  # export spans promptly
    yield proc
    proc.stop()


@pytest.fixture
def http(observed: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=observed.url, timeout=60.0, headers=AUTH) as client:
        yield client


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def _trace(receiver: OTLPReceiver, trace_id: str) -> list[ReceivedSpan]:
    def complete(spans: list[ReceivedSpan]) -> bool:
        names = {s.name for s in spans if s.trace_id == trace_id}
        return names >= ROOT_CHILDREN | ENGINE_CHILDREN and any(
            n.startswith("POST ") for n in names)

    return [s for s in receiver.wait_for(complete, timeout=20) if s.trace_id == trace_id]


def _covered(root: ReceivedSpan, children: list[ReceivedSpan]) -> float:
    """The share of the root's time that the union of its children covers."""
    covered, reach = 0, root.start_ns
    for child in sorted(children, key=lambda s: s.start_ns):
        start, end = max(child.start_ns, reach), min(child.end_ns, root.end_ns)
        if end > start:
            covered += end - start
            reach = end
    return covered / (root.end_ns - root.start_ns)


def _check_trace(spans: list[ReceivedSpan], client_span: str) -> None:
    by_id = {s.span_id: s for s in spans}
    (root,) = [s for s in spans if s.name == "POST /v1/chat/completions"]
    assert root.parent_span_id == client_span  # the client's traceparent is its parent
    assert root.service == "surge-server"
    children = [s for s in spans if s.parent_span_id == root.span_id]
    assert {s.name for s in children} >= ROOT_CHILDREN
    (engine,) = [s for s in children if s.name == "engine"]
    inner = {s.name: s for s in spans if s.parent_span_id == engine.span_id}
    assert set(inner) == ENGINE_CHILDREN
    # Engine phases, from the engine process's timestamps, follow one another.
    assert inner["queue"].end_ns == inner["prefill"].start_ns
    assert inner["prefill"].end_ns == inner["decode"].start_ns
    for span in spans:  # every span nests inside its parent
        if span is root:
            continue
        parent = by_id[span.parent_span_id]
        assert parent.start_ns <= span.start_ns <= span.end_ns <= parent.end_ns, span.name
    assert _covered(root, children) >= 0.95
    stages = [s for s in children if s.name == "stage:pii-redactor"]
    assert {s.attributes["kind"] for s in stages} == {"pre", "post"}
    assert root.attributes["surge.model"] == "tiny"
    assert root.attributes["http.response.status_code"] == 200
    assert engine.attributes["output_tokens"] == 8


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_is_one_trace_whose_spans_nest_and_cover_it(
        http: httpx.Client, receiver: OTLPReceiver, stream: bool) -> None:
    traceparent, trace_id, client_span = _traceparent()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": 8, "ignore_eos": True, "stream": stream}
    response = http.post("/v1/chat/completions", json=body,
                         headers={"traceparent": traceparent})
    assert response.status_code == 200
    _check_trace(_trace(receiver, trace_id), client_span)


def _request_lines(log: str) -> list[dict]:
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("logger") == "surge.request"]


def _request_lines_once(observed: ServerProcess, seen: Callable[[list[dict]], bool],
                        timeout: float = 10.0) -> list[dict]:
    """The request lines, once ``seen`` holds of them: a request's line is written after its
    last byte reaches the client (it carries the whole request's timings), so a client that
    reads the log right after an answer can be a moment early."""
    deadline = time.monotonic() + timeout
    while True:
        lines = _request_lines(observed.log())
        if seen(lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)  # polling a file another process appends to, with a deadline


def test_one_json_line_per_request_without_the_prompt(http: httpx.Client,
                                                     observed: ServerProcess) -> None:
    secret = "my very private prompt text 7d1c"
    response = http.post("/v1/completions", json={
        "model": "tiny", "prompt": secret, "max_tokens": 5, "ignore_eos": True})
    assert response.status_code == 200
    answer = response.json()
    refused = httpx.post(f"{observed.url}/v1/completions", json={"prompt": secret},
                         headers={"Authorization": "Bearer wrong"})
    assert refused.status_code == 401
    lines = _request_lines_once(observed, lambda lines: any(
        other["status"] == 401 for other in lines))
    (line,) = [line for line in lines if line["request_id"] == answer["id"]]
    assert line["status"] == 200 and line["model"] == "tiny" and line["path"] == \
        "/v1/completions"
    assert line["prompt_tokens"] == answer["usage"]["prompt_tokens"]
    assert line["completion_tokens"] == answer["usage"]["completion_tokens"] == 5
    assert line["finish_reason"] == "length"
    timings = line["timings_ms"]
    assert {"e2e", "gate", "tokenization", "queue", "prefill", "decode", "ttft"} <= set(timings)
    assert 0 < timings["ttft"] <= timings["e2e"]
    assert any(other["status"] == 401 for other in lines)
    assert secret not in observed.log()  # neither the 200 nor the 401 logged the prompt
    # Every line of the server's log, uvicorn's and the engine process's too, is one JSON
    # object.
    entries = [json.loads(text) for text in observed.log().splitlines() if text.strip()]
    assert any(entry["logger"].startswith("surge.engine") and entry["pid"] != line["pid"]
               for entry in entries)


def test_step_breakdown_is_exported_per_phase(http: httpx.Client) -> None:
    response = http.post("/v1/completions", json={
        "model": "tiny", "prompt": "count", "max_tokens": 4, "ignore_eos": True})
    assert response.status_code == 200
    text = http.get("/metrics").text
    for phase in ("schedule", "forward", "sampling", "output"):
        count = metric_value(text, "surge:engine_step_duration_seconds_count", phase=phase)
        total = metric_value(text, "surge:engine_step_duration_seconds_sum", phase=phase)
        assert count >= 4, phase
        assert total > 0, phase
    assert metric_value(text, "surge:engine_step_duration_seconds_bucket", phase="forward",
                        le="+Inf") == metric_value(
        text, "surge:engine_step_duration_seconds_count", phase="forward")


def test_profile_records_engine_steps_as_a_chrome_trace(observed: ServerProcess,
                                                       http: httpx.Client) -> None:
    unauthorized = httpx.post(f"{observed.url}/debug/profile", json={"num_steps": 2})
    assert unauthorized.status_code == 401
    bad = http.post("/debug/profile", json={"num_steps": 0})
    assert bad.status_code == 400 and "num_steps" in bad.text
    with httpx.Client(base_url=observed.url, timeout=60.0, headers=AUTH) as other:
        generate = threading.Thread(target=lambda: other.post("/v1/completions", json={
            "model": "tiny", "prompt": "go", "max_tokens": 40, "ignore_eos": True}))
        generate.start()
        response = http.post("/debug/profile", json={"num_steps": 3, "max_seconds": 30})
        generate.join()
    assert response.status_code == 200, response.text
    assert response.headers["x-surge-profile-steps"] == "3"
    trace = response.json()
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"surge.step#1", "surge.step#3"} <= names
    assert any(str(name).startswith("aten::") for name in names)  # the model's operators


def test_profile_of_an_idle_engine_ends_at_max_seconds(http: httpx.Client) -> None:
    response = http.post("/debug/profile", json={"num_steps": 5, "max_seconds": 0.5})
    assert response.status_code == 200
    assert response.headers["x-surge-profile-steps"] == "0"
    assert "traceEvents" in response.json()


def test_bench_profile_captures_a_trace_mid_run(observed: ServerProcess, tmp_path: Path) -> None:
    trace = tmp_path / "profile.json"
    result = subprocess.run(
        [sys.executable, "-m", "surge.cli", "bench", "--url", observed.url, "--api-key", KEY,
         "--num-requests", "8", "--concurrency", "4", "--input-len", "16", "--output-len",
         "16", "--profile", str(trace), "--profile-steps", "3", "--no-progress",
         "--output", str(tmp_path / "run.json"), "--no-plots"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"profile: {trace} (3 engine steps)" in result.stdout
    names = {event.get("name") for event in json.loads(trace.read_text())["traceEvents"]}
    assert "surge.step#3" in names
    assert json.loads((tmp_path / "run.json").read_text())["profile"]["steps"] == 3

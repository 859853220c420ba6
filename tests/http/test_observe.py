"""The request record, the JSON log line (prompts only when asked), the OTLP endpoint flag,
and a server without tracing importing no OpenTelemetry SDK."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import pytest

from surge.http.logs import JsonFormatter, configure_logging
from surge.http.observe import EngineTimes, Observer, RequestRecord, span, traces_url

SCOPE = {"type": "http", "headers": [(b"x-request-id", b"given-id")], "state": {}}


def _record() -> RequestRecord:
    t = time.monotonic()
    record = RequestRecord("POST", "/v1/completions", t - 0.5)
    record.handler_start, record.response_start, record.end = t - 0.49, t - 0.1, t
    record.status = 200
    record.set(model="m", prompt="the secret prompt", output=["the secret answer"],
               prompt_tokens=3, completion_tokens=2)
    record.add_span("tokenization", t - 0.48, t - 0.47)
    record.add_engine(EngineTimes(0, t - 0.46, t - 0.46, t - 0.4, t - 0.3, t - 0.11,
                                  first_received=t - 0.29, last_received=t - 0.105))
    return record


def _line(observer: Observer, caplog: pytest.LogCaptureFixture) -> dict:
    formatter = JsonFormatter()
    with caplog.at_level(logging.INFO, logger="surge.request"):
        observer.finish(_record(), SCOPE)
    (entry,) = [r for r in caplog.records if r.name == "surge.request"]
    return json.loads(formatter.format(entry))


def test_the_json_line_has_the_request_and_its_timings_but_no_text(
        caplog: pytest.LogCaptureFixture) -> None:
    line = _line(Observer(json_logs=True), caplog)
    assert line["logger"] == "surge.request" and line["level"] == "info"
    assert line["request_id"] == "given-id"  # the client's X-Request-Id, when no route set one
    assert line["status"] == 200 and line["model"] == "m"
    assert line["prompt_tokens"] == 3 and line["completion_tokens"] == 2
    assert "prompt" not in line and "output" not in line
    timings = line["timings_ms"]
    assert timings["gate"] == pytest.approx(10, abs=0.01)
    assert timings["queue"] == pytest.approx(60, abs=0.01)
    assert timings["prefill"] == pytest.approx(100, abs=0.01)
    assert timings["decode"] == pytest.approx(190, abs=0.01)
    assert timings["ttft"] == pytest.approx(210, abs=0.01)
    assert timings["e2e"] == pytest.approx(500, abs=0.01)


def test_log_prompts_adds_the_text(caplog: pytest.LogCaptureFixture) -> None:
    line = _line(Observer(json_logs=True, log_prompts=True), caplog)
    assert line["prompt"] == "the secret prompt"
    assert line["output"] == ["the secret answer"]


def test_text_logs_write_no_request_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="surge.request"):
        Observer().finish(_record(), SCOPE)
    assert not [r for r in caplog.records if r.name == "surge.request"]


def test_span_outside_a_request_does_nothing() -> None:
    with span("tokenization"):
        pass  # no current record: nothing to add to, nothing raised


def test_json_formatter_writes_exceptions_and_odd_values() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "failed %s", ("it",), sys.exc_info(),
            extra={"surge": {"odd": {1, 2}.__class__}})
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "failed it" and "ValueError: boom" in line["exc"]
    assert line["odd"] == "<class 'set'>"


def test_bad_log_format_and_endpoint_are_named() -> None:
    with pytest.raises(ValueError, match="--log-format='xml' is invalid"):
        configure_logging("info", "xml")
    with pytest.raises(ValueError, match="--otlp-endpoint='collector:4318' is invalid"):
        traces_url("collector:4318")
    assert traces_url("http://c:4318/") == "http://c:4318/v1/traces"
    assert traces_url("https://c/v1/traces") == "https://c/v1/traces"


def test_serve_refuses_a_bad_endpoint_before_loading_anything() -> None:
    result = subprocess.run([sys.executable, "-m", "surge.cli", "serve", "--otlp-endpoint",
                             "grpc://c:4317"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--otlp-endpoint" in result.stderr and "http://" in result.stderr


def test_a_server_without_tracing_imports_no_opentelemetry_sdk() -> None:
    """The SDK, the exporter and its protobufs load only with --otlp-endpoint (FastAPI itself
    imports the OpenTelemetry API, which is not ours to avoid)."""
    code = ("import sys\n"
            "from surge.server.app import ServerSettings, build_app\n"
            "build_app(ServerSettings(log_format='json'))\n"
            "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', "
            "'opentelemetry.exporter', 'opentelemetry.proto', 'google.protobuf'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

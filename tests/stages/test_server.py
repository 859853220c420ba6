"""Stages in a real `surge serve`: a direct answer never reaches the engine, a post-stage that
stops a stream ends it with its own finish reason and frees the KV, a stage that fails is a
500 naming it for that request only, and the built-ins work end to end."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.server._helpers import ServerProcess, metric_value
from tests.stages.conftest import FAQ_HOURS

LONG = {"max_tokens": 1500, "ignore_eos": True, "temperature": 0}


def _chat(server: ServerProcess, text: str, **fields: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": text}], **fields})


def _events(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: {")]


def _metrics(server: ServerProcess) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=10).text


def _engine_requests(text: str) -> float:
    return sum(metric_value(text, "surge:request_success_total", finished_reason=reason)
               for reason in ("stop", "length", "abort", "content_filter",
                              "stopped_by_stage"))


def _wait_idle(server: ServerProcess) -> str:
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        text = _metrics(server)
        if (metric_value(text, "surge:num_requests_running") == 0
                and metric_value(text, "surge:kv_cache_usage_perc") == 0):
            return text
        time.sleep(0.05)  # polling interval
    raise AssertionError(f"the engine still holds the request:\n{_metrics(server)}")


def test_a_direct_answer_never_reaches_the_engine(stage_server: ServerProcess) -> None:
    before = _metrics(stage_server)
    answer = _chat(stage_server, "#answer please")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["choices"][0]["message"]["content"] == "a canned reply from the stage"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert answer.headers["X-Surge-Stage"] == "scripted"
    streamed = _chat(stage_server, "#answer please", stream=True)
    events = _events(streamed)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == (
        "a canned reply from the stage")
    assert streamed.text.rstrip().endswith("data: [DONE]")
    completion = httpx.post(f"{stage_server.url}/v1/completions", timeout=60,
                            json={"prompt": "#answer", "max_tokens": 5})
    assert completion.json()["choices"][0]["text"] == "a canned reply from the stage"
    after = _metrics(stage_server)
    assert _engine_requests(after) == _engine_requests(before)
    assert (metric_value(after, "surge:prompt_tokens_total")
            == metric_value(before, "surge:prompt_tokens_total"))
    assert metric_value(after, "surge:stage_decisions_total", stage="scripted",
                        decision="answer") >= 3


def test_a_post_stage_stop_ends_the_stream_and_frees_the_kv(
        stage_server: ServerProcess) -> None:
    before = metric_value(_metrics(stage_server), "surge:request_success_total",
                          finished_reason="stopped_by_stage")
    streamed = _chat(stage_server, "#stop now", stream=True, **LONG)
    events = _events(streamed)
    assert events[-1]["choices"][0]["finish_reason"] == "stopped_by_stage"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert 0 < len(text) <= 12  # the stage's limit
    whole = _chat(stage_server, "#stop now", **LONG).json()
    assert whole["choices"][0]["finish_reason"] == "stopped_by_stage"
    assert whole["usage"]["completion_tokens"] < 100  # stopped, not run to 1500
    after = _wait_idle(stage_server)
    assert metric_value(after, "surge:request_success_total",
                        finished_reason="stopped_by_stage") == before + 2


def test_a_failing_stage_fails_only_its_request(stage_server: ServerProcess) -> None:
    with ThreadPoolExecutor(3) as pool:
        normal = pool.submit(_chat, stage_server, "hello there", max_tokens=30,
                             ignore_eos=True)
        pre = pool.submit(_chat, stage_server, "#boom")
        post = pool.submit(_chat, stage_server, "#postboom", max_tokens=30)
        streamed = pool.submit(_chat, stage_server, "#postboom", max_tokens=30, stream=True)
    assert normal.result().status_code == 200, normal.result().text
    assert normal.result().json()["usage"]["completion_tokens"] == 30
    for response, stage in ((pre.result(), "scripted"), (post.result(), "Stopper")):
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["code"] == "stage_error" and f"'{stage}'" in error["message"]
    error_events = [e for e in _events(streamed.result()) if "error" in e]
    assert error_events and "'Stopper'" in error_events[0]["error"]["message"]
    _wait_idle(stage_server)
    assert _chat(stage_server, "and after?", max_tokens=2).status_code == 200


def test_refuse_and_route(stage_server: ServerProcess) -> None:
    refused = _chat(stage_server, "#refuse")
    assert refused.status_code == 400
    assert "'scripted'" in refused.json()["error"]["message"]
    routed = _chat(stage_server, "#route", max_tokens=2)
    assert routed.status_code == 200 and routed.json()["model"] == "tiny-small"
    astray = _chat(stage_server, "#badroute", max_tokens=2)
    assert astray.status_code == 500 and astray.json()["error"]["code"] == "stage_error"
    assert "'no-such-model'" in astray.json()["error"]["message"]


def test_the_intent_router_answers_faqs_and_routes(stage_server: ServerProcess) -> None:
    faq = _chat(stage_server, "what time do you open?")
    assert faq.json()["choices"][0]["message"]["content"] == FAQ_HOURS
    assert faq.headers["X-Surge-Stage"] == "intent-router"
    poem = _chat(stage_server, "please write me a poem about the ocean", max_tokens=2)
    assert poem.json()["model"] == "tiny-small"
    other = _chat(stage_server, "explain the tax rules for small companies", max_tokens=2)
    assert other.json()["model"] == "tiny"
    text = _metrics(stage_server)
    assert metric_value(text, "surge:stage_decisions_total", stage="intent-router",
                        decision="answer") >= 1
    assert metric_value(text, "surge:stage_decisions_total", stage="intent-router",
                        decision="route") >= 1


def test_pii_is_redacted_in_prompts_and_in_streamed_output(
        stage_server: ServerProcess) -> None:
    echoed = httpx.post(f"{stage_server.url}/v1/completions", timeout=60, json={
        "prompt": "reach me at jane@corp.example or +1 (555) 123-4567", "echo": True,
        "max_tokens": 1})
    assert echoed.json()["choices"][0]["text"].startswith("reach me at [EMAIL] or [PHONE]")
    # The script stage writes an address and a number 3 characters at a time; the redactor
    # after it sees them split, the output filter after that stops at "darn it".
    streamed = _chat(stage_server, "#script go", stream=True, **LONG)
    events = _events(streamed)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == "mail me at [EMAIL] or [PHONE], "
    assert events[-1]["choices"][0]["finish_reason"] == "content_filter"
    _wait_idle(stage_server)


def test_stage_metrics_are_exported(stage_server: ServerProcess) -> None:
    _chat(stage_server, "hi", max_tokens=1)
    text = _metrics(stage_server)
    for stage in ("scripted", "Sleepy", "intent-router", "pii-redactor", "pii-redactor#2",
                  "output-filter", "Stopper"):
        assert f'surge:stage_duration_seconds_count{{stage="{stage}"}}' in text, stage
    assert metric_value(text, "surge:stage_duration_seconds_count", stage="scripted") >= 1


def test_a_stage_that_cannot_run_on_this_server_stops_it_at_start(
        tiny_checkpoint: Any, tmp_path: Any) -> None:
    """The intent router needs a served embedding model: without one the server exits 2
    at start, saying what to add, rather than failing requests later."""
    import subprocess
    import sys

    examples = tmp_path / "examples.jsonl"
    examples.write_text('{"text": "hi", "intent": "greet"}\n')
    result = subprocess.run(
        [sys.executable, "-m", "surge.cli", "serve", "--model",
         str(tiny_checkpoint("tiny-llama")), "--port", "0", "--num-threads", "1",
         "--engine-mode", "thread", "--stage",
         f'intent-router:{{"examples": "{examples}"}}'],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "the request stage 'intent-router' cannot run on this server" in result.stderr
    assert "--extra-model all-minilm-l6-v2" in result.stderr

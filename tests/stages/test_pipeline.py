"""The stage pipeline in process: decisions, changes written back into the request body,
blocking stages on threads, failures named, the post-stage chain, metrics and observers."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from starlette.requests import Request

from surge.http.errors import APIError
from surge.server.schemas import ChatCompletionRequest, CompletionRequest
from surge.server.stages import StageRun
from surge.stages import Answer, Continue, Refuse, Route, StageRequest, Stop
from surge.stages.pipeline import LoadedStage, StageMetrics, StagePipeline
from tests.stages.sample_stages import Scripted, Sleepy, Stopper


def _request(headers: dict[str, str] | None = None) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions",
                    "headers": raw, "query_string": b""})


def _chat(text: str, **fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "system", "content": "be brief"},
                      {"role": "user", "content": text}], **fields})


def _pipeline(*stages: Any) -> tuple[StagePipeline, CollectorRegistry, list[StageRun]]:
    registry = CollectorRegistry()
    loaded = [LoadedStage(getattr(s, "name", type(s).__name__), s) for s in stages]
    runs: list[StageRun] = []
    return StagePipeline(loaded, StageMetrics(registry, loaded), [runs.append]), registry, runs


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_a_pre_stage_answers_routes_refuses_or_changes_the_request() -> None:
    pipeline, registry, runs = _pipeline(Scripted())

    async def go(text: str) -> Any:
        body = _chat(text)
        return body, await pipeline.before("chat", body, _request())

    body, session = asyncio.run(go("#answer please"))
    assert session.answer is not None and session.answer.text == "a canned reply from the stage"
    assert session.answer.stage == "scripted"
    body, session = asyncio.run(go("#route me"))
    assert session.model == "tiny-small" and session.answer is None
    with pytest.raises(APIError) as refused:
        asyncio.run(go("#refuse"))
    assert refused.value.status == 400 and "'scripted'" in refused.value.message
    body, session = asyncio.run(go("#upper case me"))
    assert body.messages[1].content == "#UPPER CASE ME"
    assert body.messages[0].content == "BE BRIEF"  # every message's text
    body, session = asyncio.run(go("nothing to do"))
    assert body.messages[1].content == "nothing to do" and session.answer is None
    for decision, count in [("answer", 1), ("route", 1), ("refuse", 1), ("continue", 2)]:
        assert _sample(registry, "surge:stage_decisions_total", stage="scripted",
                       decision=decision) == count
    assert _sample(registry, "surge:stage_duration_seconds_count", stage="scripted") == 5
    assert [run.decision for run in runs] == ["answer", "route", "refuse", "continue",
                                              "continue"]
    assert all(run.kind == "pre" and run.end_ns >= run.start_ns for run in runs)


def test_a_failing_stage_is_a_500_naming_it() -> None:
    pipeline, registry, runs = _pipeline(Scripted())
    with pytest.raises(APIError) as failed:
        asyncio.run(pipeline.before("chat", _chat("#boom"), _request()))
    assert failed.value.status == 500 and failed.value.code == "stage_error"
    assert "'scripted'" in failed.value.message and "RuntimeError" in failed.value.message
    assert _sample(registry, "surge:stage_decisions_total", stage="scripted",
                   decision="error") == 1
    assert runs[-1].error is not None and "blew up" in runs[-1].error


def test_a_blocking_stage_runs_in_a_thread_and_the_loop_keeps_going() -> None:
    sleepy = Sleepy(0.3)
    pipeline, _, _ = _pipeline(sleepy)

    async def go() -> int:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        await pipeline.before("chat", _chat("#slow"), _request())
        ticker.cancel()
        return ticks

    assert asyncio.run(go()) >= 10  # the loop ticked while the stage slept 0.3 s
    assert sleepy.threads and all(n.startswith("surge-stage") for n in sleepy.threads)
    assert threading.current_thread().name not in sleepy.threads


def test_completion_prompts_and_params_are_written_back() -> None:
    class Edit:
        def before(self, request: StageRequest) -> Continue:
            request.edit_texts(lambda text: text.replace("secret", "[X]"))
            request.params["max_tokens"] = 3
            return Continue("edited")

    pipeline, registry, _ = _pipeline(Edit())
    body = CompletionRequest.model_validate({"prompt": ["a secret", "no"], "max_tokens": 50})
    asyncio.run(pipeline.before("completions", body, _request()))
    assert body.prompt == ["a [X]", "no"] and body.max_tokens == 3
    assert _sample(registry, "surge:stage_decisions_total", stage="Edit",
                   decision="edited") == 1


def test_request_id_comes_from_the_header_when_sent() -> None:
    seen: list[str] = []

    class Look:
        def before(self, request: StageRequest) -> None:
            seen.append(request.request_id)

    pipeline, _, runs = _pipeline(Look())
    asyncio.run(pipeline.before("chat", _chat("hi"), _request({"X-Request-Id": "abc-1"})))
    assert seen == ["abc-1"] and runs[0].request_id == "abc-1"


def test_post_stages_chain_and_a_stop_flushes_the_later_ones() -> None:
    class Upper:
        blocking = False

        def open(self, request: StageRequest) -> Any:
            class Stream:
                def on_text(self, text: str) -> str:
                    return text.upper()

                def on_end(self) -> str:
                    return ""
            return Stream()

    stopper = Stopper(chars=5, finish_reason="enough")
    pipeline, registry, runs = _pipeline(Upper(), stopper)

    async def go(text: str) -> list[tuple[str, str | None]]:
        session = await pipeline.before("chat", _chat(text), _request())
        post = session.choice_filter()
        assert post is not None
        out = [await post.text(piece, False) for piece in ("ab", "cd", "ef", "gh")]
        out.append(await post.text("", True))
        post.close()
        return out

    assert asyncio.run(go("#stop")) == [("AB", None), ("CD", None), ("E", "enough"),
                                        ("", None), ("", None)]
    assert _sample(registry, "surge:stage_decisions_total", stage="Stopper",
                   decision="stop") == 1
    assert _sample(registry, "surge:stage_decisions_total", stage="Upper",
                   decision="changed") == 1
    assert [(run.stage, run.kind, run.decision) for run in runs] == [
        ("Upper", "post", "changed"), ("Stopper", "post", "stop")]  # no pre-stage here


def test_a_post_stage_failure_is_a_500_naming_it() -> None:
    pipeline, registry, runs = _pipeline(Stopper())

    async def go() -> None:
        session = await pipeline.before("chat", _chat("#postboom"), _request())
        post = session.choice_filter()
        assert post is not None
        try:
            await post.text("hello", False)
        finally:
            post.close()

    with pytest.raises(APIError) as failed:
        asyncio.run(go())
    assert failed.value.status == 500 and "'Stopper'" in failed.value.message
    assert _sample(registry, "surge:stage_decisions_total", stage="Stopper",
                   decision="error") == 1
    assert runs[-1].kind == "post" and runs[-1].decision == "error"


def test_no_post_stage_means_no_filter() -> None:
    pipeline, _, _ = _pipeline(Scripted())

    async def go() -> Any:
        return (await pipeline.before("chat", _chat("hi"), _request())).choice_filter()

    assert asyncio.run(go()) is None


def test_decisions_are_typed() -> None:
    with pytest.raises(ValueError, match="4xx"):
        Refuse("x", status=500)
    assert Stop("r").text == "" and Answer("a").finish_reason == "stop"
    assert Route("m").model == "m"


def test_logprobs_are_refused_when_a_stage_rewrites_the_output() -> None:
    from surge.stages.pii import PIIRedactor

    pipeline, _, _ = _pipeline(PIIRedactor())
    with pytest.raises(APIError) as refused:
        asyncio.run(pipeline.before("chat", _chat("hi", logprobs=True), _request()))
    assert refused.value.status == 400 and refused.value.param == "logprobs"
    assert "'PIIRedactor'" in refused.value.message
    body = CompletionRequest.model_validate({"prompt": "hi", "logprobs": 2})
    with pytest.raises(APIError):
        asyncio.run(pipeline.before("completions", body, _request()))
    asyncio.run(pipeline.before("chat", _chat("hi"), _request()))  # no logprobs: fine
    prompts_only, _, _ = _pipeline(PIIRedactor(outputs=False))
    asyncio.run(prompts_only.before("chat", _chat("hi", logprobs=True), _request()))

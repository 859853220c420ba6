"""Runs the configured stages on each request: the server's ``RequestStages``.

Pre-stages run in order before admission; the request's body is rebuilt only when a stage
changed it. Post-stages filter each choice's text in order: a stage's output is the next
one's input, and when one stops the stream the ones after it flush what they held. Each
stage run is timed (``surge:stage_duration_seconds{stage}``), its decision counted
(``surge:stage_decisions_total{stage,decision}``) and reported to the context's observers.

Stages that block run on a small thread pool of their own, so they never stall the event
loop nor take the threads tokenization uses.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.requests import Request

from surge.http.errors import APIError
from surge.server.schemas import ChatMessage
from surge.server.stages import DirectAnswer, Endpoint, StageRun
from surge.stages.api import (
    Answer,
    Continue,
    PostStream,
    Refuse,
    Route,
    StageRequest,
    Stop,
)

__all__ = ["LoadedStage", "StageMetrics", "StagePipeline", "runs_in_thread"]

logger = logging.getLogger("surge.stages")

# Stages are meant to be fast: most buckets are below a millisecond.
DURATION_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PRE_DECISIONS = ("continue", "answer", "route", "refuse", "error")
POST_DECISIONS = ("pass", "changed", "stop", "error")
# Body fields stages see as ``params`` are every field but these (shown on their own).
_NOT_PARAMS = {"messages", "prompt", "model", "user"}


def runs_in_thread(method: Callable[..., Any], blocking: bool | None) -> bool:
    """``blocking`` decides when the stage says; else a plain ``def`` runs in a thread."""
    if blocking is not None:
        return blocking
    return not inspect.iscoroutinefunction(method)


@dataclass
class LoadedStage:
    """One configured stage: its name (metrics label, error messages) and its object."""

    name: str
    obj: Any
    blocking: bool | None = None
    is_pre: bool = field(init=False)
    is_post: bool = field(init=False)
    # A post-stage that changes or cuts the output: token logprobs would show what it took.
    rewrites_output: bool = field(init=False)

    def __post_init__(self) -> None:
        self.is_pre = callable(getattr(self.obj, "before", None))
        self.is_post = callable(getattr(self.obj, "open", None))
        self.rewrites_output = self.is_post and bool(getattr(self.obj, "rewrites_output",
                                                             False))
        if self.blocking is None:
            self.blocking = getattr(self.obj, "blocking", None)


class StageMetrics:
    def __init__(self, registry: CollectorRegistry, stages: Sequence[LoadedStage]) -> None:
        self.duration = Histogram(
            "surge:stage_duration_seconds", "Time spent in a request stage's own code, per "
            "request (pre-stages) or per choice stream (post-stages).", ["stage"],
            buckets=DURATION_BUCKETS, registry=registry)
        self.decisions = Counter(
            "surge:stage_decisions", "Decisions of request stages: pre-stages continue, "
            "answer, route, refuse (or a label of their own); post-stages pass, changed, "
            "stop; error when the stage raised.", ["stage", "decision"], registry=registry)
        for stage in stages:  # series exist from the start: dashboards see zeros
            self.duration.labels(stage.name)
            for decision in ((PRE_DECISIONS if stage.is_pre else ())
                             + (POST_DECISIONS if stage.is_post else ())):
                self.decisions.labels(stage.name, decision)


class StagePipeline:
    """A ``surge.server.stages.RequestStages`` over ``stages``."""

    def __init__(self, stages: Sequence[LoadedStage], metrics: StageMetrics,
                 observers: list[Callable[[StageRun], None]] | None = None,
                 max_threads: int = 8) -> None:
        self.pre = [s for s in stages if s.is_pre]
        self.post = [s for s in stages if s.is_post]
        self.metrics = metrics
        self.observers = observers if observers is not None else []  # read at each report
        self._executor = ThreadPoolExecutor(max_threads, thread_name_prefix="surge-stage")
        self._pre_threads = {s.name: runs_in_thread(s.obj.before, s.blocking)
                             for s in self.pre}
        self._rewriter = next((s.name for s in self.post if s.rewrites_output), None)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def before(self, endpoint: Endpoint, body: Any, request: Request) -> _Session:
        if self._rewriter is not None and getattr(body, "logprobs", None) not in (None, False):
            raise APIError(400, f"'logprobs' cannot be asked of this server: its request "
                           f"stage {self._rewriter!r} changes the output text, and token "
                           "logprobs would show what it took out; allowed is no logprobs",
                           param="logprobs", code="logprobs_unavailable")
        view = _view_of(endpoint, body, request)
        before = (_snapshot(view))
        session = _Session(self, view)
        for stage in self.pre:
            decision = await self._run_pre(stage, view)
            if isinstance(decision, Answer):
                session.answer = DirectAnswer(decision.text, decision.finish_reason,
                                              stage.name)
                return session  # the engine never sees it: later stages have nothing to do
            if isinstance(decision, Route):
                session.model = decision.model
            elif isinstance(decision, Refuse):
                raise APIError(decision.status, f"refused by the request stage "
                               f"{stage.name!r}: {decision.message}", code=decision.code)
        if _snapshot(view) != before:
            _write_back(view, body, stage_names=[s.name for s in self.pre])
        return session

    async def _run_pre(self, stage: LoadedStage, view: StageRequest) -> Any:
        start_ns, started = time.time_ns(), time.perf_counter()
        label, error = "continue", None
        try:
            if self._pre_threads[stage.name]:
                loop = asyncio.get_running_loop()
                decision = await loop.run_in_executor(self._executor, stage.obj.before, view)
            else:
                decision = stage.obj.before(view)
            if inspect.isawaitable(decision):
                decision = await decision
            label = _pre_label(stage, decision)
            return decision
        except APIError:
            label = "refuse"
            raise
        except Exception as exc:
            label, error = "error", f"{type(exc).__name__}: {exc}"
            raise stage_failed(stage.name, exc) from exc
        finally:
            seconds = time.perf_counter() - started
            self._report(StageRun(stage.name, "pre", view.request_id, start_ns,
                                  time.time_ns(), seconds, label, error))

    def _report(self, run: StageRun) -> None:
        self.metrics.duration.labels(run.stage).observe(run.duration_s)
        self.metrics.decisions.labels(run.stage, run.decision).inc()
        for observe in self.observers:
            try:
                observe(run)
            except Exception:  # an observer never fails a request
                logger.exception("stage observer %r failed", observe)


def stage_failed(name: str, exc: BaseException) -> APIError:
    logger.error("request stage %r failed", name, exc_info=exc)
    return APIError(500, f"the request stage {name!r} failed ({type(exc).__name__}); the "
                    "server log has the details", code="stage_error")


def _pre_label(stage: LoadedStage, decision: Any) -> str:
    if decision is None:
        return "continue"
    if isinstance(decision, Continue):
        return decision.label
    if isinstance(decision, Answer):
        return "answer"
    if isinstance(decision, Route):
        return "route"
    if isinstance(decision, Refuse):
        return "refuse"
    raise TypeError(f"before() returned {decision!r}: allowed is None, Continue, Answer, "
                    "Route or Refuse")


@dataclass
class _Session:
    """A ``surge.server.stages.StageSession``."""

    pipeline: StagePipeline
    view: StageRequest
    answer: DirectAnswer | None = None
    model: str | None = None

    def choice_filter(self) -> _ChoiceFilter | None:
        if not self.pipeline.post:
            return None
        streams = []
        for stage in self.pipeline.post:
            try:
                stream = stage.obj.open(self.view)
            except Exception as exc:
                raise stage_failed(stage.name, exc) from exc
            if stream is not None:
                streams.append(_Stream(stage, stream))
        return _ChoiceFilter(self.pipeline, self.view.request_id, streams) if streams else None


class _Stream:
    """One post-stage's stream of one choice, with its time and decision."""

    def __init__(self, stage: LoadedStage, stream: PostStream) -> None:
        self.stage = stage
        self.stream = stream
        self.text_mode = _mode(stream.on_text, stage.blocking)
        self.end_mode = _mode(stream.on_end, stage.blocking)
        self.start_ns = 0
        self.seconds = 0.0
        self.decision = "pass"
        self.error: str | None = None

    async def call(self, executor: ThreadPoolExecutor, end: bool, text: str = "") -> str | Stop:
        self.start_ns = self.start_ns or time.time_ns()
        started = time.perf_counter()
        method, mode = ((self.stream.on_end, self.end_mode) if end
                        else (self.stream.on_text, self.text_mode))
        args = () if end else (text,)
        try:
            if mode is _INLINE:  # the common case, kept cheap: one call per streamed piece
                result = method(*args)
            elif mode is _AWAIT:
                result = await method(*args)
            else:
                result = await asyncio.get_running_loop().run_in_executor(
                    executor, method, *args)
                if inspect.isawaitable(result):
                    result = await result
        except Exception as exc:
            self.decision, self.error = "error", f"{type(exc).__name__}: {exc}"
            raise stage_failed(self.stage.name, exc) from exc
        finally:
            self.seconds += time.perf_counter() - started
        if type(result) is str:
            if self.decision == "pass" and result != text:
                self.decision = "changed"
            return result
        if isinstance(result, Stop):
            self.decision = "stop"
            return result
        if isinstance(result, str):
            return result
        self.decision = "error"
        raise stage_failed(self.stage.name, TypeError(
            f"on_text/on_end returned {result!r}: allowed is a str or Stop"))


_INLINE, _AWAIT, _THREAD = "inline", "await", "thread"


def _mode(method: Callable[..., Any], blocking: bool | None) -> str:
    if runs_in_thread(method, blocking):
        return _THREAD
    return _AWAIT if inspect.iscoroutinefunction(method) else _INLINE


class _ChoiceFilter:
    """A ``surge.server.stages.ChoiceFilter``: the post-stages in a chain."""

    def __init__(self, pipeline: StagePipeline, request_id: str,
                 streams: list[_Stream]) -> None:
        self._pipeline = pipeline
        self._request_id = request_id
        self._streams = streams
        self._done = False

    async def text(self, text: str, final: bool) -> tuple[str, str | None]:
        if self._done:
            return "", None
        executor = self._pipeline._executor
        out, stop = text, None
        for stream in self._streams:
            ending = final or stop is not None
            piece = await stream.call(executor, False, out) if out else ""
            if isinstance(piece, Stop):
                stop = stop or piece.finish_reason  # the first stage to stop names it
                out = piece.text
                continue
            if ending:  # flush what this stage held back
                tail = await stream.call(executor, True)
                if isinstance(tail, Stop):
                    stop = stop or tail.finish_reason
                    tail = tail.text
                piece += tail
            out = piece
        self._done = final or stop is not None
        return out, stop

    def close(self) -> None:
        for stream in self._streams:
            if stream.start_ns:
                self._pipeline._report(StageRun(
                    stream.stage.name, "post", self._request_id, stream.start_ns,
                    time.time_ns(), stream.seconds, stream.decision, stream.error))


# -- the request as stages see it ------------------------------------------------------------


def _view_of(endpoint: Endpoint, body: Any, request: Request) -> StageRequest:
    messages = ([m.model_dump(exclude_none=True) for m in body.messages]
                if endpoint == "chat" else None)
    params = {k: v for k, v in body.__dict__.items() if k not in _NOT_PARAMS}
    if body.model_extra:
        params.update(body.model_extra)
    headers = request.headers
    return StageRequest(endpoint, body.model, messages,
                        None if endpoint == "chat" else body.prompt, params, body.user,
                        headers, headers.get("x-request-id") or uuid.uuid4().hex[:16])


def _snapshot(view: StageRequest) -> tuple[Any, ...]:
    """What a stage may change, copied deep enough to compare after the stages ran."""
    messages = None if view.messages is None else [
        {**m, "content": [dict(p) for p in m["content"]]}
        if isinstance(m.get("content"), list) else dict(m) for m in view.messages]
    prompt = list(view.prompt) if isinstance(view.prompt, list) else view.prompt
    return messages, prompt, dict(view.params)


def _write_back(view: StageRequest, body: Any, stage_names: list[str]) -> None:
    """The stages' changes into the request body (a malformed change is their failure)."""
    try:
        if view.messages is not None:
            body.messages = [ChatMessage.model_validate(m) for m in view.messages]
        else:
            body.prompt = view.prompt
        for key, value in view.params.items():
            if getattr(body, key, None) is not value:
                setattr(body, key, value)
    except Exception as exc:
        raise stage_failed(", ".join(stage_names), exc) from exc

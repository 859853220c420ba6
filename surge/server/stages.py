"""Where request stages plug into the generation path: before admission a request goes
through the context's ``RequestStages`` (which may change it, answer it, send it to another
served model, or refuse it), and each choice's text goes through a per-choice filter as it
streams (which may change it, hold some back, or stop the stream with its own finish reason).

The server knows only this protocol; the stages themselves (user classes, the built-in intent
router, PII redactor and output filter) are a feature (``surge.stages``) that sets
``RequestContext.stages`` when it mounts. Without it, ``NO_STAGES`` returns ``NO_SESSION``
and the request path is unchanged.

Every stage run is reported as a ``StageRun`` to ``RequestContext.stage_observers`` (tracing
makes a span of each).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from starlette.requests import Request
from starlette.responses import Response

from surge.http.errors import APIError
from surge.http.responses import SSE_DONE, SSEResponse, json_response, sse_event

if TYPE_CHECKING:
    from surge.server.completions import OpenAIServingCompletions
    from surge.server.models import ServedModels

__all__ = [
    "NO_SESSION",
    "NO_STAGES",
    "ChoiceFilter",
    "DirectAnswer",
    "RequestStages",
    "StageRun",
    "StageSession",
    "direct_response",
    "run_pre_stages",
]

Endpoint = Literal["chat", "completions"]


@dataclass(frozen=True)
class StageRun:
    """One stage's work on one request (a pre-stage) or one choice's stream (a post-stage).

    ``start_ns``/``end_ns`` are wall-clock (``time.time_ns``); ``duration_s`` is the time
    spent in the stage's own code (for a post-stage, summed over the stream's chunks)."""

    stage: str
    kind: Literal["pre", "post"]
    request_id: str
    start_ns: int
    end_ns: int
    duration_s: float
    decision: str
    error: str | None = None


@dataclass(frozen=True)
class DirectAnswer:
    """A stage's answer: sent as the model's reply, without the engine."""

    text: str
    finish_reason: str = "stop"
    stage: str = ""


class ChoiceFilter(Protocol):
    async def text(self, text: str, final: bool) -> tuple[str, str | None]:
        """What to send of one delta's ``text`` (``final``: the engine finished this choice,
        so flush anything held back), and a finish reason when a stage stops the stream."""
        ...

    def close(self) -> None:
        """The stream ended (however): report the stages' time."""
        ...


class StageSession(Protocol):
    """What the pre-stages decided for one request; makes each choice's post filter."""

    @property
    def answer(self) -> DirectAnswer | None: ...

    @property
    def model(self) -> str | None:
        """The served model a stage sent the request to (None: the one it named)."""
        ...

    def choice_filter(self) -> ChoiceFilter | None:
        """None when no post-stage looks at the output."""
        ...


class RequestStages(Protocol):
    async def before(self, endpoint: Endpoint, body: Any, request: Request) -> StageSession:
        """Run the pre-stages on ``body`` (changed in place); raise an ``APIError`` to refuse
        (a 4xx) or when a stage failed (a 500 naming it)."""
        ...


class _NoSession:
    answer = None
    model = None

    def choice_filter(self) -> ChoiceFilter | None:
        return None


class _NoStages:
    async def before(self, endpoint: Endpoint, body: Any, request: Request) -> StageSession:
        return NO_SESSION


NO_SESSION: StageSession = _NoSession()
NO_STAGES: RequestStages = _NoStages()


async def run_pre_stages(models: ServedModels, body: Any, request: Request,
                         endpoint: Endpoint
                         ) -> tuple[OpenAIServingCompletions, StageSession]:
    """The serving that runs ``body`` after the pre-stages, and their session. The engine
    must be available only when the request goes to it (a direct answer does not)."""
    serving: OpenAIServingCompletions = models.resolve(body.model, "generate").target
    serving.context.check_accepting()
    session = await serving.context.stages.before(endpoint, body, request)
    if session.model is not None:
        try:
            serving = models.resolve(session.model, "generate").target
        except APIError as exc:  # the stage's mistake, not the client's
            raise APIError(500, f"a request stage sent this request to the model "
                           f"{session.model!r}, which cannot take it: {exc.message}",
                           code="stage_error") from exc
        body.model = session.model
    if session.answer is None:
        serving.check_available()
    return serving, session


def direct_response(serving: OpenAIServingCompletions, endpoint: Endpoint, body: Any,
                    answer: DirectAnswer, request: Request) -> Response:
    """A stage's answer, framed as the model's would be (JSON, or SSE chunks then [DONE]);
    it charges the caller's rate limit as a cached answer does."""
    tokens = (len(serving.tokenizer.encode(answer.text, add_special_tokens=False))
              if answer.text else 0)
    serving.context.charge(request, max(tokens, 1))
    chat = endpoint == "chat"
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": body.model or serving.served_model}
    usage = {"prompt_tokens": 0, "completion_tokens": tokens, "total_tokens": tokens}
    headers = {"X-Surge-Stage": answer.stage} if answer.stage else None
    if body.stream:
        return SSEResponse(_answer_events(head, chat, answer), headers=headers)
    if chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant",
                                                          "content": answer.text}}
    else:
        choice = {"index": 0, "text": answer.text}
    choice |= {"logprobs": None, "finish_reason": answer.finish_reason, "stop_reason": None}
    response = json_response({**head, "choices": [choice], "usage": usage})
    if headers:
        response.headers.update(headers)
    return response


async def _answer_events(head: dict[str, Any], chat: bool,
                         answer: DirectAnswer) -> AsyncIterator[bytes]:
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    if chat:
        yield sse_event({**head, "choices": [{"index": 0, "delta": {
            "role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
        choice: dict[str, Any] = {"index": 0, "delta": {"content": answer.text}}
    else:
        choice = {"index": 0, "text": answer.text}
    choice |= {"logprobs": None, "finish_reason": answer.finish_reason, "stop_reason": None}
    yield sse_event({**head, "choices": [choice]})
    yield SSE_DONE

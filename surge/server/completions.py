"""Completions and chat completions: from a validated request body to engine requests and back.

Per HTTP request: check the model name, tokenize, check the context length, charge the
per-key rate limit, take an admission ticket (all before anything touches the engine), then
fan out ``n`` engine requests per prompt. Each engine request's token ids are detokenized
incrementally with stop strings applied; when a stop string ends the text, the request is
aborted in the engine so its KV blocks are freed at once. Updates of all choices flow into one
queue, read either into one JSON response or into an SSE stream.

A client that goes away, a per-request timeout, or the engine dying ends the engine requests
(leaving an ``EngineClient`` stream early aborts it); nothing waits forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from surge.engine.client import EngineClient, EngineDeadError
from surge.engine.output_processor import OutputProcessor
from surge.engine.protocol import AddRequest
from surge.http.errors import APIError, sse_error_event
from surge.http.observe import span
from surge.http.openapi import error_responses, event_stream_content
from surge.http.responses import (
    SSE_DONE,
    SSEResponse,
    json_response,
    sse_event,
)
from surge.outputs import TokenLogprobs
from surge.sampling_params import SamplingParams, StructuredOutputsParams
from surge.server import observing
from surge.server.admission import Ticket
from surge.server.context import RequestContext
from surge.server.metrics import ServerMetrics
from surge.server.models import ServedModels
from surge.server.prompt_logprobs import (
    check_prompt_logprobs_request,
    engine_max_tokens,
    prompt_logprobs_of,
    vllm_prompt_logprobs,
)
from surge.server.response_cache import (
    NO_CACHE,
    NOT_CACHED,
    CacheLookup,
    CacheQuery,
    cached_response,
    with_cache_header,
)
from surge.server.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    _SamplingRequest,
)
from surge.server.stages import (
    NO_SESSION,
    ChoiceFilter,
    StageSession,
    direct_response,
    run_pre_stages,
)
from surge.server.structured import check_request_fields, structured_outputs_of
from surge.server.tokenize import Tokenization
from surge.server.tools import ChatTools, chat_tools_of, tool_stream_choices
from surge.tokenizer import ChatTokenizer

__all__ = ["OpenAIServingCompletions", "add_generation_routes"]

logger = logging.getLogger(__name__)

ENGINE_DEAD = "engine_dead"  # the error code of requests the engine's death failed

_COMPLETION_PREFIX, _CHAT_PREFIX = "cmpl", "chatcmpl"  # of response ids, as OpenAI's
# Request fields outside the response cache's key: the prompt goes in as token ids, ``user``
# is part of the tenant, and ``priority`` changes when, not what, the answer is.
_NOT_IN_CACHE_KEY = {"prompt", "messages", "user", "priority"}


@dataclass
class _Choice:
    """One engine request: prompt ``prompt_index`` sampled for output ``index``."""

    index: int
    prompt_index: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    tenant: str = "anonymous"  # whom it is served for (surge.server.tenants)


@dataclass
class _Delta:
    """What one engine update added to one choice, after detokenization."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None
    stop_reason: int | str | None
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # on the first delta, if asked


@dataclass
class _Accumulated:
    """A choice's whole output, for non-streaming responses and usage."""

    text_parts: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def add(self, delta: _Delta) -> None:
        self.prompt_logprobs = self.prompt_logprobs or delta.prompt_logprobs
        self.text_parts.append(delta.text)
        self.num_tokens += len(delta.token_ids)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


@dataclass
class _Prepared:
    """A request that passed every check and holds an admission ticket."""

    request_id: str
    created: int
    model: str
    prompts: list[list[int]]
    prompt_texts: list[str | None]
    choices: list[_Choice]
    ticket: Ticket
    arrival: float
    released: bool = False
    stages: StageSession = NO_SESSION  # its post-stages filter each choice's text
    tools: ChatTools | None = None  # a chat's tools: its answers may hold tool calls


class _Done:
    """Sentinel: one choice's updates are over."""


class OpenAIServingCompletions:
    """``/v1/completions`` and ``/v1/chat/completions`` of the one text-generation model,
    served under ``model_names``; also the interactive load the batch API yields to."""

    def __init__(self, engine: EngineClient, tokenizer: ChatTokenizer, model_names: list[str],
                 context: RequestContext, metrics: ServerMetrics, log_prompts: bool) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.tokens = Tokenization(tokenizer)
        self.model_names = model_names
        self.context = context
        self.metrics = metrics
        self.log_prompts = log_prompts
        self._runs: set[_Run] = set()

    @property
    def served_model(self) -> str:
        return self.model_names[0]

    def max_model_len(self) -> int | None:
        """None until the engine has loaded the model."""
        return self.engine.info.max_model_len if self.engine.is_ready else None

    def model_dir(self) -> str | None:
        return self.engine.info.model_dir if self.engine.is_ready else None

    # -- endpoints ---------------------------------------------------------------------------

    async def create_completion(self, body: CompletionRequest, request: Request,
                                stages: StageSession = NO_SESSION) -> Response:
        observing.begin(body.model or self.served_model, bool(body.stream))
        _refuse_unsupported_completion(body)
        await check_request_fields(body)
        with span("tokenization"):
            prompts, texts = await self._completion_prompts(body.prompt)
        cache = await self._cache_lookup(request, body, "completions", prompts,
                                         texts if body.echo else None)
        if cache.answer is not None:
            return self._answer_from_cache(cache, request, _COMPLETION_PREFIX)
        prepared = self._prepare(body, prompts, texts, engine_max_tokens(body), body.logprobs,
                                 request, _COMPLETION_PREFIX)
        prepared.stages = stages
        if body.stream:
            return with_cache_header(SSEResponse(
                cache.record_stream(self._stream_completion(prepared, body)),
                functools.partial(self._release, prepared)), cache)
        outputs = await self._run_to_end(prepared, request)
        payload = self._completion_body(prepared, body, outputs)
        await cache.store_body(payload)
        return with_cache_header(json_response(payload), cache)

    async def create_chat_completion(self, body: ChatCompletionRequest, request: Request,
                                     stages: StageSession = NO_SESSION) -> Response:
        observing.begin(body.model or self.served_model, bool(body.stream))
        _refuse_unsupported_chat(body)
        await check_request_fields(body)
        tools = await chat_tools_of(
            self.tokenizer, body.tools, body.tool_choice, body.parallel_tool_calls,
            [m.model_dump() for m in body.messages], structured_outputs_of(body) is not None)
        with span("tokenization"):
            prompt = await self._chat_prompt(body, tools)
        cache = await self._cache_lookup(request, body, "chat", [prompt], None)
        if cache.answer is not None:
            return self._answer_from_cache(cache, request, _CHAT_PREFIX)
        max_tokens = body.max_completion_tokens or body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        prepared = self._prepare(body, [prompt], [None], max_tokens, logprobs, request,
                                 _CHAT_PREFIX, structured=tools.constraint)
        prepared.stages, prepared.tools = stages, tools
        if body.stream:
            return with_cache_header(SSEResponse(
                cache.record_stream(self._stream_chat(prepared, body)),
                functools.partial(self._release, prepared)), cache)
        outputs = await self._run_to_end(prepared, request)
        payload = self._chat_body(prepared, body, outputs)
        await cache.store_body(payload)
        return with_cache_header(json_response(payload), cache)

    def check_available(self) -> None:
        """503 unless the engine can take a request right now."""
        self.context.check_accepting()
        if not self.engine.is_ready:
            raise APIError(503, "the model is still loading: retry when GET /health answers "
                           "200", code="engine_loading", headers={"Retry-After": "1"})
        if not self.engine.is_healthy:
            raise APIError(503, "the engine is not running (it died and is restarting): "
                           "retry shortly", code="engine_unavailable",
                           headers={"Retry-After": "1"})

    def abort_all(self, error: APIError) -> None:
        """End every request in flight with ``error`` (shutdown after the drain timeout)."""
        for run in list(self._runs):
            run.fail(error)

    # -- the load (surge.server.features.ServingLoad) -----------------------------------------

    def num_in_flight(self) -> int:
        return self.context.num_in_flight

    def can_run(self) -> bool:
        return self.context.accepting and self.engine.is_ready and self.engine.is_healthy

    def num_waiting_for_first_token(self, more_urgent_than: int) -> int:
        """Requests in flight with a priority value below ``more_urgent_than`` that have no
        first token yet: the batch worker holds back new lines while there are any."""
        return sum(1 for run in self._runs
                   if not run.started and run.priority < more_urgent_than)

    # -- response cache (surge.server.response_cache) ----------------------------------------

    async def _cache_lookup(self, request: Request, body: _SamplingRequest, endpoint: str,
                            prompts: list[list[int]], texts: list[str | None] | None
                            ) -> CacheLookup:
        """The cache's verdict on this request, keyed by the prompts' token ids (after the
        chat template) and every other field but the tenant's ``user`` and ``priority``."""
        cache = self.context.response_cache
        if cache is NO_CACHE:
            return NOT_CACHED
        material = body.model_dump(exclude=_NOT_IN_CACHE_KEY)
        material["prompt_token_ids"] = prompts
        if texts is not None:  # echoed as sent
            material["prompt_texts"] = texts
        info = self.engine.info
        return await cache.lookup(request, CacheQuery(
            endpoint, body.model or self.served_model, info.model_dir,
            f"{info.dtype} {info.device}", material,
            reproducible=body.temperature == 0 or body.seed is not None, user=body.user,
            messages=[m.model_dump() for m in body.messages]
            if isinstance(body, ChatCompletionRequest) else None))

    def _answer_from_cache(self, lookup: CacheLookup, request: Request,
                           prefix: str) -> Response:
        """A hit skips the engine and admission, but not the caller's rate limit."""
        assert lookup.answer is not None
        self.context.charge(request, max(lookup.answer.num_tokens, 1))
        return cached_response(lookup, prefix)

    # -- tokenization ------------------------------------------------------------------------

    async def _completion_prompts(self, prompt: Any) -> tuple[list[list[int]], list[str | None]]:
        limit = self.max_model_len()  # a text that cannot fit is refused before tokenizing
        if isinstance(prompt, str):
            return [await self.tokens.encode(prompt, max_tokens=limit)], [prompt]
        if not prompt:
            raise APIError(400, "'prompt' is an empty list: allowed is at least one prompt",
                           param="prompt")
        if isinstance(prompt[0], int):
            return [list(prompt)], [None]
        if isinstance(prompt[0], str):
            return [await self.tokens.encode(p, max_tokens=limit) for p in prompt], list(prompt)
        return [list(p) for p in prompt], [None] * len(prompt)

    async def _chat_prompt(self, body: ChatCompletionRequest,
                           tools: ChatTools | None = None) -> list[int]:
        if tools is not None and tools.renders:  # tools, calls or results (surge.server.tools)
            text = tools.render(self.tokenizer, body.add_generation_prompt)
        else:
            text = self.tokens.render_chat(body.messages, body.add_generation_prompt)
        return await self.tokens.encode(text, add_special_tokens=False,
                                        max_tokens=self.max_model_len(), param="messages")

    # -- admission ---------------------------------------------------------------------------

    def _prepare(self, body: _SamplingRequest, prompts: list[list[int]],
                 texts: list[str | None], max_tokens: int | None, logprobs: int | None,
                 request: Request, prefix: str,
                 structured: StructuredOutputsParams | None = None) -> _Prepared:
        """Every check, then the admission ticket: nothing here waits on the engine.
        ``structured``: a constraint other than the body's own (a chat's tool calls)."""
        arrival = time.monotonic()
        info = self.engine.info
        prompt_param = "prompt" if prefix == _COMPLETION_PREFIX else "messages"
        for i, ids in enumerate(prompts):
            _check_prompt(ids, info.vocab_size, info.max_model_len, max_tokens, prompt_param, i)
        params = _sampling_params(body, max_tokens, logprobs, structured)
        # Charged up front, as OpenAI does: prompt plus the most the completion may take.
        budget = sum(len(ids) + (max_tokens or info.max_model_len - len(ids))
                     for ids in prompts) * body.n
        tenant = self.context.tenant_of(request, body.user)
        self.context.charge(request, budget, tenant)
        ticket = self.context.admit(sum(len(ids) for ids in prompts) * body.n, tenant)
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        choices = [_Choice(p * body.n + i, p, f"{request_id}-{p * body.n + i}", ids,
                           _choice_params(params, i), body.priority, tenant)
                   for p, ids in enumerate(prompts) for i in range(body.n)]
        shown = None
        if self.log_prompts:
            shown = [t if t is not None else ids for t, ids in zip(texts, prompts, strict=True)]
            logger.info("request %s: prompts=%r params=%r", request_id, shown, params)
        observing.prepared(request_id, prompts, tenant, shown)
        return _Prepared(request_id, int(time.time()), body.model or self.served_model,
                         prompts, texts, choices, ticket, arrival)

    def _release(self, prepared: _Prepared) -> None:
        if not prepared.released:
            prepared.released = True
            self.context.release(prepared.ticket)

    # -- running -----------------------------------------------------------------------------

    async def _run_to_end(self, prepared: _Prepared, request: Request) -> list[_Accumulated]:
        """Every choice's whole output; ends early (aborting) if the client leaves."""
        run = _Run(self, prepared)
        try:
            return await self.context.unless_disconnected(
                request, run.collect(self.context.deadline()))
        finally:
            await run.close()
            self._release(prepared)

    async def _stream_events(self, prepared: _Prepared, first_chunks: list[bytes],
                             chunk: Callable[[_Delta], bytes | None],
                             usage_chunk: Callable[[list[_Accumulated]], bytes] | None
                             ) -> AsyncIterator[bytes]:
        """SSE framing shared by both endpoints; failures end the stream with an error event."""
        run = _Run(self, prepared)
        try:
            for data in first_chunks:
                yield data
            async for delta in run.deltas(self.context.deadline()):
                data = chunk(delta)
                if data is not None:
                    yield data
            if usage_chunk is not None:
                yield usage_chunk(run.outputs)
            yield SSE_DONE
        except APIError as exc:
            yield sse_error_event(exc)
            if exc.code == ENGINE_DEAD:
                # As the router ends a stream whose replica failed: the server, not the
                # connection, ended it, and clients that read until [DONE] stop here.
                yield SSE_DONE
        except Exception as exc:  # a bug must still end the stream in a way clients read
            logger.exception("stream %s failed", prepared.request_id)
            yield sse_error_event(APIError(500, f"the stream failed: {type(exc).__name__}",
                                           code="internal_error"))
        finally:
            await run.close()
            self._release(prepared)

    # -- completions -------------------------------------------------------------------------

    def _stream_completion(self, prepared: _Prepared,
                           body: CompletionRequest) -> AsyncIterator[bytes]:
        head = {"id": prepared.request_id, "object": "text_completion",
                "created": prepared.created, "model": prepared.model}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        echoed: set[int] = set()

        def chunk(delta: _Delta) -> bytes | None:
            text = delta.text
            if body.echo and delta.index not in echoed:
                echoed.add(delta.index)
                text = self._echo_text(prepared, delta.index // body.n) + text
            if not text and delta.finish_reason is None and body.logprobs is None:
                return None  # a token that only completed a partial character or a holdback
            choice = {"index": delta.index, "text": text,
                      "logprobs": self._completion_logprobs(delta.logprobs, body.logprobs),
                      "finish_reason": delta.finish_reason}
            if delta.finish_reason is not None:
                choice["stop_reason"] = delta.stop_reason
            return sse_event({**head, "choices": [choice],
                         **({"usage": None} if include_usage else {})})

        def usage(outputs: list[_Accumulated]) -> bytes:
            return sse_event({**head, "choices": [], "usage": self._usage(prepared, outputs)})

        return self._stream_events(prepared, [], chunk, usage if include_usage else None)

    def _completion_body(self, prepared: _Prepared, body: CompletionRequest,
                         outputs: list[_Accumulated]) -> dict[str, Any]:
        choices = []
        if body.max_tokens == 0:  # the one token the engine sampled is not part of the answer
            outputs = [_Accumulated(finish_reason="length", prompt_logprobs=o.prompt_logprobs)
                       for o in outputs]
        for choice, out in zip(prepared.choices, outputs, strict=True):
            text = out.text
            entries: list[TokenLogprobs | None] = list(out.logprobs)
            if body.echo:
                text = self._echo_text(prepared, choice.prompt_index) + text
                entries = [*(out.prompt_logprobs or []), *entries]
            choices.append({"index": choice.index, "text": text,
                            "logprobs": self._completion_logprobs(entries, body.logprobs),
                            "finish_reason": out.finish_reason,
                            "stop_reason": out.stop_reason})
            if body.prompt_logprobs is not None:
                choices[-1]["prompt_logprobs"] = vllm_prompt_logprobs(
                    out.prompt_logprobs or [], body.prompt_logprobs, self.tokens.token_text)
        return {"id": prepared.request_id, "object": "text_completion",
                "created": prepared.created, "model": prepared.model, "choices": choices,
                "usage": self._usage(prepared, outputs)}

    def _echo_text(self, prepared: _Prepared, prompt_index: int) -> str:
        text = prepared.prompt_texts[prompt_index]
        return text if text is not None else self.tokenizer.decode(prepared.prompts[prompt_index])

    def _completion_logprobs(self, entries: list[TokenLogprobs | None] | None,
                             requested: int | None) -> dict[str, Any] | None:
        """A None entry is the echoed prompt's first token: it has no logprob."""
        if requested is None or entries is None:
            return None
        tokens = [self.tokens.token_text(e.token_id) if e is not None else "" for e in entries]
        offsets, offset = [], 0
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        top = [None if e is None else {self.tokens.token_text(e.token_id): e.logprob, **{
            self.tokens.token_text(t): lp for t, lp in list(e.top.items())[:requested]}}
            for e in entries]
        return {"tokens": tokens, "token_logprobs": [None if e is None else e.logprob
                                                     for e in entries],
                "top_logprobs": top, "text_offset": offsets}

    # -- chat --------------------------------------------------------------------------------

    def _stream_chat(self, prepared: _Prepared,
                     body: ChatCompletionRequest) -> AsyncIterator[bytes]:
        head = {"id": prepared.request_id, "object": "chat.completion.chunk",
                "created": prepared.created, "model": prepared.model}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        usage_field = {"usage": None} if include_usage else {}
        # As OpenAI does: the first chunk of every choice carries the role.
        first = [sse_event({**head, "choices": [{"index": c.index, "delta": {
            "role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}],
            **usage_field}) for c in prepared.choices]

        tools = prepared.tools
        streamers = {c.index: tools.streamer() for c in prepared.choices} if tools else {}

        def chunk(delta: _Delta) -> bytes | None:
            streamer = streamers.get(delta.index)
            if streamer is not None:  # content and tool-call deltas (surge.server.tools)
                return b"".join(sse_event({**head, "choices": [c], **usage_field})
                                for c in tool_stream_choices(
                                    streamer, delta.index, delta.text, delta.finish_reason,
                                    delta.stop_reason,
                                    self._chat_logprobs(delta.logprobs, body))) or None
            if not delta.text and delta.finish_reason is None and not body.logprobs:
                return None
            choice = {"index": delta.index,
                      "delta": {"content": delta.text} if delta.text else {},
                      "logprobs": self._chat_logprobs(delta.logprobs, body),
                      "finish_reason": delta.finish_reason}
            if delta.finish_reason is not None:
                choice["stop_reason"] = delta.stop_reason
            return sse_event({**head, "choices": [choice], **usage_field})

        def usage(outputs: list[_Accumulated]) -> bytes:
            return sse_event({**head, "choices": [], "usage": self._usage(prepared, outputs)})

        return self._stream_events(prepared, first, chunk, usage if include_usage else None)

    def _chat_body(self, prepared: _Prepared, body: ChatCompletionRequest,
                   outputs: list[_Accumulated]) -> dict[str, Any]:
        choices = []
        for choice, out in zip(prepared.choices, outputs, strict=True):
            message, finish_reason = ({"role": "assistant", "content": out.text},
                                      out.finish_reason) if prepared.tools is None else \
                prepared.tools.message(out.text, out.finish_reason)  # tool calls parsed
            choices.append({"index": choice.index, "message": message,
                            "logprobs": self._chat_logprobs(out.logprobs, body),
                            "finish_reason": finish_reason, "stop_reason": out.stop_reason})
        return {"id": prepared.request_id, "object": "chat.completion",
                "created": prepared.created, "model": prepared.model, "choices": choices,
                "usage": self._usage(prepared, outputs)}

    def _chat_logprobs(self, entries: list[TokenLogprobs] | None,
                       body: ChatCompletionRequest) -> dict[str, Any] | None:
        if not body.logprobs or entries is None:
            return None
        return {"content": [{**self._token_entry(e.token_id, e.logprob),
                             "top_logprobs": [self._token_entry(t, lp)
                                              for t, lp in e.top.items()]}
                            for e in entries]}

    def _token_entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.tokens.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    # -- shared ------------------------------------------------------------------------------

    def _usage(self, prepared: _Prepared, outputs: list[_Accumulated]) -> dict[str, int]:
        # As OpenAI counts it: each prompt once, however many choices sample it.
        prompt_tokens = sum(len(ids) for ids in prepared.prompts)
        completion_tokens = sum(out.num_tokens for out in outputs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}


# -- routes ----------------------------------------------------------------------------------

_ERRORS = error_responses({
    400: "invalid request (the message names the field and what is allowed)",
    401: "missing or wrong API key", 404: "unknown model", 413: "request body too large",
    429: "rate limited or server busy (Retry-After)", 500: "unexpected server error",
    503: "model loading, engine down, or server shutting down",
    504: "the request exceeded --request-timeout"})


def _generation_responses(model: type, chunk: type) -> dict[int | str, dict[str, Any]]:
    return {200: {"model": model, "description": f"a {model.__name__}; with stream=true, "
                  f"text/event-stream of `data: <{chunk.__name__}>` then `data: [DONE]`",
                  "content": event_stream_content(
                      f"a JSON {chunk.__name__}, or [DONE] after the last one")},
            **_ERRORS}


def add_generation_routes(app: FastAPI, models: ServedModels) -> None:
    """The routes exist on every server: without a text-generation model they say which
    models the server has instead."""

    @app.post("/v1/completions", response_model=None, tags=["openai"],
              responses=_generation_responses(CompletionResponse, CompletionStreamResponse))
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        serving, stages = await run_pre_stages(models, body, request, "completions")
        if stages.answer is not None:
            return direct_response(serving, "completions", body, stages.answer, request)
        return await serving.create_completion(body, request, stages)

    @app.post("/v1/chat/completions", response_model=None, tags=["openai"],
              responses=_generation_responses(ChatCompletionResponse,
                                              ChatCompletionStreamResponse))
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        serving, stages = await run_pre_stages(models, body, request, "chat")
        if stages.answer is not None:
            return direct_response(serving, "chat", body, stages.answer, request)
        return await serving.create_chat_completion(body, request, stages)


class _Run:
    """One HTTP request's engine requests, pumped by one task each into a single queue."""

    def __init__(self, serving: OpenAIServingCompletions, prepared: _Prepared) -> None:
        self._serving = serving
        self._prepared = prepared
        self._queue: asyncio.Queue[_Delta | _Done | BaseException] = asyncio.Queue()
        self._pending = len(prepared.choices)
        self._started = False
        self.outputs = [_Accumulated() for _ in prepared.choices]
        self._tasks = [asyncio.ensure_future(self._pump(c)) for c in prepared.choices]
        serving._runs.add(self)

    @property
    def started(self) -> bool:
        return self._started

    @property
    def priority(self) -> int:
        return min(choice.priority for choice in self._prepared.choices)

    async def deltas(self, deadline: float | None) -> AsyncIterator[_Delta]:
        """Updates of every choice as they come; raises APIError when the run fails."""
        while self._pending:
            item = await self._next(deadline)
            if isinstance(item, _Done):
                self._pending -= 1
                continue
            if isinstance(item, BaseException):
                raise _as_api_error(item)
            if not self._started:
                self._started = True
                self._prepared.ticket.started()  # it left the queue: its first token is here
            self.outputs[item.index].add(item)
            yield item

    async def collect(self, deadline: float | None) -> list[_Accumulated]:
        async for _ in self.deltas(deadline):
            pass
        return self.outputs

    def fail(self, error: APIError) -> None:
        """Make the reader raise ``error`` next; ``close`` then aborts the engine requests."""
        self._queue.put_nowait(error)

    async def close(self) -> None:
        """Stop every engine request still running (their streams abort them)."""
        self._serving._runs.discard(self)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _next(self, deadline: float | None) -> _Delta | _Done | BaseException:
        if deadline is None:
            return await self._queue.get()
        try:
            async with asyncio.timeout_at(deadline):
                return await self._queue.get()
        except TimeoutError:
            raise self._serving.context.timed_out() from None

    async def _pump(self, choice: _Choice) -> None:
        try:
            async for delta in _stream_choice(self._serving, choice, self._prepared.arrival,
                                              self._prepared.stages.choice_filter()):
                self._queue.put_nowait(delta)
        except Exception as exc:
            self._queue.put_nowait(exc)
        self._queue.put_nowait(_Done())


async def _stream_choice(serving: OpenAIServingCompletions, choice: _Choice, arrival: float,
                         post: ChoiceFilter | None = None) -> AsyncIterator[_Delta]:
    """One engine request's updates as text deltas; a stop string, or a post-stage that
    stops the stream, ends (aborts) it early."""
    params = choice.params
    processor = OutputProcessor(serving.tokenizer.tokenizer, choice.prompt_token_ids, params)
    token_times: list[float] = []
    first_scheduled: float | None = None
    finish: str | None = "abort"  # what metrics record if the stream is cut off
    times = observing.engine_times(choice.index, len(choice.prompt_token_ids))
    try:
        request = AddRequest(choice.request_id, choice.prompt_token_ids, params,
                             choice.priority, tenant=choice.tenant)
        async with contextlib.aclosing(serving.engine.generate(request)) as updates:
            async for update in updates:
                now = time.monotonic()
                token_times.extend(now for _ in update.new_token_ids)
                first_scheduled = first_scheduled or update.first_scheduled_time
                out = processor.process(update)
                observing.stamp(times, update, now)
                text, finish_reason, stop_reason = out.text, out.finish_reason, out.stop_reason
                if post is not None:
                    text, stopped = await post.text(text, finish_reason is not None)
                    if stopped is not None:
                        finish_reason, stop_reason = stopped, None
                delta = _Delta(choice.index, text, out.token_ids, out.logprobs,
                               finish_reason, stop_reason, update.prompt_logprobs)
                yield delta
                if delta.finish_reason is not None:
                    finish = delta.finish_reason
                    return  # leaving the engine stream unfinished aborts the request there
    except EngineDeadError:
        finish = "error"
        raise
    finally:
        if post is not None:
            post.close()
        _record(serving, choice, finish, token_times, arrival, first_scheduled, processor)
        observing.finish_times(times, finish, len(token_times),
                               processor.text if serving.log_prompts else None)


def _record(serving: OpenAIServingCompletions, choice: _Choice, finish: str | None,
            token_times: list[float], arrival: float, first_scheduled: float | None,
            processor: OutputProcessor) -> None:
    first_token = token_times[0] if token_times else None
    serving.metrics.record_request(
        finish_reason=finish or "abort", num_prompt_tokens=len(choice.prompt_token_ids),
        num_generation_tokens=len(token_times), arrival=arrival,
        first_scheduled=first_scheduled,
        first_token=first_token, token_times=token_times, finished=time.monotonic())
    serving.context.tenant_metrics.record_request(
        choice.tenant, len(choice.prompt_token_ids), len(token_times),
        None if first_scheduled is None else first_scheduled - arrival,
        None if first_token is None else first_token - arrival)
    if serving.log_prompts:
        logger.info("request %s finished (%s): %r", choice.request_id, finish, processor.text)


def _as_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"the engine died while generating this request, so it did not "
                        f"complete ({exc}); retry it", code=ENGINE_DEAD,
                        headers={"Retry-After": "1"})
    if isinstance(exc, ValueError):  # the engine refused the request
        return APIError(400, str(exc), code="invalid_value")
    logger.error("engine request failed: %r", exc)
    return APIError(500, f"the request failed: {type(exc).__name__}", code="internal_error")


# -- checks ----------------------------------------------------------------------------------


def _check_prompt(ids: list[int], vocab_size: int, max_model_len: int,
                  max_tokens: int | None, param: str, index: int) -> None:
    if not ids:
        raise APIError(400, f"prompt {index} is empty: allowed is at least 1 token",
                       param=param)
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise APIError(400, f"prompt token ids {bad[:5]} are unknown: allowed is "
                       f"[0, {vocab_size - 1}]", param=param)
    requested = len(ids) + (max_tokens or 1)
    if len(ids) >= max_model_len or requested > max_model_len:
        part = "messages" if param == "messages" else "prompt"
        completion = max_tokens if max_tokens is not None else "at least 1"
        raise APIError(
            400, f"This model's maximum context length is {max_model_len} tokens. However, "
            f"you requested {requested} tokens ({len(ids)} in the {part}, {completion} for "
            f"the completion). Please reduce the length of the {part} or of max_tokens.",
            param="max_tokens" if len(ids) < max_model_len else param,
            code="context_length_exceeded")


def _sampling_params(body: _SamplingRequest, max_tokens: int | None, logprobs: int | None,
                     structured: StructuredOutputsParams | None = None) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=max_tokens, min_tokens=body.min_tokens, temperature=body.temperature,
            top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, seed=body.seed,
            stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
            stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos,
            logprobs=logprobs, skip_special_tokens=body.skip_special_tokens,
            include_stop_str_in_output=body.include_stop_str_in_output,
            structured_outputs=structured or structured_outputs_of(body),
            prompt_logprobs=prompt_logprobs_of(body, logprobs))
    except ValueError as exc:
        # SamplingParams says "field=value is invalid: allowed is ..."; the field is the param.
        raise APIError(400, str(exc), param=str(exc).split("=", 1)[0],
                       code="invalid_value") from exc


def _choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice i of a seeded request uses seed + i, so n choices differ but repeat."""
    if index == 0 or params.seed is None:
        return params
    seed = params.seed + index
    seed = seed if seed < 2**63 else seed - 2**64  # stay a signed 64-bit integer
    return SamplingParams(**{**vars(params), "seed": seed})


def _refuse_unsupported_completion(body: CompletionRequest) -> None:
    if body.suffix:
        raise APIError(400, "'suffix' is not supported: allowed is null", param="suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(400, f"'best_of'={body.best_of} is not supported: allowed is null or "
                       f"equal to n ({body.n})", param="best_of")
    check_prompt_logprobs_request(body)
    _refuse_logit_bias(body)


def _refuse_unsupported_chat(body: ChatCompletionRequest) -> None:
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    _refuse_logit_bias(body)


def _refuse_logit_bias(body: _SamplingRequest) -> None:
    if body.logit_bias:
        raise APIError(400, "'logit_bias' is not supported: allowed is null or {}",
                       param="logit_bias")

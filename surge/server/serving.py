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
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from surge.engine.client import EngineClient, EngineDeadError
from surge.engine.detokenize import IncrementalDetokenizer
from surge.engine.protocol import AddRequest
from surge.engine.request import FinishReason
from surge.http.auth import RateLimited, RateLimiter
from surge.http.errors import APIError, sse_error_event
from surge.http.responses import (
    SSE_DONE,
    SSEResponse,
    json_response,
    sse_event,
    unless_disconnected,
)
from surge.outputs import TokenLogprobs
from surge.sampling_params import SamplingParams
from surge.server.admission import AdmissionController, AdmissionRejected, Ticket
from surge.server.metrics import ServerMetrics
from surge.server.schemas import ChatCompletionRequest, CompletionRequest, _SamplingRequest
from surge.tokenizer import ChatTokenizer

__all__ = ["OpenAIServing", "ServingLimits"]

logger = logging.getLogger(__name__)

# Prompts longer than this many characters are tokenized on a worker thread, so one huge
# prompt does not stall every other request's stream.
_INLINE_TOKENIZE_CHARS = 20_000
_COMPLETION_PREFIX, _CHAT_PREFIX = "cmpl", "chatcmpl"  # of response ids, as OpenAI's


@dataclass
class ServingLimits:
    """The per-request knobs of ``surge serve`` that the handlers apply."""

    request_timeout: float | None = 600.0
    log_prompts: bool = False


@dataclass
class _Choice:
    """One engine request: prompt ``prompt_index`` sampled for output ``index``."""

    index: int
    prompt_index: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int


@dataclass
class _Delta:
    """What one engine update added to one choice, after detokenization."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass
class _Accumulated:
    """A choice's whole output, for non-streaming responses and usage."""

    text_parts: list[str] = field(default_factory=list)
    num_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def add(self, delta: _Delta) -> None:
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


class _Done:
    """Sentinel: one choice's updates are over."""


class OpenAIServing:
    def __init__(self, engine: EngineClient, tokenizer: ChatTokenizer, model_names: list[str],
                 admission: AdmissionController, rate_limiter: RateLimiter,
                 metrics: ServerMetrics, limits: ServingLimits) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_names = model_names
        self.admission = admission
        self.rate_limiter = rate_limiter
        self.metrics = metrics
        self.limits = limits
        self.num_in_flight = 0
        self.created = int(time.time())
        self._runs: set[_Run] = set()
        # Set by the app when no new request may start (draining, engine gone for good).
        self.refusal: APIError | None = None
        # Set by the app: False when no text-generation model is served (only embedding or
        # classification models, by name in ``other_models`` with their task).
        self.can_generate = True
        self.other_models: dict[str, str] = {}

    @property
    def served_model(self) -> str:
        return self.model_names[0]

    # -- endpoints ---------------------------------------------------------------------------

    async def create_completion(self, body: CompletionRequest, request: Request,
                                key_id: str | None) -> Response:
        _refuse_unsupported_completion(body)
        prompts, texts = await self._completion_prompts(body.prompt)
        prepared = self._prepare(body, prompts, texts, body.max_tokens, body.logprobs,
                                 key_id, _COMPLETION_PREFIX)
        if body.stream:
            return SSEResponse(self._stream_completion(prepared, body),
                                functools.partial(self._release, prepared))
        outputs = await self._run_to_end(prepared, request)
        return json_response(self._completion_body(prepared, body, outputs))

    async def create_chat_completion(self, body: ChatCompletionRequest, request: Request,
                                     key_id: str | None) -> Response:
        _refuse_unsupported_chat(body)
        prompt = await self._chat_prompt(body)
        max_tokens = body.max_completion_tokens or body.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        prepared = self._prepare(body, [prompt], [None], max_tokens, logprobs, key_id,
                                 _CHAT_PREFIX)
        if body.stream:
            return SSEResponse(self._stream_chat(prepared, body),
                                functools.partial(self._release, prepared))
        outputs = await self._run_to_end(prepared, request)
        return json_response(self._chat_body(prepared, body, outputs))

    def check_model(self, model: str | None) -> None:
        if model in self.other_models or not self.can_generate:
            raise self._not_generative(model)
        if model is not None and model not in self.model_names:
            raise APIError(404, f"The model '{model}' does not exist: this server serves "
                           f"{', '.join(repr(n) for n in self.model_names)} (GET /v1/models)",
                           param="model", code="model_not_found")

    def _not_generative(self, model: str | None) -> APIError:
        served = ", ".join(f"'{name}' ({task})" for name, task in self.other_models.items())
        generators = ", ".join(repr(n) for n in self.model_names) if self.can_generate else ""
        if model in self.other_models:
            task = self.other_models[model]
            article = "an" if task[0] in "aeiou" else "a"
            return APIError(400, f"the model '{model}' is {article} {task} model: "
                            f"it cannot generate or tokenize text; models that can: "
                            f"{generators or 'none on this server'}", param="model",
                            code="model_not_supported")
        return APIError(404, f"this server serves no text-generation model (it serves "
                        f"{served}: use /v1/embeddings or /v1/classify)", param="model",
                        code="model_not_found")

    def check_available(self) -> None:
        """503 unless the engine can take a request right now."""
        if self.refusal is not None:
            raise self.refusal
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

    def num_waiting_for_first_token(self, more_urgent_than: int) -> int:
        """Requests in flight with a priority value below ``more_urgent_than`` that have no
        first token yet: the batch worker holds back new lines while there are any."""
        return sum(1 for run in self._runs
                   if not run.started and run.priority < more_urgent_than)

    # -- tokenization ------------------------------------------------------------------------

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            if len(text) <= _INLINE_TOKENIZE_CHARS:
                return self.tokenizer.encode(text, add_special_tokens)
            return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens)
        except Exception as exc:  # the Rust tokenizer refuses e.g. lone surrogates
            raise APIError(400, f"the text cannot be tokenized: {exc}", param="prompt") from exc

    async def _completion_prompts(self, prompt: Any) -> tuple[list[list[int]], list[str | None]]:
        if isinstance(prompt, str):
            return [await self.encode(prompt)], [prompt]
        if not prompt:
            raise APIError(400, "'prompt' is an empty list: allowed is at least one prompt",
                           param="prompt")
        if isinstance(prompt[0], int):
            return [list(prompt)], [None]
        if isinstance(prompt[0], str):
            return [await self.encode(p) for p in prompt], list(prompt)
        return [list(p) for p in prompt], [None] * len(prompt)

    async def _chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        text = self.render_chat(body.messages, body.add_generation_prompt)
        return await self.encode(text, add_special_tokens=False)

    def render_chat(self, messages: Sequence[Any], add_generation_prompt: bool) -> str:
        conversation = [{"role": _template_role(m.role), "content": _message_text(m.content, i)}
                        for i, m in enumerate(messages)]
        try:
            return self.tokenizer.apply_chat_template(conversation, add_generation_prompt)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from exc
        except Exception as exc:  # a template that fails on this input is the input's problem
            raise APIError(400, f"the chat template failed on these messages: {exc}",
                           param="messages") from exc

    # -- admission ---------------------------------------------------------------------------

    def _prepare(self, body: _SamplingRequest, prompts: list[list[int]],
                 texts: list[str | None], max_tokens: int | None, logprobs: int | None,
                 key_id: str | None, prefix: str) -> _Prepared:
        """Every check, then the admission ticket: nothing here waits on the engine."""
        arrival = time.monotonic()
        info = self.engine.info
        prompt_param = "prompt" if prefix == _COMPLETION_PREFIX else "messages"
        for i, ids in enumerate(prompts):
            _check_prompt(ids, info.vocab_size, info.max_model_len, max_tokens, prompt_param, i)
        params = _sampling_params(body, max_tokens, logprobs)
        # Charged up front, as OpenAI does: prompt plus the most the completion may take.
        budget = sum(len(ids) + (max_tokens or info.max_model_len - len(ids))
                     for ids in prompts) * body.n
        self._charge_rate_limit(key_id, budget)
        ticket = self._admit(sum(len(ids) for ids in prompts) * body.n)
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        choices = [_Choice(p * body.n + i, p, f"{request_id}-{p * body.n + i}", ids,
                           _choice_params(params, i), body.priority)
                   for p, ids in enumerate(prompts) for i in range(body.n)]
        if self.limits.log_prompts:
            shown = [t if t is not None else ids for t, ids in zip(texts, prompts, strict=True)]
            logger.info("request %s: prompts=%r params=%r", request_id, shown, params)
        return _Prepared(request_id, int(time.time()), body.model or self.served_model,
                         prompts, texts, choices, ticket, arrival)

    def _charge_rate_limit(self, key_id: str | None, num_tokens: int) -> None:
        try:
            self.rate_limiter.check(key_id, num_tokens)
        except RateLimited as exc:
            self.metrics.record_rejected(f"rate_limit_{exc.limit}")
            raise APIError(429, exc.message, code="rate_limit_exceeded",
                           headers={"Retry-After": str(exc.retry_after)}) from exc

    def _admit(self, num_prompt_tokens: int) -> Ticket:
        try:
            ticket = self.admission.admit(num_prompt_tokens)
        except AdmissionRejected as exc:
            self.metrics.record_rejected(exc.reason)
            raise APIError(429, exc.message, code=exc.reason,
                           headers={"Retry-After": str(exc.retry_after)}) from exc
        self.num_in_flight += 1
        return ticket

    def _release(self, prepared: _Prepared) -> None:
        if not prepared.released:
            prepared.released = True
            prepared.ticket.release()
            self.num_in_flight -= 1

    # -- running -----------------------------------------------------------------------------

    async def _run_to_end(self, prepared: _Prepared, request: Request) -> list[_Accumulated]:
        """Every choice's whole output; ends early (aborting) if the client leaves."""
        run = _Run(self, prepared)
        try:
            return await unless_disconnected(request.receive, run.collect(self._deadline()))
        finally:
            await run.close()
            self._release(prepared)

    def _deadline(self) -> float | None:
        timeout = self.limits.request_timeout
        return None if not timeout else asyncio.get_running_loop().time() + timeout

    async def _stream_events(self, prepared: _Prepared, first_chunks: list[bytes],
                             chunk: Callable[[_Delta], bytes | None],
                             usage_chunk: Callable[[list[_Accumulated]], bytes] | None
                             ) -> AsyncIterator[bytes]:
        """SSE framing shared by both endpoints; failures end the stream with an error event."""
        run = _Run(self, prepared)
        try:
            for data in first_chunks:
                yield data
            async for delta in run.deltas(self._deadline()):
                data = chunk(delta)
                if data is not None:
                    yield data
            if usage_chunk is not None:
                yield usage_chunk(run.outputs)
            yield SSE_DONE
        except APIError as exc:
            yield sse_error_event(exc)
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
        for choice, out in zip(prepared.choices, outputs, strict=True):
            text = out.text
            if body.echo:
                text = self._echo_text(prepared, choice.prompt_index) + text
            choices.append({"index": choice.index, "text": text,
                            "logprobs": self._completion_logprobs(out.logprobs, body.logprobs),
                            "finish_reason": out.finish_reason,
                            "stop_reason": out.stop_reason})
        return {"id": prepared.request_id, "object": "text_completion",
                "created": prepared.created, "model": prepared.model, "choices": choices,
                "usage": self._usage(prepared, outputs)}

    def _echo_text(self, prepared: _Prepared, prompt_index: int) -> str:
        text = prepared.prompt_texts[prompt_index]
        return text if text is not None else self.tokenizer.decode(prepared.prompts[prompt_index])

    def _completion_logprobs(self, entries: list[TokenLogprobs] | None,
                             requested: int | None) -> dict[str, Any] | None:
        if requested is None or entries is None:
            return None
        tokens = [self.token_text(e.token_id) for e in entries]
        offsets, offset = [], 0
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        top = [{self.token_text(e.token_id): e.logprob,
                **{self.token_text(t): lp for t, lp in e.top.items()}} for e in entries]
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
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

        def chunk(delta: _Delta) -> bytes | None:
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
        choices = [{"index": choice.index,
                    "message": {"role": "assistant", "content": out.text},
                    "logprobs": self._chat_logprobs(out.logprobs, body),
                    "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}
                   for choice, out in zip(prepared.choices, outputs, strict=True)]
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
        text = self.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    # -- shared ------------------------------------------------------------------------------

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one serving object per server
    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _usage(self, prepared: _Prepared, outputs: list[_Accumulated]) -> dict[str, int]:
        # As OpenAI counts it: each prompt once, however many choices sample it.
        prompt_tokens = sum(len(ids) for ids in prepared.prompts)
        completion_tokens = sum(out.num_tokens for out in outputs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}


class _Run:
    """One HTTP request's engine requests, pumped by one task each into a single queue."""

    def __init__(self, serving: OpenAIServing, prepared: _Prepared) -> None:
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
            timeout = self._serving.limits.request_timeout
            raise APIError(504, f"the request did not finish within the server's "
                           f"--request-timeout of {timeout:g} s", code="request_timeout"
                           ) from None

    async def _pump(self, choice: _Choice) -> None:
        try:
            async for delta in _stream_choice(self._serving, choice, self._prepared.arrival):
                self._queue.put_nowait(delta)
        except Exception as exc:
            self._queue.put_nowait(exc)
        self._queue.put_nowait(_Done())


async def _stream_choice(serving: OpenAIServing, choice: _Choice,
                         arrival: float) -> AsyncIterator[_Delta]:
    """One engine request's updates as text deltas; a stop string ends (aborts) it early."""
    params = choice.params
    detokenizer = IncrementalDetokenizer(serving.tokenizer.tokenizer, choice.prompt_token_ids,
                                         params)
    token_times: list[float] = []
    first_scheduled: float | None = None
    finish: str | None = "abort"  # what metrics record if the stream is cut off
    try:
        request = AddRequest(choice.request_id, choice.prompt_token_ids, params,
                             choice.priority)
        async with contextlib.aclosing(serving.engine.generate(request)) as updates:
            async for update in updates:
                now = time.monotonic()
                token_times.extend(now for _ in update.new_token_ids)
                first_scheduled = first_scheduled or update.first_scheduled_time
                delta = _to_delta(choice.index, update.new_token_ids, update.new_logprobs,
                                  update.finish_reason, update.stop_reason, detokenizer)
                yield delta
                if delta.finish_reason is not None:
                    finish = delta.finish_reason
                    return  # leaving the engine stream unfinished aborts the request there
    except EngineDeadError:
        finish = "error"
        raise
    finally:
        _record(serving, choice, finish, token_times, arrival, first_scheduled, detokenizer)


def _to_delta(index: int, token_ids: list[int], logprobs: list[TokenLogprobs] | None,
              finish: FinishReason | None, stop_reason: int | str | None,
              detokenizer: IncrementalDetokenizer) -> _Delta:
    update = detokenizer.apply_update(token_ids, finish, stop_reason)
    reason = update.finish_reason.value if update.finish_reason is not None else None
    return _Delta(index, update.text, list(token_ids), logprobs, reason, update.stop_reason)


def _record(serving: OpenAIServing, choice: _Choice, finish: str | None,
            token_times: list[float], arrival: float, first_scheduled: float | None,
            detokenizer: IncrementalDetokenizer) -> None:
    first_token = token_times[0] if token_times else None
    serving.metrics.record_request(
        finish_reason=finish or "abort", num_prompt_tokens=len(choice.prompt_token_ids),
        num_generation_tokens=len(token_times), arrival=arrival,
        first_scheduled=first_scheduled,
        first_token=first_token, token_times=token_times, finished=time.monotonic())
    if serving.limits.log_prompts:
        logger.info("request %s finished (%s): %r", choice.request_id, finish,
                    detokenizer.output_text)


def _as_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"the engine died while generating this request, so it did not "
                        f"complete ({exc}); retry it", code="engine_dead",
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


def _sampling_params(body: _SamplingRequest, max_tokens: int | None,
                     logprobs: int | None) -> SamplingParams:
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
            include_stop_str_in_output=body.include_stop_str_in_output)
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
    if body.echo and body.logprobs is not None:
        raise APIError(400, "'echo' with 'logprobs' is not supported (no prompt logprobs): "
                       "allowed is one of them", param="echo")
    _refuse_logit_bias(body)


def _refuse_unsupported_chat(body: ChatCompletionRequest) -> None:
    if body.tools:
        raise APIError(400, "'tools' is not supported by this server: allowed is an empty "
                       "list or null", param="tools")
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(400, f"'response_format.type'={body.response_format.type!r} is not "
                       "supported: allowed is 'text'", param="response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    _refuse_logit_bias(body)


def _refuse_logit_bias(body: _SamplingRequest) -> None:
    if body.logit_bias:
        raise APIError(400, "'logit_bias' is not supported: allowed is null or {}",
                       param="logit_bias")


def _template_role(role: str) -> str:
    # OpenAI's newer clients send "developer" where chat templates know "system".
    return "system" if role == "developer" else role


def _message_text(content: Any, index: int) -> str:
    if content is None:
        raise APIError(400, f"'messages[{index}].content' is null: allowed is a string or "
                       "a list of text parts", param=f"messages[{index}].content")
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)

"""Send one request, time it, and record what happened.

Timing uses ``time.perf_counter`` (monotonic, sub-microsecond). A streamed response is timed per
SSE chunk as soon as its line is read, before its JSON is decoded, so decoding never inflates
a measured latency. Failures never raise out of :meth:`RequestSender.send`: they become records
with a status and an error type, so one bad response cannot end a run.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec

from surge.bench.workloads import BenchRequest, count_tokens

__all__ = ["ENDPOINTS", "Endpoint", "RequestRecord", "RequestSender", "endpoint_url"]

ENDPOINTS = ("completions", "chat", "embeddings", "classify")
_PATHS = {
    "completions": "/v1/completions",
    "chat": "/v1/chat/completions",
    "embeddings": "/v1/embeddings",
    "classify": "/v1/classify",
}


@dataclass(slots=True)
class RequestRecord:
    """What one request did. Times are seconds; ``start`` is from the start of its run.

    ``itl`` holds the gaps between successive streamed chunks that carried text (one chunk is
    usually one token; a server that packs several tokens per chunk shows longer gaps, while
    TPOT, computed from token counts, stays per token). ``token_source`` says where
    ``output_tokens`` came from: the server's ``usage``, the tokenizer, or a count of chunks.
    """

    index: int
    start: float
    e2e: float = 0.0
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    token_source: str = "none"
    status: int = 0
    error_type: str | None = None
    error: str | None = None
    schedule_lag: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error_type is None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first: (e2e - ttft) / (output_tokens - 1)."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def endpoint_url(base_url: str, endpoint: str) -> str:
    """``http://host:8000`` or ``http://host:8000/v1`` plus the endpoint's path; a URL that
    already ends with an endpoint path is used as is."""
    if endpoint not in ENDPOINTS:
        raise ValueError(f"unknown endpoint {endpoint!r}: choose one of {', '.join(ENDPOINTS)}")
    base = base_url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"--url must start with http:// or https:// (got {base_url!r}), "
                         "e.g. --url http://127.0.0.1:8000")
    if any(base.endswith(path) for path in _PATHS.values()):
        return base
    if base.endswith("/v1"):
        base = base[: -len("/v1")]
    return base + _PATHS[endpoint]


@dataclass(frozen=True)
class Endpoint:
    """Turns a :class:`BenchRequest` into the JSON body one endpoint expects."""

    name: str
    model: str
    stream: bool = True
    ignore_eos: bool = True
    temperature: float = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)

    @property
    def streams(self) -> bool:
        return self.stream and self.name in ("completions", "chat")

    def body(self, request: BenchRequest) -> bytes:
        build = {
            "completions": self._completions,
            "chat": self._chat,
            "embeddings": self._embeddings,
            "classify": self._classify,
        }[self.name]
        return msgspec.json.encode({**build(request), **self.extra_body})

    def _generation(self, request: BenchRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": request.output_len,
            "temperature": self.temperature,
            "stream": self.stream,
        }
        if self.stream:
            body["stream_options"] = {"include_usage": True}
        if self.ignore_eos:
            body["ignore_eos"] = True  # vLLM/Surge extension: fixed output lengths
        return body

    def _completions(self, request: BenchRequest) -> dict[str, Any]:
        return {**self._generation(request), "prompt": request.prompt}

    def _chat(self, request: BenchRequest) -> dict[str, Any]:
        if not isinstance(request.prompt, str):
            raise ValueError("the chat endpoint needs text prompts: use --prompt-kind text")
        messages = [{"role": "user", "content": request.prompt}]
        if request.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": request.system_prompt})
        return {**self._generation(request), "messages": messages}

    def _embeddings(self, request: BenchRequest) -> dict[str, Any]:
        return {"model": self.model, "input": request.prompt}

    def _classify(self, request: BenchRequest) -> dict[str, Any]:
        return {"model": self.model, "image": request.image_b64}


# Typed views of the responses: msgspec decodes only these fields and skips the rest, which is
# both faster than building dicts and tolerant of each server's extra fields.
class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None


class _Message(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    text: str | None = None
    delta: _Delta | None = None
    message: _Message | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int | None = None


class _Response(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: Any = None


_decode_response = msgspec.json.Decoder(_Response).decode


def _choice_text(choice: _Choice) -> str | None:
    if choice.text is not None:
        return choice.text
    if choice.delta is not None:
        return choice.delta.content or choice.delta.reasoning_content
    if choice.message is not None:
        return choice.message.content
    return None


class _SseTimer:
    """Times the text-carrying events of one SSE stream into its record."""

    def __init__(self, record: RequestRecord, start: float) -> None:
        self.record = record
        self.start = start
        self.last_chunk_at = start
        self.texts: list[str] = []
        self.usage: _Usage | None = None
        self.finished = False

    def feed(self, lines: list[bytes], now: float) -> bool:
        """Handles complete lines that arrived at ``now``; True once ``[DONE]`` is seen."""
        for line in lines:
            if not line.startswith(b"data:"):
                continue  # blank separators, comments (": ping"), event: lines
            data = line[5:].strip()
            if data == b"[DONE]":
                self.finished = True
                return True
            self._event(_decode_response(data), now)
        return False

    def _event(self, chunk: _Response, now: float) -> None:
        if chunk.error is not None:
            raise StreamError(_error_message(chunk.error))
        self.usage = chunk.usage or self.usage
        text = _choice_text(chunk.choices[0]) if chunk.choices else None
        if not text:
            return  # role-only and empty deltas are not tokens
        if self.record.ttft is None:
            self.record.ttft = now - self.start
        else:
            self.record.itl.append(now - self.last_chunk_at)
        self.last_chunk_at = now
        self.texts.append(text)


class StreamError(Exception):
    """The server reported an error inside a 200 response."""


_JSON_HEADERS = {"Content-Type": "application/json"}  # auth and --header live on the session


class RequestSender:
    """Sends requests of one endpoint over a shared aiohttp session and times them."""

    def __init__(self, session: aiohttp.ClientSession, url: str, endpoint: Endpoint,
                 tokenizer: Any | None = None) -> None:
        self.session = session
        self.url = url
        self.endpoint = endpoint
        self.tokenizer = tokenizer

    async def send(self, index: int, body: bytes, request: BenchRequest,
                   run_start: float) -> RequestRecord:
        start = time.perf_counter()
        record = RequestRecord(index=index, start=start - run_start,
                               prompt_tokens=request.prompt_len)
        try:
            async with self.session.post(self.url, data=body, headers=_JSON_HEADERS) as resp:
                record.status = resp.status
                if resp.status != 200:
                    await _read_http_error(resp, record)
                elif self.endpoint.streams:
                    await self._read_stream(resp, record, start)
                else:
                    await self._read_body(resp, record, start)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure is data, never fatal
            _record_exception(record, exc)
        if record.e2e == 0.0:  # not already stopped at the last byte of a response
            record.e2e = time.perf_counter() - start
        return record

    async def _read_stream(self, resp: aiohttp.ClientResponse, record: RequestRecord,
                           start: float) -> None:
        events = _SseTimer(record, start)
        tail = b""
        # Whole network reads, split here: one readline() per SSE line costs several times
        # more, and lines that arrived in one read did arrive at the same moment.
        async for data in resp.content.iter_any():
            now = time.perf_counter()
            lines = (tail + data).split(b"\n")
            tail = lines.pop()
            if events.feed(lines, now):
                break
        if not events.finished and tail:
            events.feed([tail], time.perf_counter())
        record.e2e = time.perf_counter() - start
        if not events.finished and record.ttft is None:
            raise StreamError("stream ended before any token and without [DONE]")
        self._count_tokens(record, events.usage, events.texts, num_chunks=len(events.texts))

    async def _read_body(self, resp: aiohttp.ClientResponse, record: RequestRecord,
                         start: float) -> None:
        body = await resp.read()
        record.e2e = time.perf_counter() - start
        parsed = _decode_response(body)
        if parsed.error is not None:
            raise StreamError(_error_message(parsed.error))
        if self.endpoint.name in ("embeddings", "classify"):
            if parsed.usage is not None and parsed.usage.prompt_tokens:
                record.prompt_tokens = parsed.usage.prompt_tokens
            return
        texts = [t for c in parsed.choices or [] if (t := _choice_text(c))]
        self._count_tokens(record, parsed.usage, texts, num_chunks=None)

    def _count_tokens(self, record: RequestRecord, usage: _Usage | None, texts: list[str],
                      num_chunks: int | None) -> None:
        if usage is not None and usage.prompt_tokens:
            record.prompt_tokens = usage.prompt_tokens
        if usage is not None and usage.completion_tokens is not None:
            record.output_tokens, record.token_source = usage.completion_tokens, "usage"
        elif self.tokenizer is not None:
            record.output_tokens = count_tokens(self.tokenizer, "".join(texts))
            record.token_source = "tokenizer"
        elif num_chunks is not None:
            record.output_tokens, record.token_source = num_chunks, "chunks"


async def _read_http_error(resp: aiohttp.ClientResponse, record: RequestRecord) -> None:
    body = await resp.read()
    record.error_type = f"http_{resp.status}"
    record.error = body[:200].decode("utf-8", "replace")
    try:
        error = _decode_response(body).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        return
    if isinstance(error, dict) and error.get("type"):
        record.error_type = str(error["type"])
        record.error = str(error.get("message", ""))[:200]


def _error_message(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)[:200]
    return str(error)[:200]


# The first matching class names the error; order matters (subclasses before bases).
_ERROR_TYPES: list[tuple[type[BaseException], str]] = [
    (StreamError, "stream_error"),
    (TimeoutError, "timeout"),
    (aiohttp.ServerDisconnectedError, "server_disconnected"),
    (aiohttp.ClientConnectorError, "connection_error"),
    (aiohttp.ClientPayloadError, "payload_error"),
    (msgspec.DecodeError, "bad_response"),
    (msgspec.ValidationError, "bad_response"),
]


def _record_exception(record: RequestRecord, exc: BaseException) -> None:
    record.error_type = next((name for cls, name in _ERROR_TYPES if isinstance(exc, cls)),
                             type(exc).__name__)
    record.error = (str(exc) or type(exc).__name__)[:200]

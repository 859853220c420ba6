"""An OpenAI-compatible fake server whose latencies are scripted, not computed.

Tests measure it with the load generator and compare against the script; the ceiling benchmark
uses it with zero delays, so that everything measured is the generator's own cost. Token times
are scheduled against absolute deadlines (first token at ``ttft``, token k at ``ttft + k*tpot``)
so sleep overshoot does not accumulate over a long stream.

Run one by hand with ``surge bench fake-server --port 8001 --ttft 0.05 --tpot 0.01``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

__all__ = ["FakeScript", "FakeServer", "FakeServerThread", "serve"]


@dataclass
class FakeScript:
    """What the fake server does. Delays are seconds; a sequence is cycled over requests in
    the order they arrive. For embeddings and classify, ``ttft`` is the whole response delay.

    Failures are spread evenly: request i fails when floor((i+1)*rate) > floor(i*rate), so
    exactly ``error_rate`` of any run of requests fails, with no randomness. ``error_mode``
    "http" answers with ``error_status``; "stream" sends one token, then an error event.
    """

    ttft: float | Sequence[float] = 0.0
    tpot: float | Sequence[float] = 0.0
    output_tokens: int | None = None  # None: honour max_tokens
    error_rate: float = 0.0
    error_status: int = 500
    error_mode: str = "http"
    usage: bool = True  # answer stream_options.include_usage (off: like a server without it)
    model: str = "fake-model"
    token_text: str = " tok"
    embedding_dim: int = 8
    num_labels: int = 5

    def delay(self, values: float | Sequence[float], index: int) -> float:
        if isinstance(values, int | float):
            return float(values)
        return float(values[index % len(values)])

    def fails(self, index: int) -> bool:
        return math.floor((index + 1) * self.error_rate) > math.floor(index * self.error_rate)


@dataclass
class _Stats:
    """What the server saw, for tests to check the generator against."""

    arrivals: list[float] = field(default_factory=list)  # perf_counter() at each request
    in_flight: int = 0
    max_in_flight: int = 0

    @property
    def num_requests(self) -> int:
        return len(self.arrivals)


_encode = msgspec.json.encode
_decode = msgspec.json.decode


class _FakeApp:
    def __init__(self, script: FakeScript) -> None:
        self.script = script
        self.stats = _Stats()
        self.app = web.Application()
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_post("/v1/embeddings", self.embeddings)
        self.app.router.add_post("/v1/classify", self.classify)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/health", self.health)

    def _arrive(self) -> tuple[int, float]:
        index = self.stats.num_requests
        now = time.perf_counter()
        self.stats.arrivals.append(now)
        return index, now

    async def completions(self, request: web.Request) -> web.StreamResponse:
        with self._in_flight():
            return await self._generate(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        with self._in_flight():
            return await self._generate(request, chat=True)

    @contextlib.contextmanager
    def _in_flight(self) -> Iterator[None]:
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        try:
            yield
        finally:
            self.stats.in_flight -= 1

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        index, arrived = self._arrive()
        body = _decode(await request.read())
        if self.script.fails(index) and self.script.error_mode == "http":
            return _error_response(self.script.error_status)
        num_tokens = self.script.output_tokens or int(body.get("max_tokens") or 16)
        prompt_tokens = _prompt_tokens(body)
        if not body.get("stream"):
            await _sleep_until(arrived + self._stream_end(index, num_tokens))
            return _json(_full_completion(self.script, chat, num_tokens, prompt_tokens))
        include_usage = self.script.usage and bool(
            (body.get("stream_options") or {}).get("include_usage"))
        return await self._stream(request, index, arrived, chat, num_tokens,
                                  prompt_tokens if include_usage else None)

    def _stream_end(self, index: int, num_tokens: int) -> float:
        return (self.script.delay(self.script.ttft, index)
                + (num_tokens - 1) * self.script.delay(self.script.tpot, index))

    async def _stream(self, request: web.Request, index: int, arrived: float, chat: bool,
                      num_tokens: int, prompt_tokens: int | None) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunks = _ChunkWriter(resp)
        if chat:  # like most servers: the role arrives at once, before any token
            chunks.add(_chat_chunk({"role": "assistant", "content": ""}, None))
        ttft = self.script.delay(self.script.ttft, index)
        tpot = self.script.delay(self.script.tpot, index)
        fails = self.script.fails(index) and self.script.error_mode == "stream"
        for k in range(num_tokens):
            await chunks.flush_before(arrived + ttft + k * tpot)
            finish = "length" if k == num_tokens - 1 else None
            chunks.add(_token_chunk(self.script.token_text, chat, finish))
            if fails:
                chunks.add(b"data: " + _encode(_error_body(500)) + b"\n\n")
                break
        if prompt_tokens is not None and not fails:
            chunks.add(_usage_chunk(prompt_tokens, num_tokens))
        chunks.add(b"data: [DONE]\n\n")
        await chunks.flush()
        await resp.write_eof()
        return resp

    async def embeddings(self, request: web.Request) -> web.Response:
        index, arrived = self._arrive()
        body = _decode(await request.read())
        if self.script.fails(index):
            return _error_response(self.script.error_status)
        await _sleep_until(arrived + self.script.delay(self.script.ttft, index))
        inputs = body.get("input")
        tokens = len(inputs) if isinstance(inputs, list) else len(str(inputs).split())
        vector = [0.1] * self.script.embedding_dim
        return _json({
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": vector}],
            "model": self.script.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })

    async def classify(self, request: web.Request) -> web.Response:
        index, arrived = self._arrive()
        body = _decode(await request.read())
        if self.script.fails(index):
            return _error_response(self.script.error_status)
        if not body.get("image"):
            return _error_response(400, "missing 'image' (base64)")
        await _sleep_until(arrived + self.script.delay(self.script.ttft, index))
        top_k = int(body.get("top_k") or self.script.num_labels)
        labels = [{"label": f"class_{k}", "score": 1.0 / (k + 2)} for k in range(top_k)]
        return _json({"model": self.script.model, "labels": labels})

    async def models(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": [{"id": self.script.model, "object": "model"}]})

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")


class _ChunkWriter:
    """Collects SSE chunks due at the same moment into one write: with zero delays a whole
    stream leaves in a single write, which is what makes the fake server cheap enough to
    measure the generator's ceiling."""

    def __init__(self, resp: web.StreamResponse) -> None:
        self.resp = resp
        self.pending: list[bytes] = []

    def add(self, chunk: bytes) -> None:
        self.pending.append(chunk)

    async def flush_before(self, deadline: float) -> None:
        if deadline > time.perf_counter():
            await self.flush()
            await _sleep_until(deadline)

    async def flush(self) -> None:
        if self.pending:
            await self.resp.write(b"".join(self.pending))
            self.pending.clear()


async def _sleep_until(deadline: float) -> None:
    delay = deadline - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


def _prompt_tokens(body: dict[str, Any]) -> int:
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        return len(prompt)
    if isinstance(prompt, str):
        return len(prompt.split())
    messages = body.get("messages") or []
    return sum(len(str(m.get("content", "")).split()) for m in messages)


def _token_chunk(text: str, chat: bool, finish: str | None) -> bytes:
    if chat:
        return _chat_chunk({"content": text}, finish)
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return _sse({"id": "cmpl-fake", "object": "text_completion", "choices": [choice]})


def _chat_chunk(delta: dict[str, Any], finish: str | None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return _sse({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "choices": [choice]})


def _usage_chunk(prompt_tokens: int, output_tokens: int) -> bytes:
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": output_tokens,
             "total_tokens": prompt_tokens + output_tokens}
    return _sse({"id": "cmpl-fake", "choices": [], "usage": usage})


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + _encode(payload) + b"\n\n"


def _full_completion(script: FakeScript, chat: bool, num_tokens: int,
                     prompt_tokens: int) -> dict[str, Any]:
    text = script.token_text * num_tokens
    choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    result: dict[str, Any] = {"id": "cmpl-fake", "model": script.model, "choices": [choice]}
    if script.usage:
        result["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": num_tokens,
                           "total_tokens": prompt_tokens + num_tokens}
    return result


def _error_body(status: int, message: str = "scripted failure") -> dict[str, Any]:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def _error_response(status: int, message: str = "scripted failure") -> web.Response:
    return _json(_error_body(status, message), status=status)


def _json(payload: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=_encode(payload), status=status, content_type="application/json")


class FakeServer:
    """The fake server on the running event loop: ``async with FakeServer(script) as s: s.url``."""

    def __init__(self, script: FakeScript | None = None, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self._app = _FakeApp(script or FakeScript())
        self.host, self.port = host, port
        self._runner: web.AppRunner | None = None

    @property
    def script(self) -> FakeScript:
        return self._app.script

    @property
    def stats(self) -> _Stats:
        return self._app.stats

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        # A client that gives up cancels its handler, so an abandoned slow request never
        # holds up shutdown.
        self._runner = web.AppRunner(self._app.app, access_log=None, handle_signals=False,
                                     handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024)
        await site.start()
        self.port = self._runner.addresses[0][1]  # the real port when 0 asked for any

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> FakeServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class FakeServerThread:
    """The fake server on its own event loop in a daemon thread, for synchronous callers."""

    def __init__(self, script: FakeScript | None = None, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.server = FakeServer(script, host, port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="surge-fake-server")

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def stats(self) -> _Stats:
        return self.server.stats

    def __enter__(self) -> FakeServerThread:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


def serve(script: FakeScript, host: str = "127.0.0.1", port: int = 8001) -> None:
    """Serve until interrupted; prints the URL once listening (the benchmark reads it).

    Uses uvloop when it is installed: the fake must outrun the generator it measures.
    """

    async def run() -> None:
        async with FakeServer(script, host, port) as server:
            print(f"fake server listening on {server.url}", flush=True)
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        try:
            import uvloop
        except ImportError:
            asyncio.run(run())
        else:
            uvloop.run(run())

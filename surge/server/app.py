"""The OpenAI-compatible HTTP app: routes, the request gate (auth, body size) and the engine's
lifecycle (load in the background, watch its health, shut it down after the drain).

``build_app(engine, tokenizer, settings)`` is everything ``surge serve`` runs under uvicorn;
the engine is any ``EngineClient`` (its own process in production, a thread in tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from starlette.responses import Response

import surge
from surge.engine.client import EngineClient
from surge.http.auth import ApiKeyAuth, RateLimiter
from surge.http.errors import APIError
from surge.http.gate import RequestGate, key_id
from surge.http.handlers import install_error_handlers
from surge.http.openapi import document_validation_as_400, event_stream_content
from surge.http.responses import json_response
from surge.http.services import Services
from surge.server.admission import AdmissionController
from surge.server.metrics import ServerMetrics
from surge.server.pooling import ModelPools, NoGenerationEngine, add_pooling_routes
from surge.server.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    HealthResponse,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from surge.server.serving import OpenAIServing, ServingLimits
from surge.tokenizer import ChatTokenizer

__all__ = ["ServerSettings", "build_app"]

logger = logging.getLogger(__name__)

# How often the engine's health is looked at; an engine death shows on /health this fast.
HEALTH_POLL_SECONDS = 0.1
# After the engine died for good, in-flight requests get this long to receive their errors
# before the server exits.
FAIL_IN_FLIGHT_SECONDS = 5.0
ENGINE_SHUTDOWN_SECONDS = 15.0
# Requests still running this long before the drain timeout are ended with an error event.
DRAIN_MARGIN_SECONDS = 0.5
_AUTH_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


@dataclass
class ServerSettings:
    """What ``surge serve`` configures beyond the engine; every field has a safe default."""

    model_names: list[str] = field(default_factory=lambda: ["surge"])
    api_keys: list[str] = field(default_factory=list)
    rate_limit_rpm: int | None = None
    rate_limit_tpm: int | None = None
    max_body_bytes: int = 8 << 20
    max_queued_requests: int = 256
    max_queued_tokens: int = 256 * 1024
    request_timeout: float | None = 600.0
    drain_timeout: float = 30.0
    log_prompts: bool = False
    # surge.batch.config.BatchSettings: the Files and Batches API; None leaves it off.
    batch: Any = None

    def __post_init__(self) -> None:
        _require(bool(self.model_names) and all(self.model_names), "served_model_name",
                 self.model_names, "one or more non-empty names")
        _require(self.max_body_bytes >= 1024, "max_body_bytes", self.max_body_bytes,
                 "an integer >= 1024")
        _require(self.request_timeout is None or self.request_timeout > 0, "request_timeout",
                 self.request_timeout, "a number of seconds > 0")
        _require(self.drain_timeout >= 0, "drain_timeout", self.drain_timeout,
                 "a number of seconds >= 0")


def build_app(engine: EngineClient | None, tokenizer: ChatTokenizer | None,
              settings: ServerSettings, pools: ModelPools | None = None) -> FastAPI:
    """``engine=None``: no text-generation model, only the embedding or classification
    models of ``pools`` (which may also accompany an LLM)."""
    can_generate = engine is not None
    engine = engine if engine is not None else NoGenerationEngine()
    metrics = ServerMetrics(model_name=settings.model_names[0])
    if hasattr(engine, "engine_pid"):
        metrics.track_engine_process(lambda: engine.engine_pid)
    serving = OpenAIServing(
        engine, tokenizer, settings.model_names,
        AdmissionController(settings.max_queued_requests, settings.max_queued_tokens),
        RateLimiter(settings.rate_limit_rpm, settings.rate_limit_tpm), metrics,
        ServingLimits(settings.request_timeout, settings.log_prompts))
    lifecycle = _EngineLifecycle(engine, serving, settings)
    app = FastAPI(title="Surge", version=surge.__version__, lifespan=lifecycle.lifespan,
                  description="OpenAI-compatible API of the Surge serving engine.")
    app.state.serving = serving
    app.state.lifecycle = lifecycle
    install_error_handlers(app)
    document_validation_as_400(app)
    app.add_middleware(RequestGate, auth=ApiKeyAuth(settings.api_keys),
                       max_body_bytes=settings.max_body_bytes, auth_prefixes=_AUTH_PREFIXES,
                       on_reject=metrics.record_rejected)
    serving.can_generate = can_generate
    _add_openai_routes(app, serving)
    _add_operator_routes(app, serving)
    add_pooling_routes(app, serving, pools or ModelPools([]))
    if settings.batch is not None and settings.batch.enabled:
        from surge.batch.routes import add_batch_routes

        add_batch_routes(app, settings.batch, settings.api_keys)
    return app


# -- routes ----------------------------------------------------------------------------------

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in [
        (400, "invalid request (the message names the field and what is allowed)"),
        (401, "missing or wrong API key"), (404, "unknown model"),
        (413, "request body too large"), (429, "rate limited or server busy (Retry-After)"),
        (500, "unexpected server error"),
        (503, "model loading, engine down, or server shutting down"),
        (504, "the request exceeded --request-timeout")]}


def _generation_responses(model: type, chunk: type) -> dict[int | str, dict[str, Any]]:
    return {200: {"model": model, "description": f"a {model.__name__}; with stream=true, "
                  f"text/event-stream of `data: <{chunk.__name__}>` then `data: [DONE]`",
                  "content": event_stream_content(
                      f"a JSON {chunk.__name__}, or [DONE] after the last one")},
            **_ERRORS}


def _add_openai_routes(app: FastAPI, serving: OpenAIServing) -> None:
    @app.post("/v1/completions", response_model=None, tags=["openai"],
              responses=_generation_responses(CompletionResponse, CompletionStreamResponse))
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        serving.check_model(body.model)
        serving.check_available()
        return await serving.create_completion(body, request, _key_id(request))

    @app.post("/v1/chat/completions", response_model=None, tags=["openai"],
              responses=_generation_responses(ChatCompletionResponse,
                                              ChatCompletionStreamResponse))
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        serving.check_model(body.model)
        serving.check_available()
        return await serving.create_chat_completion(body, request, _key_id(request))

    @app.get("/v1/models", response_model=ModelList, tags=["openai"],
             responses={401: _ERRORS[401]})
    async def list_models() -> Response:
        max_len = serving.engine.info.max_model_len if serving.engine.is_ready else None
        root = serving.engine.info.model_dir if serving.engine.is_ready else None
        cards = [{"id": name, "object": "model", "created": serving.created,
                  "owned_by": "surge", "root": root or name, "max_model_len": max_len,
                  "task": "generate"}
                 for name in serving.model_names if serving.can_generate]
        cards += app.state.pools.cards()
        return json_response({"object": "list", "data": cards})

    @app.post("/tokenize", response_model=TokenizeResponse, tags=["vllm"],
              responses={k: _ERRORS[k] for k in (400, 401, 404, 413)})
    async def tokenize(body: TokenizeRequest) -> Response:
        serving.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of 'prompt' or 'messages'", param="prompt")
        if body.prompt is not None:
            ids = await serving.encode(body.prompt, body.add_special_tokens is not False)
        else:
            text = serving.render_chat(body.messages or [], body.add_generation_prompt)
            ids = await serving.encode(text, bool(body.add_special_tokens))
        max_len = serving.engine.info.max_model_len if serving.engine.is_ready else None
        return json_response({"count": len(ids), "max_model_len": max_len, "tokens": ids})

    @app.post("/detokenize", response_model=DetokenizeResponse, tags=["vllm"],
              responses={k: _ERRORS[k] for k in (400, 401, 404, 413)})
    async def detokenize(body: DetokenizeRequest) -> Response:
        serving.check_model(body.model)
        vocab_size = serving.tokenizer.vocab_size
        bad = [t for t in body.tokens if t >= vocab_size]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are unknown: allowed is "
                           f"[0, {vocab_size - 1}]", param="tokens")
        return json_response({"prompt": serving.tokenizer.decode(body.tokens)})


def _add_operator_routes(app: FastAPI, serving: OpenAIServing) -> None:
    @app.get("/health", response_model=HealthResponse, tags=["operations"],
             responses={503: _ERRORS[503]})
    async def health() -> Response:
        """200 when the engine can take requests; 503 while loading, after the engine died,
        and while draining for shutdown."""
        serving.check_available()
        app.state.pools.check_ready()  # every served model, not only the LLM
        # The engine process id lets operators (and the crash test) find the engine.
        return json_response({"status": "ok",
                              "engine_pid": getattr(serving.engine, "engine_pid", None),
                              "engine_restarts": getattr(serving.engine, "num_restarts", 0)})

    @app.get("/metrics", tags=["operations"], response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus exposition"}})
    async def metrics() -> Response:
        if serving.engine.is_ready:
            serving.metrics.update_engine(serving.engine.stats())
        body, content_type = serving.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/version", tags=["operations"])
    async def version() -> dict[str, str]:
        return {"version": surge.__version__}


def _key_id(request: Request) -> str | None:
    return key_id(request.scope)


# -- engine lifecycle ------------------------------------------------------------------------


class _EngineLifecycle:
    """Loads the engine without blocking the server (so /health can say 503 while loading),
    watches it, drains on shutdown, and asks the process to exit if the engine is gone."""

    def __init__(self, engine: EngineClient, serving: OpenAIServing,
                 settings: ServerSettings) -> None:
        self.engine = engine
        self.serving = serving
        self.settings = settings
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        # serve.py replaces this with "stop uvicorn and exit with this code".
        self.request_exit: Callable[[int], None] = lambda code: None
        # Features with their own background work (batch workers, model pools, storage) add
        # theirs here before the app starts; they are entered after the engine's loader task
        # starts and exited, in reverse order, before the engine stops.
        self.services = Services()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run())
        try:
            async with self.services.running():
                yield
        finally:
            await self._stop()

    def begin_drain(self) -> None:
        """Called on SIGTERM: new requests get 503 while in-flight ones finish; those still
        running shortly before the drain timeout end with an error the client can read
        (uvicorn would only cut their connections)."""
        self.serving.refusal = APIError(503, "the server is shutting down: send new requests "
                                        "to another replica", code="server_draining")
        self._draining = True
        if hasattr(self.engine, "restart"):
            # An engine that dies now (e.g. it got the same signal) is not worth restarting.
            self.engine.restart = False
        if self._loop is None:
            return
        timeout = self.settings.drain_timeout
        stopped = APIError(503, f"the server shut down before this request finished "
                           f"(--drain-timeout {timeout:g} s)", code="server_shutdown")
        delay = max(timeout - DRAIN_MARGIN_SECONDS, 0.0)
        # Called from a signal handler: hand the work to the event loop.
        self._loop.call_soon_threadsafe(self._loop.call_later, delay, self.serving.abort_all,
                                        stopped)

    async def _run(self) -> None:
        started = time.perf_counter()
        try:
            await self.engine.start()
        except Exception as exc:
            logger.error("the engine could not start: %s", exc)
            self.serving.refusal = APIError(503, f"the engine could not start: {exc}",
                                            code="engine_failed")
            self.request_exit(1)
            return
        info = self.engine.info
        logger.info("engine ready in %.1f s: %s (%s on %s, context %d tokens); /health "
                    "answers 200", time.perf_counter() - started, info.model_dir, info.dtype,
                    info.device, info.max_model_len)
        await self._watch()

    async def _watch(self) -> None:
        healthy = True
        while not self._gone_for_good():
            await asyncio.sleep(HEALTH_POLL_SECONDS)  # the client offers no health event
            if healthy != self.engine.is_healthy:
                healthy = not healthy
                if healthy:
                    logger.warning("the engine is back: /health answers 200 again")
                else:
                    logger.error("the engine stopped: /health answers 503")
        if not self._draining:  # while draining, uvicorn is already on its way out
            await self._give_up()

    def _gone_for_good(self) -> bool:
        dead = getattr(self.engine, "dead", None)
        if dead is not None:  # the process client restarts the engine unless told not to
            return bool(dead)
        return not self.engine.is_healthy  # an engine thread cannot be restarted

    async def _give_up(self) -> None:
        self.serving.refusal = APIError(503, "the engine died and will not be restarted: the "
                                        "server is exiting", code="engine_dead")
        deadline = time.monotonic() + FAIL_IN_FLIGHT_SECONDS
        while self.serving.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(HEALTH_POLL_SECONDS)  # their engine streams already failed
        logger.error("the engine is gone and restarts are off: exiting with status 1")
        self.request_exit(1)

    async def _stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await asyncio.wait_for(self.engine.shutdown(), ENGINE_SHUTDOWN_SECONDS)
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise
            logger.error("the engine's shutdown was cancelled from within")
        except Exception as exc:
            logger.error("the engine did not shut down cleanly: %r", exc)


def _require(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: allowed is {allowed}")

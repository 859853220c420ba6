"""The OpenAI-compatible HTTP app: the request gate (auth, body size), the served-models
authority, the endpoint families and the operator routes, and the lifecycle that runs the
background services (the engine's supervision first, when there is an LLM).

``build_app(settings, llm, features)`` is everything ``surge serve`` runs under uvicorn; the
engine is any ``EngineClient`` (its own process in production, a thread in tests). Features
(the batch API, the web apps, embedding and classification models) are composed by the caller
(``surge.entrypoints.serve``); this package imports none of them.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from starlette.responses import Response
from starlette.types import Scope

import surge
from surge.config import require
from surge.engine.client import EngineClient
from surge.http.auth import ApiKeyAuth, RateLimiter
from surge.http.control import ServerControl
from surge.http.errors import APIError
from surge.http.gate import FastRefusals, RequestGate
from surge.http.handlers import install_error_handlers
from surge.http.observe import ObservedRequests
from surge.http.openapi import document_validation_as_400, error_responses
from surge.http.responses import json_response
from surge.http.services import Services
from surge.server.admission import AdmissionController
from surge.server.completions import OpenAIServingCompletions, add_generation_routes
from surge.server.context import RequestContext
from surge.server.docs import add_offline_docs
from surge.server.features import Feature, ServerHost, ServingLoad
from surge.server.lifecycle import EngineSupervision, EngineSupervisor, ServerLifecycle
from surge.server.metrics import ServerMetrics
from surge.server.models import ServedModel, ServedModels
from surge.server.observing import make_observer, record_stage
from surge.server.profiling import add_profile_route
from surge.server.responses import add_responses_routes
from surge.server.schemas import HealthResponse, ModelList
from surge.server.tenants import Tenants, TenantsConfig, reloading_on_sighup
from surge.server.tokenize import add_tokenize_routes
from surge.tokenizer import ChatTokenizer

__all__ = ["GenerationModel", "ServerSettings", "build_app"]

logger = logging.getLogger(__name__)

_AUTH_PREFIXES = ("/v1/", "/tokenize", "/detokenize", "/debug/")
# Routes whose requests wait in the admission queue: refused before their body is read when
# it is full.
_QUEUED_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses"})


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
    # Observability (surge.server.observing): one JSON log line per request, OTLP traces,
    # and POST /debug/profile.
    log_format: str = "text"
    otlp_endpoint: str | None = None
    enable_profiler: bool = False
    # Tenants (surge.server.tenants): the header naming the tenant, and the file of weights
    # and limits (reloaded on SIGHUP).
    tenant_header: str | None = None
    tenants_file: str | None = None

    def __post_init__(self) -> None:
        require(bool(self.model_names) and all(self.model_names), "served_model_name",
                self.model_names, "one or more non-empty names")
        require(self.max_body_bytes >= 1024, "max_body_bytes", self.max_body_bytes,
                "an integer >= 1024")
        require(self.request_timeout is None or self.request_timeout > 0, "request_timeout",
                self.request_timeout, "a number of seconds > 0")
        require(self.drain_timeout >= 0, "drain_timeout", self.drain_timeout,
                "a number of seconds >= 0")


@dataclass(frozen=True)
class GenerationModel:
    """The server's text-generation model: its engine, its tokenizer, and how the engine's
    process is watched (default: an engine thread, never restarted)."""

    engine: EngineClient
    tokenizer: ChatTokenizer
    supervision: EngineSupervision | None = None


class _NoGeneration:
    """The load of a server without an LLM: nothing interactive to yield to."""

    def __init__(self, context: RequestContext) -> None:
        self.context = context

    def num_in_flight(self) -> int:
        return 0

    def num_waiting_for_first_token(self, more_urgent_than: int) -> int:
        return 0

    def can_run(self) -> bool:
        return self.context.accepting


def build_app(settings: ServerSettings, llm: GenerationModel | None = None,
              features: Sequence[Feature] = (),
              control: ServerControl | None = None) -> FastAPI:
    """``llm=None``: no text-generation model (the features bring embedding or
    classification models). ``control`` is bound by the server that runs the app."""
    control = control or ServerControl()
    metrics = ServerMetrics(model_name=settings.model_names[0])
    context = RequestContext(
        AdmissionController(settings.max_queued_requests, settings.max_queued_tokens),
        RateLimiter(settings.rate_limit_rpm, settings.rate_limit_tpm), metrics,
        settings.request_timeout, Tenants(settings.tenant_header, settings.tenants_file))
    models, services = ServedModels(), Services()
    observer = make_observer(settings.log_format, settings.log_prompts, settings.otlp_endpoint)
    context.stage_observers.append(record_stage)  # stages' runs become the request's spans
    services.add(observer.running)
    serving = supervisor = None
    if llm is not None:
        serving = OpenAIServingCompletions(llm.engine, llm.tokenizer, settings.model_names, context,
                                metrics, settings.log_prompts)
        supervisor = _supervise(llm, serving, context, control, settings, metrics)
        services.add(supervisor.running)
        _register_llm(models, serving)
    if settings.tenants_file is not None:
        services.add(_tenants_reload(context, llm))
    lifecycle = ServerLifecycle(context, services,
                                drain_hooks=[supervisor.begin_drain] if supervisor else [])
    app = FastAPI(title="Surge", version=surge.__version__, lifespan=lifecycle.lifespan,
                  description="OpenAI-compatible API of the Surge serving engine.",
                  docs_url=None, **_without_fastapi_telemetry())
    add_offline_docs(app, "Surge")  # Swagger UI's assets ship with the package: no CDN
    control.on_drain(lifecycle.begin_drain)
    install_error_handlers(app)
    document_validation_as_400(app)
    app.add_middleware(RequestGate, auth=ApiKeyAuth(settings.api_keys),
                       max_body_bytes=settings.max_body_bytes, auth_prefixes=_AUTH_PREFIXES,
                       on_reject=metrics.record_rejected,
                       shed=_shed_when_full(context))
    app.add_middleware(ObservedRequests, observer=observer)  # outside: its time has the gate
    app.add_middleware(FastRefusals, auth=ApiKeyAuth(settings.api_keys),
                       max_body_bytes=settings.max_body_bytes, paths=_QUEUED_ROUTES,
                       busy=context.admission.is_full, shed=_shed_when_full(context),
                       on_reject=metrics.record_rejected)  # outermost: overload's 429s
    add_generation_routes(app, models)
    add_responses_routes(app, models)
    add_tokenize_routes(app, models)
    _add_operator_routes(app, models, context, metrics, llm, serving)
    if settings.enable_profiler and llm is not None:
        add_profile_route(app, llm.engine)
    load: ServingLoad = serving if serving is not None else _NoGeneration(context)
    host = ServerHost(settings, models, context, metrics, services, load, control)
    for feature in features:
        feature.mount(app, host)
    return app


def _without_fastapi_telemetry() -> dict[str, Any]:
    """FastAPI's own OpenTelemetry hooks (0.16x) look up the global providers on every
    request, ~16 µs under a flood of 429s; Surge traces requests itself (--otlp-endpoint)."""
    if "telemetry" not in inspect.signature(FastAPI).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def _shed_when_full(context: RequestContext
                    ) -> Callable[[Scope, bytes | None], APIError | None]:
    """Under a flood of clients that ignore Retry-After, each 429 used to cost ~4 ms of this
    process's CPU (body read, JSON, validation, tokenizing) and starve the engine: with the
    queue full, a generation request is refused before any of that (no logging either):
    before its body is read when its headers name its tenant, else once the body is read and
    names no ``user`` (a ``user`` may be a tenant with room)."""
    def shed(scope: Scope, body: bytes | None) -> APIError | None:
        if scope["path"] not in _QUEUED_ROUTES or scope["method"] != "POST":
            return None
        return context.shed(scope, body)

    return shed


def _tenants_reload(context: RequestContext,
                    llm: GenerationModel | None) -> Callable[[], Any]:
    """SIGHUP reloads the tenants file; the engine gets the new weights."""
    async def apply(config: TenantsConfig) -> None:
        context.tenant_metrics.reserve(config.tenants)
        if llm is not None and llm.engine.is_ready:
            await llm.engine.set_tenant_weights(config.weights())

    return lambda: reloading_on_sighup(context.tenants, apply)


def _supervise(llm: GenerationModel, serving: OpenAIServingCompletions, context: RequestContext,
               control: ServerControl, settings: ServerSettings,
               metrics: ServerMetrics) -> EngineSupervisor:
    supervision = llm.supervision or EngineSupervision.of_thread(llm.engine)
    if llm.supervision is not None:  # an engine process of its own
        metrics.track_engine_process(supervision.pid)
    return EngineSupervisor(llm.engine, supervision, context, control,
                            settings.drain_timeout, serving.abort_all)


def _register_llm(models: ServedModels, serving: OpenAIServingCompletions) -> None:
    for name in serving.model_names:
        models.add(ServedModel(name, "generate", serving, root=serving.model_dir,
                               max_model_len=serving.max_model_len))


# -- operator routes -------------------------------------------------------------------------


def _add_operator_routes(app: FastAPI, models: ServedModels, context: RequestContext,
                         metrics: ServerMetrics, llm: GenerationModel | None,
                         serving: OpenAIServingCompletions | None) -> None:
    supervision = llm and (llm.supervision or EngineSupervision.of_thread(llm.engine))

    @app.get("/v1/models", response_model=ModelList, tags=["openai"],
             responses=error_responses({401: "missing or wrong API key"}))
    async def list_models() -> Response:
        return json_response({"object": "list", "data": models.cards()})

    @app.get("/health", response_model=HealthResponse, tags=["operations"],
             responses=error_responses({503: "model loading, engine down, or server "
                                             "shutting down"}))
    async def health() -> Response:
        """200 when every model can take requests; 503 while loading, after the engine
        died, and while draining for shutdown."""
        context.check_accepting()
        if serving is not None:
            serving.check_available()
        models.check_ready()  # every served model, not only the LLM
        # The engine process id lets operators (and the crash test) find the engine.
        return json_response({"status": "ok",
                              "engine_pid": supervision.pid() if supervision else None,
                              "engine_restarts": supervision.num_restarts()
                              if supervision else 0})

    @app.get("/metrics", tags=["operations"], response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                              "description": "Prometheus exposition"}})
    async def render_metrics() -> Response:
        if llm is not None and llm.engine.is_ready:
            stats = llm.engine.stats()
            metrics.update_engine(stats)
            context.tenant_metrics.update_engine(stats.tenants)
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/version", tags=["operations"])
    async def version() -> dict[str, str]:
        return {"version": surge.__version__}



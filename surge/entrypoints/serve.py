"""`surge serve`: the OpenAI-compatible HTTP server in front of the engine.

The server listens at once and loads the model in the background (``/health`` answers 503
until it is ready). SIGTERM or Ctrl-C drain: new requests get 503, in-flight ones get up to
``--drain-timeout`` seconds to finish, the rest are aborted, the engine shuts down, and the
process exits 0 (SIGTERM to the whole process group, systemd's default, does the same: the
engine ignores it while the server lives, and the server stops it after the drain). If the
engine dies, in-flight requests get an error and it is restarted, at most
``--engine-max-restarts`` times within any ``--engine-restart-window`` seconds (3 in 600 s);
past that budget, or with ``--no-engine-restart``, the process exits 1.

This is where the server meets its optional features: each (embedding and classification
models, the batch API, the web apps) is a ``FeaturePlugin`` that adds its flags and, when on,
mounts on the app built by ``surge.server.app.build_app``; the server package knows none of
them.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from surge.config import EngineConfig, add_engine_args
from surge.entrypoints.default_model import DEMO_SERVED_NAME, default_model
from surge.http.logs import configure_logging, uvicorn_log_config
from surge.server.observing import observability_settings

if TYPE_CHECKING:
    from surge.engine.mp_client import MPEngineClient
    from surge.server.app import GenerationModel, ServerSettings
    from surge.server.features import FeaturePlugin
    from surge.server.lifecycle import EngineSupervision
    from surge.tokenizer import ChatTokenizer

__all__ = ["add_serve_args", "run_serve"]

logger = logging.getLogger("surge.serve")

API_KEY_ENV = "SURGE_API_KEY"


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """Every `surge serve` flag: HTTP, admission, security, then the engine's own."""
    http = parser.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1",
                      help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    http.add_argument("--port", type=int, default=8000, help="0 picks a free port (logged)")
    http.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                      help="name(s) clients use as `model` (default: the --model value; "
                           "with no --model, smollm2-135m-instruct, or 'surge-demo' for the "
                           "random-weight fallback)")
    http.add_argument("--engine-mode", choices=("process", "thread"), default="process",
                      help="run the engine core in its own process (default) or on a thread "
                           "of the server process")
    http.add_argument("--no-engine-restart", dest="engine_restart", action="store_false",
                      help="if the engine process dies, fail in-flight requests and exit 1 "
                           "instead of restarting it")
    http.add_argument("--engine-max-restarts", type=int, default=3,
                      help="restarts of a dying engine allowed within --engine-restart-window; "
                           "one more death exits the server with status 1 (default 3)")
    http.add_argument("--engine-restart-window", type=float, default=600.0,
                      help="seconds over which --engine-max-restarts counts: deaths further "
                           "apart are always restarted (default 600)")
    http.add_argument("--request-timeout", type=float, default=600.0,
                      help="seconds a request may take before it is aborted with 504 "
                           "(default 600; 0 disables)")
    http.add_argument("--drain-timeout", type=float, default=30.0,
                      help="on SIGTERM, seconds in-flight requests get to finish (default 30)")
    http.add_argument("--header-timeout", type=float, default=10.0,
                      help="close a connection whose request headers take longer than this "
                           "many seconds, counted from its opening or previous response "
                           "(default 10)")
    http.add_argument("--max-connections", type=int, default=None,
                      help="client connections open at most; past it a new one evicts the "
                           "one waiting longest for its headers (default: what the open-file "
                           "limit leaves spare)")
    http.add_argument("--log-level", default="info",
                      choices=("critical", "error", "warning", "info", "debug"))
    http.add_argument("--access-log", action="store_true", help="log every HTTP request")

    admission = parser.add_argument_group("admission control")
    admission.add_argument("--max-queued-requests", type=int, default=256,
                           help="requests waiting for their first token before new ones get "
                                "429 (default 256)")
    admission.add_argument("--max-queued-tokens", type=int, default=256 * 1024,
                           help="prompt tokens waiting before new requests get 429 "
                                "(default 262144)")
    admission.add_argument("--tenants", default=None, metavar="FILE", dest="tenants_file",
                           help="TOML or JSON file of per-tenant weight, max_queued_requests, "
                                "max_in_flight, requests_per_minute, tokens_per_minute; "
                                "reloaded on SIGHUP (see surge.server.tenants)")
    admission.add_argument("--tenant-header", default=None, metavar="NAME",
                           help="header naming the tenant when no API key does (e.g. "
                                "X-Tenant, set by a gateway); else the body's 'user', else "
                                "one anonymous tenant")

    security = parser.add_argument_group("security")
    security.add_argument("--api-key", action="append", default=None, dest="api_keys",
                          metavar="KEY", help=f"require 'Authorization: Bearer KEY' on /v1 "
                          f"routes; repeat for several keys (also ${API_KEY_ENV}, one per line)")
    security.add_argument("--rate-limit-rpm", type=int, default=None,
                          help="requests per minute per API key (default: no limit)")
    security.add_argument("--rate-limit-tpm", type=int, default=None,
                          help="tokens (prompt + max_tokens) per minute per API key")
    security.add_argument("--max-body-bytes", type=int, default=8 << 20,
                          help="largest request body accepted, else 413 (default 8 MiB)")
    security.add_argument("--log-prompts", action="store_true",
                          help="log prompts and outputs (off by default: they may be private)")

    from surge.server.observing import add_observability_args

    add_observability_args(parser)
    pooling, batch, apps, cache, stages = _plugins()
    pooling.add_args(parser)
    batch.add_args(parser)
    add_engine_args(parser.add_argument_group("engine"))
    apps.add_args(parser)
    cache.add_args(parser)
    stages.add_args(parser)

    from surge.router.cli import add_replica_args

    add_replica_args(parser)


def _plugins() -> list[FeaturePlugin]:
    """Every optional feature of `surge serve`, in the order they mount (and their flags
    show in --help): embedding and classification models, the batch API, the web apps,
    the response cache."""
    from surge.apps.config import AppsPlugin
    from surge.batch.config import BatchPlugin
    from surge.cache.config import CachePlugin
    from surge.entrypoints.serve_pooling import PoolingPlugin
    from surge.stages.config import StagesPlugin

    # Stages mount last: their setup sees every served model (the intent router's embedder).
    return [PoolingPlugin(), BatchPlugin(), AppsPlugin(), CachePlugin(), StagesPlugin()]


def run_serve(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format)
    settings_from_args(args)  # bad flags fail before any model is pulled or written
    if not args.model:
        args.model, is_demo = default_model()
        if is_demo and not args.served_model_name:
            args.served_model_name = [DEMO_SERVED_NAME]
    settings = settings_from_args(args)
    from surge.entrypoints.serve_pooling import main_model_generates, resolve_model_arg

    model_dir = resolve_model_arg(args.model)
    from surge.entrypoints.replicated import run_replicated
    from surge.router.cli import wants_router

    if wants_router(args):  # N replicas of this server behind a router on --host/--port
        return run_replicated(args, model_dir, settings)
    config = EngineConfig.from_args(args)
    config.model = model_dir
    if settings.tenants_file is not None:  # the fair scheduler's weights (SIGHUP updates)
        from surge.server.tenants import TenantsConfig

        config.tenant_weights = TenantsConfig.load(settings.tenants_file).weights()

    import uvicorn

    from surge.http.connections import ConnectionGuard
    from surge.http.control import ServerControl
    from surge.http.server import DrainingServer
    from surge.server.app import build_app
    from surge.tokenizer import load_tokenizer

    features = [feature for plugin in _plugins()
                if (feature := plugin.from_args(args, settings, model_dir)) is not None]
    # Embedding and classification models are served without the LLM engine.
    llm = None
    if main_model_generates(model_dir):
        llm = make_llm(args.engine_mode, config, model_dir, args.engine_restart,
                       load_tokenizer(model_dir, config.chat_template),
                       max_restarts=args.engine_max_restarts,
                       restart_window=args.engine_restart_window)
    control = ServerControl()
    app = build_app(settings, llm, features, control)
    server = DrainingServer(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level,
        access_log=args.access_log, timeout_graceful_shutdown=settings.drain_timeout,
        lifespan="on", **uvicorn_log_config(args.log_format)),
        on_started=_announce(settings.model_names[0]), control=control,
        guard=ConnectionGuard(header_timeout=args.header_timeout,
                              max_connections=args.max_connections))
    logger.info("loading %s (%s engine); /health answers 503 until it is ready", model_dir,
                args.engine_mode)
    server.run()
    return server.exit_code


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    from surge.server.app import ServerSettings

    # The environment may hold several keys, one per line (how --replicas passes them on).
    api_keys = args.api_keys or [key.strip() for key in
                                 os.environ.get(API_KEY_ENV, "").splitlines() if key.strip()]
    names = args.served_model_name or [args.model or DEMO_SERVED_NAME]
    for name, value, low in [("max_queued_requests", args.max_queued_requests, 1),
                             ("max_queued_tokens", args.max_queued_tokens, 1),
                             ("port", args.port, 0),
                             ("max_connections", getattr(args, "max_connections", None) or 1, 1),
                             ("engine_max_restarts", getattr(args, "engine_max_restarts", 0),
                              0)]:
        if value < low:
            raise ValueError(f"--{name.replace('_', '-')}={value} is invalid: allowed is an "
                             f"integer >= {low}")
    for name in ("header_timeout", "engine_restart_window"):
        if getattr(args, name, 1.0) <= 0:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid: "
                             "allowed is a number of seconds > 0")
    return ServerSettings(
        model_names=names, api_keys=api_keys,
        rate_limit_rpm=args.rate_limit_rpm, rate_limit_tpm=args.rate_limit_tpm,
        max_body_bytes=args.max_body_bytes, max_queued_requests=args.max_queued_requests,
        max_queued_tokens=args.max_queued_tokens,
        request_timeout=args.request_timeout or None, drain_timeout=args.drain_timeout,
        log_prompts=args.log_prompts, **_tenant_settings(args),
        **observability_settings(args))


def _tenant_settings(args: argparse.Namespace) -> dict[str, str | None]:
    """--tenants and --tenant-header, checked now: a bad file fails before a model loads."""
    from surge.server.tenants import Tenants

    path, header = getattr(args, "tenants_file", None), getattr(args, "tenant_header", None)
    Tenants(header, path)  # raises ValueError naming the flag's problem
    return {"tenants_file": path, "tenant_header": header}


def make_llm(mode: str, config: EngineConfig, model_dir: str, restart: bool,
             tokenizer: ChatTokenizer, *, max_restarts: int = 3,
             restart_window: float = 600.0) -> GenerationModel:
    """The engine client of ``mode``, with what the server needs to supervise it."""
    from surge.server.app import GenerationModel

    if mode == "thread":
        from surge.engine.client import InprocEngineClient

        return GenerationModel(InprocEngineClient(config, model_dir), tokenizer)
    from surge.engine.mp_client import MPEngineClient

    engine = MPEngineClient(config, model_dir, restart=restart, max_restarts=max_restarts,
                            restart_window=restart_window)
    return GenerationModel(engine, tokenizer, _process_supervision(engine))


def _process_supervision(engine: MPEngineClient) -> EngineSupervision:
    from surge.server.lifecycle import EngineSupervision

    def stop_restarting() -> None:
        engine.restart = False  # the client's own switch (its constructor's ``restart``)

    return EngineSupervision(gone_for_good=lambda: engine.dead,
                             stop_restarting=stop_restarting,
                             pid=lambda: engine.engine_pid,
                             num_restarts=lambda: engine.num_restarts,
                             why_not_restarted=lambda: engine.why_not_restarted)


def _announce(model_name: str) -> Callable[[str, int], None]:
    def announce(host: str, port: int) -> None:
        logger.info("listening on http://%s:%d (model %r; OpenAI API under /v1, docs at "
                    "/docs)", host, port, model_name)

    return announce

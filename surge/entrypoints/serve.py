"""`surge serve`: the OpenAI-compatible HTTP server in front of the engine.

The server listens at once and loads the model in the background (``/health`` answers 503
until it is ready). SIGTERM or Ctrl-C drain: new requests get 503, in-flight ones get up to
``--drain-timeout`` seconds to finish, the rest are aborted, the engine shuts down, and the
process exits 0. If the engine dies and ``--no-engine-restart`` is set, in-flight requests get
an error and the process exits 1.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surge.config import EngineConfig, add_engine_args

if TYPE_CHECKING:
    from surge.engine.client import EngineClient
    from surge.server.app import ServerSettings

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
                      help="name(s) clients use as `model` (default: the --model value, or "
                           "'surge-demo')")
    http.add_argument("--engine-mode", choices=("process", "thread"), default="process",
                      help="run the engine core in its own process (default) or on a thread "
                           "of the server process")
    http.add_argument("--no-engine-restart", dest="engine_restart", action="store_false",
                      help="if the engine process dies, fail in-flight requests and exit 1 "
                           "instead of restarting it")
    http.add_argument("--request-timeout", type=float, default=600.0,
                      help="seconds a request may take before it is aborted with 504 "
                           "(default 600; 0 disables)")
    http.add_argument("--drain-timeout", type=float, default=30.0,
                      help="on SIGTERM, seconds in-flight requests get to finish (default 30)")
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

    security = parser.add_argument_group("security")
    security.add_argument("--api-key", action="append", default=None, dest="api_keys",
                          metavar="KEY", help=f"require 'Authorization: Bearer KEY' on /v1 "
                          f"routes; repeat for several keys (also ${API_KEY_ENV})")
    security.add_argument("--rate-limit-rpm", type=int, default=None,
                          help="requests per minute per API key (default: no limit)")
    security.add_argument("--rate-limit-tpm", type=int, default=None,
                          help="tokens (prompt + max_tokens) per minute per API key")
    security.add_argument("--max-body-bytes", type=int, default=8 << 20,
                          help="largest request body accepted, else 413 (default 8 MiB)")
    security.add_argument("--log-prompts", action="store_true",
                          help="log prompts and outputs (off by default: they may be private)")

    from surge.entrypoints.serve_pooling import add_pooling_args

    add_pooling_args(parser)
    from surge.batch.config import add_batch_args

    add_batch_args(parser)
    add_engine_args(parser.add_argument_group("engine"))

    from surge.apps.config import add_apps_args

    add_apps_args(parser)

    from surge.router.cli import add_replica_args

    add_replica_args(parser)


def run_serve(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level)
    settings = settings_from_args(args)  # bad flags fail before any model is written
    apps_settings = _apps_settings(args, settings.api_keys)
    from surge.entrypoints.serve_pooling import pools_from_args, resolve_model_arg

    model_dir = resolve_model_arg(args.model) if args.model else _demo_model()
    _check_model_dir(model_dir)
    from surge.entrypoints.replicated import run_replicated
    from surge.router.cli import wants_router

    if wants_router(args):  # N replicas of this server behind a router on --host/--port
        return run_replicated(args, model_dir, settings)
    config = EngineConfig.from_args(args)
    config.model = model_dir

    import uvicorn

    from surge.server.app import build_app
    from surge.tokenizer import load_tokenizer

    # Embedding and classification models are served without the LLM engine.
    pools, generates = pools_from_args(args, model_dir, settings)
    engine = (make_engine(args.engine_mode, config, model_dir, args.engine_restart)
              if generates else None)
    app = build_app(engine, load_tokenizer(model_dir) if generates else None, settings, pools)
    if apps_settings is not None:
        from surge.apps import mount_apps

        mount_apps(app, apps_settings)
    lifecycle = app.state.lifecycle
    server = _make_server(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level,
        access_log=args.access_log, timeout_graceful_shutdown=settings.drain_timeout,
        lifespan="on"), lifecycle.begin_drain, settings.model_names[0])
    lifecycle.request_exit = server.request_exit
    logger.info("loading %s (%s engine); /health answers 503 until it is ready", model_dir,
                args.engine_mode)
    server.run()
    return server.exit_code


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    from surge.server.app import ServerSettings

    api_keys = args.api_keys or ([os.environ[API_KEY_ENV]] if os.environ.get(API_KEY_ENV)
                                 else [])
    names = args.served_model_name or ([args.model] if args.model else ["surge-demo"])
    for name, value, low in [("max_queued_requests", args.max_queued_requests, 1),
                             ("max_queued_tokens", args.max_queued_tokens, 1),
                             ("port", args.port, 0)]:
        if value < low:
            raise ValueError(f"--{name.replace('_', '-')}={value} is invalid: allowed is an "
                             f"integer >= {low}")
    return ServerSettings(
        model_names=names, api_keys=api_keys,
        rate_limit_rpm=args.rate_limit_rpm, rate_limit_tpm=args.rate_limit_tpm,
        max_body_bytes=args.max_body_bytes, max_queued_requests=args.max_queued_requests,
        max_queued_tokens=args.max_queued_tokens,
        request_timeout=args.request_timeout or None, drain_timeout=args.drain_timeout,
        log_prompts=args.log_prompts, batch=_batch_settings(args))


def _apps_settings(args: argparse.Namespace, api_keys: list[str]) -> Any:
    if not args.apps:
        return None
    from surge.apps.config import apps_settings_from_args

    return apps_settings_from_args(args, api_keys)


def _batch_settings(args: argparse.Namespace) -> Any:
    from surge.batch.config import batch_settings_from_args

    return batch_settings_from_args(args)


def make_engine(mode: str, config: EngineConfig, model_dir: str,
                restart: bool) -> EngineClient:
    if mode == "thread":
        from surge.engine.client import InprocEngineClient

        return InprocEngineClient(config, model_dir)
    from surge.engine.mp_client import MPEngineClient

    return MPEngineClient(config, model_dir, restart=restart)


def _demo_model() -> str:
    from surge.testing.make_model import cache_dir, ensure_demo_model

    logger.warning(
        "No --model given: serving the built-in demo checkpoint (smollm2-135m shape, RANDOM "
        "weights, so its text is gibberish), cached under %s. To serve a real model: "
        "surge serve --model /path/to/hf-checkpoint", cache_dir())
    return str(ensure_demo_model())


def _check_model_dir(model_dir: str) -> None:
    """Fail before listening: a server that can never become ready helps no one."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'} not found: --model must be a "
                                "checkpoint directory in Hugging Face layout")


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _make_server(config: Any, on_signal: Callable[[], None], model_name: str) -> Any:
    """uvicorn's server, plus: SIGTERM starts our drain, a clean drain exits 0, and the app can
    ask for an exit with a status (the engine died for good). Defined here so that building
    the CLI parser does not import uvicorn."""
    import uvicorn

    class Server(uvicorn.Server):
        exit_code = 0

        def handle_exit(self, sig: int, frame: Any) -> None:
            on_signal()
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal once it has shut down, which would make a clean
            # drain look like a crash (status -15); we drained, so we exit 0.
            self._captured_signals.clear()

        def request_exit(self, code: int) -> None:
            self.exit_code = code
            self.should_exit = True

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                # Features that call this server over HTTP (the web apps) learn its address.
                self.config.app.state.listen_address = (host, port)
                logger.info("listening on http://%s:%d (model %r; OpenAI API under /v1, docs "
                            "at /docs)", host, port, model_name)

    return Server(config)

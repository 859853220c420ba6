"""Applications on top of the server, with a web UI at ``/``: a customer-support chat, a writing
assistant, image recognition and a live status page, plus their storage.

``AppsFeature`` adds everything to ``surge serve``'s app as a feature, and ``mount_apps(app,
settings)`` to any other FastAPI app (the router's fallback): the pages (``/`` and ``/ui/...``,
plain HTML/CSS/JS shipped in the package, no build step), the endpoints behind them
(``/api/apps/...``, in the OpenAPI schema), the anonymous user cookie, and the start/stop of
the store and the model-server client. The apps reach the model over HTTP (see
``llm_backend``): by default the address the server listens on (``ServerControl.address``, or
``app.state.listen_address`` on another app); ``settings.upstream`` overrides it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from surge.apps.config import AppsSettings, add_apps_args, apps_settings_from_args
from surge.apps.identity import UserIdentity
from surge.apps.llm_backend import LLMBackend, loopback_url
from surge.apps.routes import API_PREFIX, AppsRuntime, build_router
from surge.apps.storage import open_store
from surge.http.handlers import install_error_handlers

if TYPE_CHECKING:
    from surge.server.features import ServerHost

__all__ = ["AppsFeature", "AppsSettings", "add_apps_args", "apps_settings_from_args",
           "mount_apps"]

logger = logging.getLogger(__name__)

UI_PREFIX = "/ui"
STATIC_DIR = Path(str(resources.files("surge.apps") / "static"))


Address = tuple[str, int]


class AppsFeature:
    """The web apps as a feature of ``surge serve``."""

    def __init__(self, settings: AppsSettings) -> None:
        self.settings = settings

    def mount(self, app: FastAPI, host: ServerHost) -> None:
        runtime = _mount(app, self.settings, lambda: host.control.address)
        service = _service_of(runtime)
        host.services.add(lambda: service(app))


def mount_apps(app: FastAPI, settings: AppsSettings | None = None) -> AppsRuntime:
    """Add the web apps to any FastAPI app (before it starts): their store and client start
    and stop around the app's own lifespan. Returns their runtime state."""
    runtime = _mount(app, settings or AppsSettings(),
                     lambda: getattr(app.state, "listen_address", None))
    # The apps' refusals (401 without the API key, 400, 404) are APIErrors: an app of its own
    # (the router's fallback under --replicas) needs their handlers, or each one is a 500.
    install_error_handlers(app)
    _wrap_lifespan(app, _service_of(runtime))
    return runtime


def _mount(app: FastAPI, settings: AppsSettings,
           listen_address: Callable[[], Address | None]) -> AppsRuntime:
    runtime = AppsRuntime(settings, LLMBackend(settings.upstream, _listen_url(listen_address)))
    app.include_router(build_router(runtime))
    _add_pages(app)
    app.add_middleware(UserIdentity, prefixes=(API_PREFIX + "/", UI_PREFIX + "/"),
                       exact=("/",))
    return runtime


def _listen_url(listen_address: Callable[[], Address | None]) -> Callable[[], str | None]:
    """Reads the server's bound address when first needed (it is unknown before startup)."""
    def listen_url() -> str | None:
        address = listen_address()
        return loopback_url(*address) if address else None

    return listen_url


def _service_of(runtime: AppsRuntime
                    ) -> Callable[[Any], contextlib.AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def service(_app: Any) -> AsyncIterator[None]:
        async with _running(runtime):
            yield

    return service


@contextlib.asynccontextmanager
async def _running(runtime: AppsRuntime) -> AsyncIterator[None]:
    settings = runtime.settings
    if settings.history:
        runtime.store = await runtime.db(open_store, settings.database_url)
        logger.info("web apps: history stored in %s (schema versions %s)",
                    runtime.store.safe_url, runtime.store.schema_versions())
    else:
        logger.info("web apps: --no-history, nothing is stored")
    await runtime.backend.start()
    try:
        yield
    finally:
        runtime.turns.stop_all()
        await runtime.backend.close()
        if runtime.store is not None:
            runtime.store.close()
        runtime.executor.shutdown(wait=False)


def _wrap_lifespan(app: Starlette,
                   service: Callable[[Any], contextlib.AbstractAsyncContextManager[None]]
                   ) -> None:
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(target: Any) -> AsyncIterator[Any]:
        async with service(target), inner(target) as state:
            yield state

    app.router.lifespan_context = lifespan


def _add_pages(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def landing() -> Response:
        return FileResponse(STATIC_DIR / "index.html")

    @app.get(UI_PREFIX, include_in_schema=False)
    async def ui_root() -> Response:
        return RedirectResponse(UI_PREFIX + "/")

    app.mount(UI_PREFIX, StaticFiles(directory=STATIC_DIR, html=True), name="ui")

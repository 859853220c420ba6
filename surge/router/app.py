"""The router as one raw ASGI application, and the uvicorn server that runs it.

No framework routing on the hot path: a request for ``/v1/*``, ``/tokenize`` or
``/detokenize`` goes straight to the proxy. The router answers ``/health`` (200 while at least
one replica can take work), ``/metrics`` and ``/router/replicas`` itself. Every other path goes
to the optional *fallback* ASGI app (the web UI mounts there), or gets an OpenAI-shaped 404.

The replicas are either a fixed set (``surge route``) or run by a *replica backend*
(``backend.py``: local processes, or anything else implementing it) given in a
``ReplicaPlan``; the router then enters the backend with itself and adds the autoscaler when
the plan's bounds allow it.

Background work (health checks, the replica backend, the autoscaler) are *services*:
async context managers entered at startup and left, in reverse order, at shutdown, after
uvicorn has let in-flight requests finish. The fallback app's own lifespan runs inside ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import aiohttp
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from surge.http.errors import APIError, send_error
from surge.http.responses import send_json
from surge.http.services import Services, run_lifespan
from surge.router.autoscale import AutoscaleLoop, Autoscaler
from surge.router.backend import BackendHost, ReplicaPlan
from surge.router.coldstart import ColdStart
from surge.router.health import HealthChecker, HealthConfig
from surge.router.metrics import RouterMetrics
from surge.router.policies import Policy
from surge.router.proxy import PROXIED_PREFIXES, Proxy, ProxyConfig
from surge.router.replicas import ReplicaSet
from surge.router.retry import RetryConfig
from surge.router.tiers import TierRouting, TiersConfig

__all__ = ["RouterApp", "RouterSettings", "build_router", "run_router"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterSettings:
    retry: RetryConfig = field(default_factory=RetryConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    health: HealthConfig = field(default_factory=HealthConfig)


class RouterApp:
    """``await app(scope, receive, send)``; ``services`` may grow until the app starts."""

    def __init__(self, replicas: ReplicaSet, policy: Policy, settings: RouterSettings,
                 fallback: ASGIApp | None = None, plan: ReplicaPlan | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.replicas = replicas
        self.policy = policy
        self.settings = settings
        self.fallback = fallback
        self.clock = clock
        self.metrics = RouterMetrics(replicas, clock=clock)
        self.proxy = Proxy(replicas, policy, settings.retry, settings.proxy, self.metrics, clock)
        self.health: HealthChecker | None = None  # set at startup, when the session exists
        # Services call this to stop the router with a status (run_router sets it).
        self.request_exit: Callable[[int], None] = lambda code: None
        self.services = Services()
        # Extra sections of GET /router/replicas (the autoscaler adds its decisions).
        self.status_sections: dict[str, Callable[[], Any]] = {}
        if plan is not None:
            self._run_replicas(plan)

    def _run_replicas(self, plan: ReplicaPlan) -> None:
        # request_exit is looked up when called: run_router sets it after this.
        host = BackendHost(self.replicas, self.metrics, lambda code: self.request_exit(code))
        backend = plan.backend
        self.services.add(lambda: backend.running(host, plan.initial))
        self.status_sections["processes"] = backend.status
        cold = None
        if plan.scale_to_zero is not None:
            cold = ColdStart(plan.scale_to_zero, self.replicas, backend, self.metrics,
                             self.clock)
            self.proxy.cold_start = cold
            self.status_sections["scale_to_zero"] = cold.status
        if plan.autoscale is not None and plan.autoscale.enabled:
            loop = AutoscaleLoop(Autoscaler(plan.autoscale), self.replicas, backend,
                                 self.metrics, self.clock)
            if cold is not None:
                loop.idle_for = cold.idle_for
            self.services.add(loop.running)
            self.status_sections["autoscaler"] = loop.status

    def use_tiers(self, config: TiersConfig) -> None:
        """Route by replica tier (``tiers.py``): critical requests to ``full``, the rest to
        ``fast``, spilling over when a tier is saturated."""
        self.proxy.tiers = TierRouting(config, self.metrics.registry)
        self.status_sections["tiers"] = self.proxy.tiers.status

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path: str = scope["path"]
            if path.startswith(PROXIED_PREFIXES):
                return await self.proxy.handle(scope, receive, send)
            own = self._own_routes.get(path)
            if own is not None:
                return await own(self, scope, send)
        elif kind == "lifespan":
            return await self._lifespan(scope, receive, send)
        if self.fallback is not None:
            return await self.fallback(scope, receive, send)
        if kind == "http":
            await send_error(send, APIError(404, f"{scope['method']} {scope['path']} "
                                                  "does not exist on the router: it forwards "
                                                  "/v1/*, /tokenize and /detokenize"))

    # -- the router's own routes -------------------------------------------------------------

    async def _health(self, scope: Scope, send: Send) -> None:
        routable = self.replicas.num_routable(self.clock())
        if routable == 0:
            return await send_error(send, APIError(
                503, f"no replica can take requests ({len(self.replicas)} known): they are "
                "starting, unhealthy, ejected or draining"
                + (f"; {self.replicas.problem}" if self.replicas.problem else ""),
                code="no_healthy_replica",
                headers={"Retry-After": "1"}))
        await send_json(send, {"status": "ok", "replicas": len(self.replicas),
                                "replicas_routable": routable})

    async def _metrics(self, scope: Scope, send: Send) -> None:
        body, content_type = self.metrics.render()
        await _send_body(send, 200, body, content_type.encode())

    async def _status(self, scope: Scope, send: Send) -> None:
        now = self.clock()
        payload: dict[str, Any] = {
            "policy": self.policy.name,
            "replicas": [replica.status(now) for replica in self.replicas],
        }
        for name, section in self.status_sections.items():
            payload[name] = section()
        await send_json(send, payload)

    _own_routes: ClassVar[dict[str, Callable[[RouterApp, Scope, Send], Any]]] = {
        "/health": _health, "/metrics": _metrics, "/router/replicas": _status}

    # -- lifespan ----------------------------------------------------------------------------

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        await run_lifespan(receive, send, "router", self._running(scope))

    @contextlib.asynccontextmanager
    async def _running(self, scope: Scope) -> AsyncIterator[None]:
        """Health checks, then the services in order, then the fallback app's own lifespan;
        left in reverse order."""
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(self._core())
            await stack.enter_async_context(self.services.running())
            if self.fallback is not None:
                await stack.enter_async_context(_child_lifespan(self.fallback, scope))
            yield

    @contextlib.asynccontextmanager
    async def _core(self) -> AsyncIterator[None]:
        # Health checks are off the hot path: aiohttp's client is good enough for them.
        async with aiohttp.ClientSession() as session:
            self.health = HealthChecker(self.replicas, self.settings.health, session)
            try:
                async with self.health.running():
                    yield
            finally:
                self.proxy.close()


@contextlib.asynccontextmanager
async def _child_lifespan(app: ASGIApp, scope: Scope) -> AsyncIterator[None]:
    """Run another ASGI app's lifespan protocol inside ours (the fallback's startup and
    shutdown). An app without lifespan support is simply not told."""
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    outbox: asyncio.Queue[Message] = asyncio.Queue()
    task = asyncio.create_task(app(dict(scope), inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    reply = await _next_reply(outbox, task)
    if reply is None:
        yield
        return
    if reply["type"] == "lifespan.startup.failed":
        raise RuntimeError(f"the fallback app failed to start: {reply.get('message')}")
    try:
        yield
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await _next_reply(outbox, task)
        await asyncio.wait({task}, timeout=5.0)


async def _next_reply(outbox: asyncio.Queue[Message], task: asyncio.Task[Any]
                      ) -> Message | None:
    getter = asyncio.ensure_future(outbox.get())
    await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    if task.exception() is not None:
        logger.info("the fallback app does not take lifespan events: %r", task.exception())
    return None


async def _send_body(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def build_router(replicas: ReplicaSet, policy: Policy, settings: RouterSettings | None = None,
                 fallback: ASGIApp | None = None, plan: ReplicaPlan | None = None) -> RouterApp:
    """The router over ``replicas``; with a ``plan``, its backend starts and stops them (the
    set starts empty). ``fallback`` answers the paths the router neither forwards nor owns."""
    return RouterApp(replicas, policy, settings or RouterSettings(), fallback, plan)


def run_router(app: RouterApp, host: str, port: int, *, drain_timeout: float = 30.0,
               log_level: str = "info", access_log: bool = False,
               on_started: Callable[[str, int], None] | None = None) -> int:
    """Serve until SIGTERM/Ctrl-C (in-flight requests get ``drain_timeout`` seconds, then the
    services stop); returns the exit status (0 after a clean drain)."""
    server = make_router_server(app, host, port, drain_timeout=drain_timeout,
                                log_level=log_level, access_log=access_log,
                                on_started=on_started)
    server.run()
    return server.exit_code


def make_router_server(app: RouterApp, host: str, port: int, *, drain_timeout: float = 30.0,
                       log_level: str = "info", access_log: bool = False,
                       on_started: Callable[[str, int], None] | None = None) -> Any:
    """uvicorn's server for the router (the one of ``surge serve`` too: a clean drain exits 0,
    services may ask for an exit with a status through ``app.request_exit``), with uvloop and
    httptools when installed and no Server or Date header of its own (the replica's pass
    through)."""
    import uvicorn

    from surge.http.server import DrainingServer

    def started(bound_host: str, bound_port: int) -> None:
        logger.info("router listening on http://%s:%d (policy %s, %d replica(s))",
                    bound_host, bound_port, app.policy.name, len(app.replicas))
        if on_started is not None:
            on_started(bound_host, bound_port)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            access_log=access_log, lifespan="on", http=_http_protocol(),
                            server_header=False,
                            date_header=False, timeout_graceful_shutdown=drain_timeout,
                            backlog=4096, timeout_keep_alive=30, proxy_headers=False)
    # No drain hook: uvicorn's own graceful shutdown lets in-flight proxied requests finish.
    server = DrainingServer(config, on_started=started)
    app.request_exit = server.request_exit
    return server


def _http_protocol() -> Any:
    """uvicorn's httptools protocol, with writes held to the end of the event loop's
    iteration: uvicorn writes a response's head and body (two ASGI messages) separately, two
    syscalls per answer; held, they leave as one. Stream chunks wait one loop iteration at
    most. Without httptools, uvicorn's default."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "auto"

    class CoalescingHttpToolsProtocol(HttpToolsProtocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(_CoalescingTransport(transport))

    return CoalescingHttpToolsProtocol


class _CoalescingTransport:
    """A transport whose writes within one loop iteration go out in one call."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._held is not None:
            self._held.append(data)
            return
        self._held = [data]
        asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        held, self._held = self._held, None
        if held and not self._transport.is_closing():
            self._transport.write(held[0] if len(held) == 1 else b"".join(held))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

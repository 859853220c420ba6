"""In-process pieces for router tests: fake replicas (small aiohttp apps, each on its own event
loop thread, whose behaviour a test scripts) and the router itself on a real loopback port."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from aiohttp import web

from surge.router.app import RouterApp, make_router_server

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
START_SECONDS = 10.0


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: Mapping[str, str]  # case-insensitive
    body: bytes


@dataclass
class FakeReplica:
    """Answers /health with ``health_status`` and everything else with ``handler``."""

    handler: Handler
    health_status: int = 200
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeReplica:
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(START_SECONDS)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)

    def call(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the replica's loop (to set an asyncio.Event it waits on)."""
        self._loop.call_soon_threadsafe(fn)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_route("*", "/{tail:.*}", self._any)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     handler_cancellation=True, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok" if self.health_status == 200 else "no"},
                                 status=self.health_status)

    async def _any(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen(request.method, request.path_qs, request.headers.copy(),
                              await request.read()))
        return await self.handler(request)


def json_handler(payload: dict[str, Any] | None = None, status: int = 200,
                 headers: dict[str, str] | None = None) -> Handler:
    async def handle(request: web.Request) -> web.Response:
        return web.json_response(payload or {"ok": True}, status=status, headers=headers)

    return handle


class RouterThread:
    """The router app under uvicorn on a free port, in a thread (its own event loop)."""

    def __init__(self, app: RouterApp) -> None:
        self.app = app
        self.port = 0
        self._started = threading.Event()
        self._server = make_router_server(app, "127.0.0.1", 0, drain_timeout=2.0,
                                          log_level="warning", on_started=self._on_started)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _on_started(self, host: str, port: int) -> None:
        self.port = port
        self._started.set()

    def __enter__(self) -> RouterThread:
        self._thread.start()
        assert self._started.wait(START_SECONDS), "the router did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)

    def client(self, timeout: float = 10.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def status(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/router/replicas", timeout=5).json()


class ClientLoad:
    """``clients`` threads posting ``body`` to /v1/completions back to back until the block
    ends. Every answer is kept as (status, the replica that served it); a transport error as
    (0, its repr), so a test sees it rather than losing a thread."""

    def __init__(self, url: str, clients: int, body: dict[str, Any],
                 timeout: float = 60.0) -> None:
        self.url = url
        self.body = body
        self.timeout = timeout
        self.results: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(clients)]

    def __enter__(self) -> ClientLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout)

    def statuses(self) -> list[int]:
        return [status for status, _ in self.results]

    def replicas(self) -> set[str]:
        """The replicas that answered."""
        return {replica for status, replica in self.results if status}

    def served_by(self, name: str) -> int:
        return sum(1 for status, replica in self.results if replica == name and status == 200)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=self.timeout) as client:
            while not self._stop.is_set():
                try:
                    response = client.post("/v1/completions", json=self.body)
                    self.results.append((response.status_code,
                                         response.headers.get("x-surge-replica", "")))
                except httpx.HTTPError as exc:
                    self.results.append((0, repr(exc)))


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except FileNotFoundError:
        return False

"""The server's lifecycle: background services in, drain on SIGTERM, services out; and, when
the server has an LLM, the engine's supervision (load in the background so /health can say 503
while loading, watch its health, end in-flight requests at the drain deadline, ask the server
to exit when the engine is gone for good, shut it down last).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from surge.engine.client import EngineClient
from surge.http.control import ServerControl
from surge.http.errors import APIError
from surge.http.services import Services
from surge.server.context import RequestContext

__all__ = ["EngineSupervision", "EngineSupervisor", "ServerLifecycle"]

logger = logging.getLogger(__name__)

# How often the engine's health is looked at; an engine death shows on /health this fast.
HEALTH_POLL_SECONDS = 0.1
# After the engine died for good, in-flight requests get this long to receive their errors
# before the server exits.
FAIL_IN_FLIGHT_SECONDS = 5.0
ENGINE_SHUTDOWN_SECONDS = 15.0
# Requests still running this long before the drain timeout are ended with an error event.
DRAIN_MARGIN_SECONDS = 0.5


class ServerLifecycle:
    """The app's lifespan (the services stack) and the drain that SIGTERM starts."""

    def __init__(self, context: RequestContext, services: Services,
                 drain_hooks: Sequence[Callable[[], None]] = ()) -> None:
        self.context = context
        self.services = services
        # Called on SIGTERM after new requests are refused (the engine supervisor's).
        self.drain_hooks = tuple(drain_hooks)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        async with self.services.running():
            # What start-up made (modules, the app, the tokenizer) lives as long as the
            # server: frozen, the garbage collector stops walking it at every full
            # collection, which under a flood of short requests stalled the event loop.
            gc.collect()
            gc.freeze()
            yield

    def begin_drain(self) -> None:
        """Called on SIGTERM: new requests get 503 while in-flight ones finish."""
        self.context.refuse_new(APIError(503, "the server is shutting down: send new requests "
                                         "to another replica", code="server_draining"))
        for hook in self.drain_hooks:
            hook()


@dataclass(frozen=True)
class EngineSupervision:
    """What the server needs to know of an engine client beyond ``EngineClient``: whoever
    makes the client (``surge serve``) says how it restarts and which process it is."""

    gone_for_good: Callable[[], bool]
    stop_restarting: Callable[[], None]
    pid: Callable[[], int | None]
    num_restarts: Callable[[], int]
    # Why a gone engine is not restarted (restarts off, or its restart budget spent).
    why_not_restarted: Callable[[], str] = lambda: "restarts are off"

    @classmethod
    def of_thread(cls, engine: EngineClient) -> EngineSupervision:
        """An engine on a thread of this process: never restarted, no process of its own."""
        return cls(gone_for_good=lambda: not engine.is_healthy, stop_restarting=lambda: None,
                   pid=lambda: None, num_restarts=lambda: 0,
                   why_not_restarted=lambda: "an engine thread is never restarted")


class EngineSupervisor:
    """A service: the engine loads when the app starts and shuts down after everything else."""

    def __init__(self, engine: EngineClient, supervision: EngineSupervision,
                 context: RequestContext, control: ServerControl, drain_timeout: float,
                 abort_all: Callable[[APIError], None]) -> None:
        self.engine = engine
        self.supervision = supervision
        self.context = context
        self.control = control
        self.drain_timeout = drain_timeout
        self.abort_all = abort_all
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run())
        try:
            yield
        finally:
            await self._stop()

    def begin_drain(self) -> None:
        """Requests still running shortly before the drain timeout end with an error the
        client can read (uvicorn would only cut their connections)."""
        self._draining = True
        # An engine that dies now (e.g. it got the same signal) is not worth restarting.
        self.supervision.stop_restarting()
        if self._loop is None:
            return
        timeout = self.drain_timeout
        stopped = APIError(503, f"the server shut down before this request finished "
                           f"(--drain-timeout {timeout:g} s)", code="server_shutdown")
        delay = max(timeout - DRAIN_MARGIN_SECONDS, 0.0)
        # Called from a signal handler: hand the work to the event loop.
        self._loop.call_soon_threadsafe(self._loop.call_later, delay, self.abort_all, stopped)

    async def _run(self) -> None:
        started = time.perf_counter()
        try:
            await self.engine.start()
        except Exception as exc:
            logger.error("the engine could not start: %s", exc)
            self.context.refuse_new(APIError(503, f"the engine could not start: {exc}",
                                             code="engine_failed"))
            self.control.request_exit(1)
            return
        info = self.engine.info
        logger.info("engine ready in %.1f s: %s (%s on %s, context %d tokens); /health "
                    "answers 200", time.perf_counter() - started, info.model_dir, info.dtype,
                    info.device, info.max_model_len)
        await self._watch()

    async def _watch(self) -> None:
        healthy = True
        while not self.supervision.gone_for_good():
            await asyncio.sleep(HEALTH_POLL_SECONDS)  # the client offers no health event
            if healthy != self.engine.is_healthy:
                healthy = not healthy
                if healthy:
                    logger.warning("the engine is back: /health answers 200 again")
                else:
                    logger.error("the engine stopped: /health answers 503")
        if not self._draining:  # while draining, uvicorn is already on its way out
            await self._give_up()

    async def _give_up(self) -> None:
        self.context.refuse_new(APIError(503, "the engine died and will not be restarted: "
                                         "the server is exiting", code="engine_dead"))
        deadline = time.monotonic() + FAIL_IN_FLIGHT_SECONDS
        while self.context.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(HEALTH_POLL_SECONDS)  # their engine streams already failed
        logger.error("the engine is gone and will not be restarted (%s): exiting with "
                     "status 1", self.supervision.why_not_restarted())
        self.control.request_exit(1)

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

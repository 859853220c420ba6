"""Background services of an HTTP app (engine watcher, model pools, batch workers, health
checks, replica processes): async context managers entered in order at startup and left in
reverse order at shutdown, after uvicorn let in-flight requests finish.

``Services`` is the one stack for ``surge serve`` (a FastAPI lifespan) and ``surge route`` (a
raw-ASGI app that speaks the lifespan protocol itself, through ``run_lifespan``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from starlette.types import Receive, Send

__all__ = ["Service", "Services", "in_background", "run_lifespan"]

logger = logging.getLogger(__name__)

# A factory, so the work starts only when the app does (inside its event loop).
Service = Callable[[], contextlib.AbstractAsyncContextManager[Any]]


class Services:
    """Services may be added until the app starts."""

    def __init__(self) -> None:
        self._services: list[Service] = []
        self._started = False

    def add(self, service: Service) -> None:
        if self._started:
            raise RuntimeError("services must be added before the app starts")
        self._services.append(service)

    def __len__(self) -> int:
        return len(self._services)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Every service entered, in order; left in reverse order, also when one fails."""
        self._started = True
        async with contextlib.AsyncExitStack() as stack:
            for service in self._services:
                await stack.enter_async_context(service())
            yield


@contextlib.asynccontextmanager
async def in_background(work: Coroutine[Any, Any, None],
                        name: str) -> AsyncIterator[asyncio.Task[None]]:
    """A service that is one task (a polling loop): ``work`` runs while the context is
    entered, and is cancelled and awaited when it is left."""
    task = asyncio.create_task(work, name=name)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def run_lifespan(receive: Receive, send: Send, name: str,
                       running: contextlib.AbstractAsyncContextManager[Any]) -> None:
    """ASGI's lifespan protocol around ``running`` (a raw-ASGI app's whole background)."""
    await receive()  # lifespan.startup
    stack = contextlib.AsyncExitStack()
    try:
        await stack.enter_async_context(running)
    except Exception as exc:
        logger.exception("the %s could not start", name)
        await stack.aclose()
        await send({"type": "lifespan.startup.failed", "message": repr(exc)})
        return
    await send({"type": "lifespan.startup.complete"})
    await receive()  # lifespan.shutdown
    try:
        await stack.aclose()
    except Exception as exc:
        logger.exception("the %s did not shut down cleanly", name)
        await send({"type": "lifespan.shutdown.failed", "message": repr(exc)})
        return
    await send({"type": "lifespan.shutdown.complete"})

"""Slow clients cannot take the server's connections: a header timeout and a connection cap.

uvicorn waits forever for a request's headers (its keep-alive timer starts only after a
response, and any byte received stops it), so a client that sends a header byte now and then
holds a connection, and a file descriptor, for as long as it likes: 1,100 such connections
exhausted 1,024 descriptors and /health stopped answering. The guard wraps uvicorn's HTTP
protocol and

- closes a connection that has waited ``header_timeout`` seconds for a request's headers,
  counted from when it opened or from its previous response (an idle keep-alive connection
  waits for headers too);
- keeps at most ``max_connections`` open: past it, a new connection evicts the connection that
  has waited longest for its headers (a request that is being answered is never evicted); when
  every open connection is busy answering, the new one is closed at once.

The default cap keeps descriptors free under the process's limit (``RLIMIT_NOFILE``) for files,
databases and the engine's sockets, so the server never fails to accept for want of one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from typing import Any

__all__ = ["DEFAULT_HEADER_TIMEOUT", "ConnectionGuard", "default_max_connections",
           "guarded_protocol"]

logger = logging.getLogger(__name__)

DEFAULT_HEADER_TIMEOUT = 10.0
# Descriptors kept for everything but client connections, beyond those open at start.
_SPARE_DESCRIPTORS = 64


def default_max_connections() -> int:
    """The most client connections that leave spare descriptors under ``RLIMIT_NOFILE``."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(16, soft - _open_descriptors() - _SPARE_DESCRIPTORS)


def _open_descriptors() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux: assume a modest number
        return 64


class ConnectionGuard:
    """Which connections wait for a request's headers (and since when), and how many are
    open; closes the slow ones. One per server, used on its event loop only."""

    def __init__(self, *, header_timeout: float = DEFAULT_HEADER_TIMEOUT,
                 max_connections: int | None = None) -> None:
        if header_timeout <= 0:
            raise ValueError(f"header_timeout={header_timeout} is invalid: allowed is a "
                             "number of seconds > 0")
        if max_connections is not None and max_connections < 1:
            raise ValueError(f"max_connections={max_connections} is invalid: allowed is an "
                             "integer >= 1")
        self.header_timeout = header_timeout
        self.max_connections = max_connections or default_max_connections()
        self.num_closed_slow = 0  # for tests and logs: connections this guard closed
        self._open: set[Any] = set()
        # Waiting for headers, oldest first (dicts keep insertion order).
        self._waiting: dict[Any, float] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def num_open(self) -> int:
        return len(self._open)

    def opened(self, connection: Any) -> None:
        self._open.add(connection)
        self._waiting[connection] = time.monotonic()
        self._start_sweeping()
        if len(self._open) > self.max_connections:
            victim = next((c for c in self._waiting if c is not connection), connection)
            self._close(victim, "the server is at its connection cap (--max-connections) and "
                                "it waited longest for its request")

    def waiting(self, connection: Any) -> None:
        """A response ended: the connection now waits for the next request's headers."""
        if connection in self._open:
            self._waiting.pop(connection, None)
            self._waiting[connection] = time.monotonic()

    def started(self, connection: Any) -> None:
        """A request's headers arrived: it is being answered."""
        self._waiting.pop(connection, None)

    def closed(self, connection: Any) -> None:
        self._open.discard(connection)
        self._waiting.pop(connection, None)

    def _start_sweeping(self) -> None:
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(self._sweep_interval(), self._sweep)

    def _sweep_interval(self) -> float:
        return min(1.0, self.header_timeout / 4)

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = time.monotonic() - self.header_timeout
        while self._waiting:
            oldest, since = next(iter(self._waiting.items()))
            if since > deadline:
                break
            self._close(oldest, f"no request headers within {self.header_timeout:g} s "
                                "(--header-timeout)")
        if self._open:
            self._start_sweeping()

    def _close(self, connection: Any, why: str) -> None:
        self.closed(connection)
        self.num_closed_slow += 1
        logger.debug("closing connection from %s: %s", getattr(connection, "client", None), why)
        transport = getattr(connection, "transport", None)
        if transport is not None:
            transport.abort()  # frees the descriptor now, not after a lingering close


def guarded_protocol(base: type[asyncio.Protocol], guard: ConnectionGuard
                     ) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class ``base`` (httptools or h11), reporting to ``guard``.

    Both set ``self.cycle`` to a new request cycle when a request's headers are complete and
    call ``on_response_complete`` after each response: that is all the guard needs to know.
    """

    class Guarded(base):  # type: ignore[valid-type, misc]
        _guard_cycle: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            guard.opened(self)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._note_new_request()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            guard.waiting(self)
            self._note_new_request()  # a pipelined request may have started at once

        def _note_new_request(self) -> None:
            cycle = getattr(self, "cycle", None)
            if cycle is not None and cycle is not self._guard_cycle:
                self._guard_cycle = cycle
                guard.started(self)

        def connection_lost(self, exc: Exception | None) -> None:
            guard.closed(self)
            super().connection_lost(exc)

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded

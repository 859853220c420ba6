"""A lean pooled HTTP/1.1 client for the proxy's hot path, on asyncio protocols and httptools.

Why not aiohttp or httpx: measured by ``benchmarks/bench_router.py`` against an instant
replica, aiohttp's client spends about 70-85 µs of CPU per request and httpx about 2.5 ms (h11
parses in pure Python, and anyio and its pool add more), while this client spends about 25 µs.
The router is one Python process, so that CPU is its throughput: with aiohttp it reached a
third of nginx's requests/s; with this client, more than half. It does only what a reverse
proxy needs: keep-alive connections per replica (most recently used first), one write per
request (head and body together), the response head as raw bytes, the body whole or chunk by
chunk as it arrives (reading pauses while the client is slower than the replica), a connect
timeout, a read timeout (longest silence, checked by a sweep rather than a timer per request),
and closing the connection when the caller gives up, so the replica sees the client leave. A
request that fails on a reused idle connection before any byte came back is sent once more on
a new connection: the replica closed that connection while it was idle (the keep-alive race),
so it never saw the request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Any

import httptools

__all__ = ["UpstreamError", "UpstreamPool", "UpstreamResponse", "request_head"]

# Reading from a replica pauses while this much of its body waits for a slow client.
_HIGH_WATER = 1 << 20
_LOW_WATER = 256 << 10


class UpstreamError(Exception):
    """An attempt failed in transport: ``kind`` is connect, disconnect or timeout;
    ``responded`` says whether any byte of the response had arrived."""

    def __init__(self, kind: str, message: str, responded: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.responded = responded


class _Connection(asyncio.Protocol):
    """One keep-alive connection to a replica, carrying one request at a time."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int, bool]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.response: UpstreamResponse | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # bytes nobody asked for: the connection is unusable
            self.abort()
            return
        response.activity()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            response.fail(UpstreamError("disconnect", f"bad response from the replica: {exc}",
                                        responded=True))
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.response is not None:
            self.response.connection_lost(exc)

    # -- httptools callbacks -----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        self.response.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.response is not None
        self.response.head_complete(self.parser.get_status_code(),
                                    self.parser.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        self.response.body_received(body)

    def on_message_complete(self) -> None:
        assert self.response is not None
        self.response.message_complete()

    # -- ours --------------------------------------------------------------------------------

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class UpstreamResponse:
    """The answer of one replica to one request, filled in by its connection."""

    def __init__(self, connection: _Connection, is_head: bool) -> None:
        self._connection = connection
        self._loop = asyncio.get_running_loop()
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False
        # Read from the headers once, when they are complete.
        self.content_length: int | None = None
        self.content_type = b""
        self._is_head = is_head
        self._head: asyncio.Future[None] = self._loop.create_future()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._error: UpstreamError | None = None
        self._responded = False
        self._until_close = False
        self.last_activity = self._loop.time()  # the pool's sweep fails silent ones

    # -- reading -----------------------------------------------------------------------------

    async def wait_head(self) -> None:
        if not self._head.done():
            await self._head
        self._head.result()

    async def read(self) -> bytes:
        """The whole body."""
        while not self._complete:
            self._raise_error()
            await self._wait()
        self._raise_error()
        body = b"".join(self._chunks)
        self._chunks.clear()
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; raises UpstreamError if the replica fails midway."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._buffered -= len(chunk)
                if self._paused and self._buffered < _LOW_WATER:
                    self._paused = False
                    if self._connection.transport is not None:
                        self._connection.transport.resume_reading()
                yield chunk
                continue
            self._raise_error()
            if self._complete:
                return
            await self._wait()

    def release(self) -> None:
        """Done with the response: the connection goes back to the pool if it can be
        reused, and is closed otherwise (which is how a replica learns the client left)."""
        connection = self._connection
        connection.response = None
        connection.pool.unwatch(self)
        if self._complete and self.keep_alive and not connection.closed and \
                self._error is None and not self._is_head:
            connection.pool.put_back(connection)
        else:
            connection.abort()

    # -- filled in by the connection ---------------------------------------------------------

    def activity(self) -> None:
        self._responded = True
        self.last_activity = self._loop.time()

    def head_complete(self, status: int, keep_alive: bool) -> None:
        self.status = status
        self.keep_alive = keep_alive
        chunked = False
        for name, value in self.headers:
            name = name.lower()
            if name == b"content-length" and value.isdigit():
                self.content_length = int(value)
            elif name == b"content-type":
                self.content_type = value.lower()
            elif name == b"transfer-encoding":
                chunked = value.lower().endswith(b"chunked")
        self._until_close = self.content_length is None and not chunked and \
            status >= 200 and status not in (204, 304)
        if not self._head.done():
            self._head.set_result(None)
        if self._is_head:  # no body follows a HEAD's answer, whatever its headers say
            self.message_complete()

    def body_received(self, body: bytes) -> None:
        if self._complete:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and \
                self._connection.transport is not None:
            self._paused = True
            self._connection.transport.pause_reading()
        self._wake()

    def message_complete(self) -> None:
        self._complete = True
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._complete:
            return
        if self._head.done() and self._until_close and self._error is None:
            self.message_complete()  # the body was delimited by the connection's end
            return
        reason = f"{type(exc).__name__}: {exc}" if exc else "closed by the replica"
        self.fail(UpstreamError("disconnect", f"the connection was lost ({reason})",
                                self._responded))

    def fail(self, error: UpstreamError) -> None:
        if self._error is None and not self._complete:
            self._error = error
            if not self._head.done():
                self._head.set_exception(error)
                self._head.exception()  # retrieved: no "never retrieved" warning
            self._wake()

    # -- internals ---------------------------------------------------------------------------

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def time_out(self, seconds: float) -> None:
        self.fail(UpstreamError("timeout", f"the replica sent nothing for {seconds:g} s",
                                self._responded))
        self._connection.abort()


class UpstreamPool:
    """Keep-alive connections to any number of replicas, by (host, port)."""

    def __init__(self, connect_timeout: float = 5.0, read_timeout: float | None = 600.0,
                 max_idle_per_replica: int = 256) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle_per_replica
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._tls: ssl.SSLContext | None = None
        # Responses in progress, swept for silence a few times per read timeout: cheaper than
        # a timer per request.
        self._active: set[UpstreamResponse] = set()
        self._sweeper: asyncio.Task[None] | None = None

    async def request(self, host: str, port: int, tls: bool, head: bytes, body: bytes | None,
                      is_head: bool = False) -> UpstreamResponse:
        """Send one request; returns once the response head arrived."""
        key = (host, port, tls)
        connection = self._take_idle(key)
        if connection is not None:
            try:
                return await self._send(connection, head, body, is_head)
            except UpstreamError as exc:
                if exc.responded or exc.kind == "timeout":
                    raise
                # The keep-alive race: the replica closed it while idle; try a fresh one.
        connection = await self._connect(key)
        return await self._send(connection, head, body, is_head)

    async def _send(self, connection: _Connection, head: bytes, body: bytes | None,
                    is_head: bool) -> UpstreamResponse:
        response = UpstreamResponse(connection, is_head)
        connection.response = response
        self._watch(response)
        assert connection.transport is not None
        connection.transport.write(head + body if body else head)
        try:
            await response.wait_head()
        except BaseException:
            response.release()
            raise
        return response

    async def _connect(self, key: tuple[str, int, bool]) -> _Connection:
        loop = asyncio.get_running_loop()
        host, port, tls = key
        if tls and self._tls is None:
            self._tls = ssl.create_default_context()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self, key), host, port,
                                       ssl=self._tls if tls else None),
                self.connect_timeout)
        except TimeoutError as exc:
            raise UpstreamError("timeout", f"no connection to {key[0]}:{key[1]} within "
                                f"{self.connect_timeout:g} s") from exc
        except OSError as exc:
            raise UpstreamError("connect", f"cannot connect to {key[0]}:{key[1]}: "
                                f"{exc.strerror or exc}") from exc
        return connection

    def _take_idle(self, key: tuple[str, int, bool]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if not connection.closed:
                return connection
        return None

    def _watch(self, response: UpstreamResponse) -> None:
        if self.read_timeout is None:
            return
        self._active.add(response)
        if self._sweeper is None:
            self._sweeper = asyncio.ensure_future(self._sweep(self.read_timeout))

    def unwatch(self, response: UpstreamResponse) -> None:
        self._active.discard(response)

    async def _sweep(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(timeout / 4, 1.0))  # the sweep's period
            deadline = loop.time() - timeout
            for response in [r for r in self._active if r.last_activity < deadline]:
                self._active.discard(response)
                response.time_out(timeout)

    def put_back(self, connection: _Connection) -> None:
        idle = self._idle.setdefault(connection.key, [])
        if len(idle) < self.max_idle:
            idle.append(connection)
        else:
            connection.abort()

    def forget(self, connection: _Connection) -> None:
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for idle in self._idle.values():
            for connection in idle:
                with contextlib.suppress(Exception):
                    connection.abort()
        self._idle.clear()


def request_head(method: str, target: str, host: bytes, headers: list[tuple[bytes, bytes]],
                 body_length: int | None) -> bytes:
    """The request line and headers, ready to write."""
    parts: list[Any] = [f"{method} {target} HTTP/1.1\r\nhost: ".encode("latin-1"), host,
                        b"\r\n"]
    for name, value in headers:
        parts += [name, b": ", value, b"\r\n"]
    if body_length is not None:
        parts.append(b"content-length: %d\r\n" % body_length)
    parts.append(b"\r\n")
    return b"".join(parts)

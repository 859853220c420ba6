"""The Redis tier every replica reads and writes. Redis slow or down never fails a request:
each call has a short deadline, and after a failure the tier stays off for a moment (the
cache bypasses meanwhile) instead of making every request wait for the same timeout. An
outage is logged once, when it starts, and once more when Redis answers again."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

__all__ = ["ALLOWED_SCHEMES", "RedisTier", "SharedTierDown"]

logger = logging.getLogger("surge.cache")

T = TypeVar("T")

ALLOWED_SCHEMES = ("redis://", "rediss://", "unix://")
_FLUSH_BATCH = 500


class SharedTierDown(Exception):
    """Redis did not answer in time (or is off after a recent failure)."""


class RedisTier:
    def __init__(self, url: str, *, timeout: float = 0.1, retry_after: float = 1.0) -> None:
        if not url.startswith(ALLOWED_SCHEMES):
            raise ValueError(f"--cache-url={url!r} is invalid: allowed is a Redis URL "
                             f"starting with {', '.join(ALLOWED_SCHEMES)}")
        if timeout <= 0:
            raise ValueError(f"--cache-timeout={timeout} is invalid: allowed is a number of "
                             "seconds > 0")
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.url = url
        self.timeout = timeout
        self.retry_after = retry_after
        # No retries inside the client: one failure already means "bypass this request".
        self._client = Redis.from_url(url, socket_timeout=timeout,
                                      socket_connect_timeout=timeout,
                                      retry=Retry(NoBackoff(), 0), retry_on_timeout=False)
        self._down_until = 0.0
        self._down = False

    @property
    def is_up(self) -> bool:
        """False for ``retry_after`` seconds after a failure."""
        return not self._down or time.monotonic() >= self._down_until

    async def get(self, key: str) -> bytes | None:
        return await self._call(self._client.get(key))

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        await self._call(self._client.set(key, value, px=max(1, int(ttl * 1000))))

    async def push(self, key: str, value: bytes, keep_last: int, ttl: float) -> None:
        """Append to the list ``key``, keep its last ``keep_last`` items, renew its TTL."""
        async def pipeline() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.rpush(key, value)
                pipe.ltrim(key, -keep_last, -1)
                pipe.pexpire(key, max(1, int(ttl * 1000)))
                await pipe.execute()

        await self._call(pipeline())

    async def range(self, key: str) -> list[bytes]:
        return await self._call(self._client.lrange(key, 0, -1))

    async def flush(self, prefix: str) -> int:
        """Delete every key under ``prefix``; the number deleted."""
        deleted = 0
        cursor: Any = 0
        while True:
            cursor, keys = await self._call(
                self._client.scan(cursor, match=_glob_escape(prefix) + "*", count=_FLUSH_BATCH))
            if keys:
                deleted += await self._call(self._client.unlink(*keys))
            if not cursor:
                return deleted

    async def close(self) -> None:
        await self._client.aclose()

    async def _call(self, operation: Awaitable[T]) -> T:
        if not self.is_up:
            _discard(operation)
            raise SharedTierDown(f"Redis at {self.url} failed less than "
                                 f"{self.retry_after:g} s ago")
        try:
            async with asyncio.timeout(self.timeout):
                result = await operation
        except (TimeoutError, OSError, ConnectionError, _redis_errors()) as exc:
            self._fail(exc)
            raise SharedTierDown(f"Redis at {self.url}: {type(exc).__name__}: {exc}") from exc
        if self._down:
            self._down = False
            logger.info("response cache: Redis at %s answers again", self.url)
        return result

    def _fail(self, exc: BaseException) -> None:
        self._down_until = time.monotonic() + self.retry_after
        if not self._down:
            self._down = True
            logger.warning("response cache: Redis at %s failed (%s: %s); requests bypass "
                           "the cache until it answers (retried every %g s)", self.url,
                           type(exc).__name__, exc or "timed out", self.retry_after)


def _redis_errors() -> type[Exception]:
    from redis.exceptions import RedisError

    return RedisError


def _discard(operation: Awaitable[Any]) -> None:
    close = getattr(operation, "close", None)
    if close is not None:
        close()  # a coroutine never awaited: close it so Python does not warn


def _glob_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)

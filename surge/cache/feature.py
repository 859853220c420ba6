"""The response cache as a feature of the server: it becomes the request context's
``response_cache``, adds its metrics to the server's registry, and mounts the operator
routes (behind the API key, like every /v1 route)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.responses import Response

from surge.cache.exact import CacheSettings, ExactCache
from surge.cache.metrics import CacheMetrics
from surge.cache.shared import RedisTier, SharedTierDown
from surge.http.errors import APIError
from surge.http.openapi import error_responses
from surge.http.responses import json_response
from surge.server.features import ServerHost

__all__ = ["CacheFeature"]


class CacheFeature:
    def __init__(self, settings: CacheSettings, shared: RedisTier | None = None) -> None:
        self.settings = settings
        self.shared = shared
        self.cache: ExactCache | None = None

    def mount(self, app: FastAPI, host: ServerHost) -> None:
        cache = ExactCache(self.settings, CacheMetrics(host.metrics.registry), self.shared)
        self.cache = cache
        host.context.response_cache = cache
        host.services.add(lambda: _closing(cache))
        _add_routes(app, cache)


@contextlib.asynccontextmanager
async def _closing(cache: ExactCache) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await cache.close()


def _add_routes(app: FastAPI, cache: ExactCache) -> None:
    responses = error_responses({401: "missing or wrong API key",
                                 503: "Redis did not answer (the shared tier is not flushed)"})

    @app.get("/v1/response-cache", tags=["operations"], responses=responses)
    async def cache_stats() -> Response:
        """The local tier's entries and bytes, the bounds, and the shared tier's state."""
        return json_response(cache.stats())

    @app.post("/v1/response-cache/flush", tags=["operations"], responses=responses)
    async def flush_cache() -> Response:
        """Forget every cached answer, here and in Redis (other replicas' local copies
        expire within seconds)."""
        try:
            return json_response({"flushed": await cache.flush()})
        except SharedTierDown as exc:
            raise APIError(503, f"the local cache was flushed but Redis was not: {exc}; "
                           "retry", code="cache_unavailable") from exc

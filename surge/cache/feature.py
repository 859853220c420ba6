"""The response cache as a feature of the server: it becomes the request context's
``response_cache``, adds its metrics to the server's registry, and mounts the operator
routes (behind the API key, like every /v1 route)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np
from fastapi import FastAPI
from starlette.responses import Response

from surge.cache.exact import CacheSettings, ExactCache
from surge.cache.metrics import CacheMetrics
from surge.cache.semantic import SemanticIndex, SemanticSettings, unit
from surge.cache.shared import RedisTier, SharedTierDown
from surge.http.errors import APIError
from surge.http.openapi import error_responses
from surge.http.responses import json_response
from surge.server.features import ServerHost

__all__ = ["CacheFeature"]


logger = logging.getLogger("surge.cache")


class CacheFeature:
    def __init__(self, settings: CacheSettings, shared: RedisTier | None = None,
                 semantic: SemanticSettings | None = None) -> None:
        self.settings = settings
        self.shared = shared
        self.semantic = semantic
        self.cache: ExactCache | None = None

    def mount(self, app: FastAPI, host: ServerHost) -> None:
        semantic = None
        if self.semantic is not None:
            _require_embedding_model(host, self.semantic.model)
            semantic = SemanticIndex(self.semantic, _embedder(host, self.semantic.model),
                                     self.settings.ttl, self.shared, self.settings.key_prefix)
        cache = ExactCache(self.settings, CacheMetrics(host.metrics.registry), self.shared,
                           semantic)
        cache.tenants = host.context.tenants  # one resolution for scheduling and caching
        self.cache = cache
        host.context.response_cache = cache
        host.services.add(lambda: _closing(cache))
        _add_routes(app, cache)


def _require_embedding_model(host: ServerHost, name: str) -> None:
    if name not in host.models.names("embed"):
        served = ", ".join(host.models.names("embed")) or "none"
        raise ValueError(f"--semantic-model={name!r} is not an embedding model this server "
                         f"serves (it serves: {served}): add --extra-model {name}, or name "
                         "a served one")


def _embedder(host: ServerHost, name: str) -> Callable[[str], Awaitable[np.ndarray | None]]:
    """The unit vector of a text through the served model's batcher; None while the model
    cannot answer (loading, its queue full): that request skips the semantic tier."""

    async def embed(text: str) -> np.ndarray | None:
        target = host.models.resolve(name, "embed").target
        try:
            [vector] = await target.embed_texts([text], host.context.deadline())
        except Exception as exc:  # any failure here only skips the tier for this request
            logger.debug("semantic cache: no vector (%s: %s)", type(exc).__name__, exc)
            return None
        return unit(vector)

    return embed


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

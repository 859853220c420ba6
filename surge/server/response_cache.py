"""Where a response cache plugs into the request path: the endpoint families describe each
request as a ``CacheQuery`` (after tokenizing, before charging and admission), ask the
context's ``ResponseCache`` for a ``CacheLookup``, answer a hit without the engine, and hand
a miss's answer back to the lookup to keep.

The server knows only this protocol; the cache itself (local LRU, Redis tier) is a feature
(``surge.cache``) that sets ``RequestContext.response_cache`` when it mounts. Without it,
``NO_CACHE`` answers every lookup with "not cached" and adds no header.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import Response

from surge.http.responses import SSE_DONE, SSEResponse, json_response, sse_event

__all__ = [
    "CACHE_HEADER",
    "NOT_CACHED",
    "NO_CACHE",
    "CacheLookup",
    "CacheQuery",
    "CachedAnswer",
    "ResponseCache",
    "cached_response",
    "with_cache_header",
]

CACHE_HEADER = "X-Surge-Cache"


@dataclass(frozen=True)
class CacheQuery:
    """One request as a cache sees it.

    ``material`` is the normalized request: the prompt as token ids (after the chat
    template) and every field that changes the answer or its framing. ``model_dir`` (its
    files' fingerprint, taken by the cache) and ``model_variant`` (dtype, device) name what
    produced answers: a new checkpoint never serves an old answer. ``reproducible``: the
    same request gives the same answer (temperature 0, a fixed seed, embeddings)."""

    endpoint: str
    model: str
    model_dir: str | None
    model_variant: str
    material: dict[str, Any]
    reproducible: bool
    user: str | None = None
    # Chat only: the messages as sent, for a semantic cache (it embeds the last user turn).
    messages: list[dict[str, Any]] | None = None


@dataclass
class CachedAnswer:
    """A kept answer: a JSON body, or the SSE events' payloads in order (without [DONE]);
    ``num_tokens`` (its usage, when it says) is what a hit charges the rate limit."""

    body: dict[str, Any] | None = None
    events: list[dict[str, Any]] | None = None
    num_tokens: int = 0


class CacheLookup(Protocol):
    """One request's dealings with the cache: the answer if it was a hit, else the way to
    keep the answer this request is about to produce."""

    @property
    def status(self) -> str | None:
        """``hit``, ``miss`` or ``bypass`` (the header's value); None: no cache."""
        ...

    @property
    def answer(self) -> CachedAnswer | None: ...

    async def store_body(self, body: dict[str, Any]) -> None:
        """Keep a JSON answer (the cache refuses what must not be kept)."""
        ...

    def record_stream(self, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """``events`` passed through; kept when the stream ends complete and well."""
        ...


class ResponseCache(Protocol):
    async def lookup(self, request: Request, query: CacheQuery) -> CacheLookup: ...


@dataclass
class _NotCached:
    status: str | None = None
    answer: CachedAnswer | None = field(default=None)

    async def store_body(self, body: dict[str, Any]) -> None:
        return None

    def record_stream(self, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        return events


class _NoCache:
    async def lookup(self, request: Request, query: CacheQuery) -> CacheLookup:
        return NOT_CACHED


NOT_CACHED: CacheLookup = _NotCached()
NO_CACHE: ResponseCache = _NoCache()


def with_cache_header(response: Response, lookup: CacheLookup) -> Response:
    if lookup.status is not None:
        response.headers[CACHE_HEADER] = lookup.status
    return response


def cached_response(lookup: CacheLookup, id_prefix: str | None) -> Response:
    """A hit as a fresh answer: a new id and creation time (when the answer has them),
    framed as a miss would be (JSON, or SSE events then [DONE])."""
    answer = lookup.answer
    assert answer is not None
    fresh: dict[str, Any] = {}
    if id_prefix is not None:
        fresh = {"id": f"{id_prefix}-{uuid.uuid4().hex}", "created": int(time.time())}
    headers = {CACHE_HEADER: lookup.status or "hit"}
    if answer.events is not None:
        events = [{**event, **fresh} for event in answer.events]
        return SSEResponse(_replay(events), headers=headers)
    response = json_response({**(answer.body or {}), **fresh})
    response.headers.update(headers)
    return response


async def _replay(events: list[dict[str, Any]]) -> AsyncIterator[bytes]:
    for event in events:
        yield sse_event(event)
    yield SSE_DONE

"""The exact response cache: a request answered before, by the same tenant, of the same
model version, with the same normalized request, is answered again without the engine.

Only reproducible requests are cached (temperature 0, a fixed seed, embeddings). Never kept:
errors, streams that were cut off or ended in an error event, and answers that stopped at
``max_tokens`` (``finish_reason: length``), which a larger budget would have continued.

With a semantic tier (``surge.cache.semantic``), an exact miss of a chat request may still be
answered by the entry whose last user message means the same (``X-Surge-Cache:
semantic-hit``).

Identical requests that arrive while the first of them is still being answered do not all go
to the engine: the first leads, the others wait (at most ``single_flight_wait`` seconds) and
are answered from the entry it keeps (tier ``coalesced``). When the leader keeps nothing (it
failed, was cut by ``max_tokens``, or its client left), the waiters go to the engine
themselves, as nginx's ``proxy_cache_lock`` and Go's singleflight do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from starlette.requests import Request

from surge.cache.keys import (
    FORMAT_VERSION,
    CacheControl,
    cache_key,
    model_fingerprint,
    tenant_of,
)
from surge.cache.local import LocalLRU
from surge.cache.metrics import CacheMetrics
from surge.cache.semantic import SemanticIndex, compared_text, scope_of
from surge.cache.shared import RedisTier, SharedTierDown
from surge.http.responses import SSE_DONE
from surge.server.response_cache import CachedAnswer, CacheLookup, CacheQuery
from surge.server.tenants import Tenants

__all__ = ["CacheSettings", "ExactCache"]

logger = logging.getLogger("surge.cache")


@dataclass(frozen=True)
class CacheSettings:
    max_bytes: int = 256 << 20
    ttl: float = 3600.0
    key_prefix: str = "surge:rc:"
    # Keep answers cut by max_tokens too (the same request is cut at the same place).
    keep_length_cut: bool = False
    # With a shared tier, a local copy lives at most this long, so a flush (or an entry
    # another replica replaced) reaches every replica soon.
    local_ttl_with_shared: float = 10.0
    # How long an identical request waits for the one already being answered (0: never).
    single_flight_wait: float = 60.0

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError(f"--response-cache-bytes={self.max_bytes} is invalid: allowed "
                             "is an integer >= 1")
        if not self.ttl > 0:
            raise ValueError(f"--response-cache-ttl={self.ttl} is invalid: allowed is a "
                             "number of seconds > 0")
        if not self.single_flight_wait >= 0:
            raise ValueError(f"--response-cache-wait={self.single_flight_wait} is invalid: "
                             "allowed is a number of seconds >= 0")


class ExactCache:
    """A ``surge.server.response_cache.ResponseCache``."""

    def __init__(self, settings: CacheSettings, metrics: CacheMetrics,
                 shared: RedisTier | None = None, semantic: SemanticIndex | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.shared = shared
        self.semantic = semantic
        self.local = LocalLRU(settings.max_bytes, on_evict=self._evicted)
        # Key -> done when the request answering it has kept (or given up) its answer.
        self._in_flight: dict[str, asyncio.Future[None]] = {}
        # The server's tenant resolution (set when the feature mounts); None: keys and users.
        self.tenants: Tenants | None = None

    async def lookup(self, request: Request, query: CacheQuery) -> CacheLookup:
        started = time.perf_counter()
        try:
            return await self._lookup(request, query)
        finally:
            self.metrics.lookup_seconds.observe(time.perf_counter() - started)

    async def flush(self) -> dict[str, int]:
        """Forget every entry: this replica's, and the shared tier's (others' local copies
        expire within ``local_ttl_with_shared``)."""
        flushed = {"local": self.local.clear(), "shared": 0}
        if self.semantic is not None:
            self.semantic.clear()
        self._update_gauges()
        if self.shared is not None:
            try:
                flushed["shared"] = await self.shared.flush(self.settings.key_prefix)
            except SharedTierDown:
                self.metrics.shared_errors.labels("flush").inc()
                raise
        return flushed

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self.local), "bytes": self.local.num_bytes,
                "max_bytes": self.settings.max_bytes, "ttl": self.settings.ttl,
                "shared": self.shared.url if self.shared is not None else None,
                "shared_up": self.shared.is_up if self.shared is not None else None}

    async def close(self) -> None:
        if self.shared is not None:
            await self.shared.close()

    # -- looking up --------------------------------------------------------------------------

    async def _lookup(self, request: Request, query: CacheQuery) -> _Lookup:
        control = CacheControl.of(request.headers.get("cache-control"))
        if not query.reproducible:
            return self._bypass("not_reproducible")
        tenant = tenant_of(request, query.user, self.tenants)
        key = cache_key(tenant, query)
        keep = None if control.no_store else key
        if control.no_cache:
            return self._bypass("no_cache", self, keep, query.endpoint)
        answer = self.local.get(key)
        if answer is not None:
            self.metrics.hits.labels(query.endpoint, "local").inc()
            return _Lookup("hit", answer)
        if self.shared is not None:
            try:
                answer = await self._shared_get(key)
            except SharedTierDown:
                self.metrics.shared_errors.labels("get").inc()
                return self._bypass("shared_tier_down")
            if answer is not None:
                self.metrics.hits.labels(query.endpoint, "shared").inc()
                return _Lookup("hit", answer)
        if keep is not None and key in self._in_flight:
            answer = await self._answer_of_leader(key)
            if answer is not None:
                self.metrics.hits.labels(query.endpoint, "coalesced").inc()
                return _Lookup("hit", answer)
        probe = await self._semantic_probe(tenant, query)
        if probe is not None:
            answer = await self._semantic_answer(probe)
            if answer is not None:
                self.metrics.hits.labels(query.endpoint, "semantic").inc()
                return _Lookup("semantic-hit", answer)
        self.metrics.misses.labels(query.endpoint).inc()
        lookup = _Lookup("miss", None, self, keep, query.endpoint, probe)
        if keep is not None:
            self._lead(key, lookup)
        return lookup

    # -- one answer for identical requests in flight -----------------------------------------

    async def _answer_of_leader(self, key: str) -> CachedAnswer | None:
        """Wait for the request already answering ``key``; its kept answer, if any."""
        leader = self._in_flight.get(key)
        if leader is None or self.settings.single_flight_wait <= 0:
            return None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(leader), self.settings.single_flight_wait)
        return self.local.get(key)

    def _lead(self, key: str, lookup: _Lookup) -> None:
        """Make ``lookup`` the one answering ``key``; waiters wake when it has kept its
        answer or, whatever happened to the request, when the lookup is dropped."""
        if key in self._in_flight or self.settings.single_flight_wait <= 0:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._in_flight[key] = done
        lookup.release = self._releaser(key, done)
        # A request that fails before keeping anything just drops its lookup: that must wake
        # the waiters too (from whichever thread the garbage collector runs in).
        weakref.finalize(lookup, _call_soon, loop, lookup.release)

    def _releaser(self, key: str, done: asyncio.Future[None]) -> Callable[[], None]:
        def release() -> None:
            if self._in_flight.get(key) is done:
                del self._in_flight[key]
            if not done.done():
                done.set_result(None)
        return release

    def _bypass(self, reason: str, cache: ExactCache | None = None, key: str | None = None,
                endpoint: str = "") -> _Lookup:
        self.metrics.bypasses.labels(reason).inc()
        return _Lookup("bypass", None, cache, key, endpoint)

    async def _shared_get(self, key: str) -> CachedAnswer | None:
        assert self.shared is not None
        raw = await self.shared.get(self.settings.key_prefix + key)
        if raw is None:
            return None
        decoded = _decode(raw, key)
        if decoded is None:  # overwritten when this request's answer is kept
            self.metrics.corrupt.inc()
            logger.warning("response cache: unreadable entry %s%s in Redis, treated as a "
                           "miss", self.settings.key_prefix, key)
            return None
        answer, expires_at = decoded
        remaining = min(expires_at - time.time(), self.settings.local_ttl_with_shared)
        self._put_local(key, answer, len(raw), remaining)
        return answer

    # -- by meaning ---------------------------------------------------------------------------

    async def _semantic_probe(self, tenant: str, query: CacheQuery) -> _Probe | None:
        """The compared text's vector and the scope it must match in; None when the
        semantic tier is off, the request is not a chat ending in a user's text, or the
        embedding model cannot answer now."""
        if self.semantic is None:
            return None
        turn = compared_text(query.messages, self.semantic.settings.compare)
        if turn is None:
            return None
        text, earlier = turn
        vector = await self.semantic.embed(text)
        if vector is None:
            return None
        exact = {k: v for k, v in query.material.items() if k != "prompt_token_ids"}
        scope = scope_of(tenant, {"embedder": self.semantic.settings.model,
                                  "endpoint": query.endpoint, "model": query.model,
                                  "variant": query.model_variant,
                                  "version": model_fingerprint(query.model_dir),
                                  "request": exact}, earlier)
        return _Probe(scope, vector, text)

    async def _semantic_answer(self, probe: _Probe) -> CachedAnswer | None:
        assert self.semantic is not None
        try:
            found = await self.semantic.nearest(probe.scope, probe.vector, probe.text)
            if found is None:
                return None
            answer = self.local.get(found[0])
            if answer is None and self.shared is not None:
                answer = await self._shared_get(found[0])
            return answer
        except SharedTierDown:
            self.metrics.shared_errors.labels("get").inc()
            return None

    # -- keeping -----------------------------------------------------------------------------

    async def store(self, key: str, endpoint: str, answer: CachedAnswer,
                    probe: _Probe | None = None) -> None:
        ttl = self.settings.ttl
        expires_at = time.time() + ttl
        encoded = _encode(answer, key, expires_at)
        if len(encoded) > self.settings.max_bytes:
            return  # larger than the whole cache: kept nowhere
        local_ttl = ttl if self.shared is None else min(ttl, self.settings.local_ttl_with_shared)
        self._put_local(key, answer, len(encoded), local_ttl)
        self.metrics.stores.labels(endpoint).inc()
        try:
            if self.shared is not None:
                await self.shared.set(self.settings.key_prefix + key, encoded, ttl)
            if probe is not None and self.semantic is not None:
                await self.semantic.add(probe.scope, probe.vector, key, probe.text)
        except SharedTierDown:
            self.metrics.shared_errors.labels("set").inc()

    def _put_local(self, key: str, answer: CachedAnswer, size: int, ttl: float) -> None:
        self.local.put(key, answer, size, ttl)
        self._update_gauges()

    def _evicted(self, reason: str) -> None:
        self.metrics.evictions.labels(reason).inc()

    def _update_gauges(self) -> None:
        self.metrics.bytes.set(self.local.num_bytes)
        self.metrics.entries.set(len(self.local))


@dataclass(frozen=True)
class _Probe:
    scope: str
    vector: Any  # np.ndarray, unit length
    text: str  # what was compared by meaning


@dataclass
class _Lookup:
    """A ``surge.server.response_cache.CacheLookup``: ``key`` None means nothing is kept."""

    status: str
    answer: CachedAnswer | None
    cache: ExactCache | None = None
    key: str | None = None
    endpoint: str = ""
    probe: _Probe | None = None
    # Wakes identical requests waiting for this one (set when this lookup leads).
    release: Callable[[], None] = field(default=lambda: None, repr=False)

    async def store_body(self, body: dict[str, Any]) -> None:
        try:
            if self.cache is None or self.key is None or self._refused(body.get("choices", ())):
                return
            await self.cache.store(self.key, self.endpoint,
                                   CachedAnswer(body=body, num_tokens=_total_tokens(body)),
                                   self.probe)
        finally:
            self.release()

    def _refused(self, choices: Iterable[Any]) -> bool:
        assert self.cache is not None
        return not self.cache.settings.keep_length_cut and _cut_short(choices)

    def record_stream(self, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        if self.cache is None or self.key is None:
            return events
        return self._recorded(events)

    async def _recorded(self, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        payloads: list[dict[str, Any]] | None = []
        try:
            async with contextlib.aclosing(events) as stream:  # type: ignore[type-var]
                async for data in stream:
                    if data == SSE_DONE and payloads is not None:
                        # Kept before [DONE] goes out: a client that saw the end finds it.
                        await self._store_events(payloads)
                        self.release()
                    elif payloads is not None:
                        payloads = _add_event(payloads, data)
                    yield data
        finally:
            self.release()

    async def _store_events(self, payloads: list[dict[str, Any]]) -> None:
        assert self.cache is not None and self.key is not None
        if any(self._refused(event.get("choices", ())) for event in payloads):
            return
        usage = [e["usage"] for e in payloads if isinstance(e.get("usage"), dict)]
        num_tokens = usage[-1].get("total_tokens", 0) if usage else 0
        await self.cache.store(self.key, self.endpoint,
                               CachedAnswer(events=payloads, num_tokens=num_tokens), self.probe)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: no one is waiting
        loop.call_soon_threadsafe(callback)


def _add_event(payloads: list[dict[str, Any]], data: bytes) -> list[dict[str, Any]] | None:
    """``payloads`` with ``data``'s events added; None when the stream must not be kept
    (an error event, or a frame this cache does not understand)."""
    for frame in data.split(b"\n\n"):
        if not frame:
            continue
        if not frame.startswith(b"data: "):
            return None
        try:
            event = msgspec.json.decode(frame[len(b"data: "):])
        except msgspec.DecodeError:
            return None
        if not isinstance(event, dict) or "error" in event:
            return None
        payloads.append(event)
    return payloads


def _cut_short(choices: Iterable[Any]) -> bool:
    return any(isinstance(c, dict) and c.get("finish_reason") == "length" for c in choices)


def _total_tokens(body: dict[str, Any]) -> int:
    usage = body.get("usage")
    return int(usage.get("total_tokens", 0)) if isinstance(usage, dict) else 0


# -- the shared tier's entries ---------------------------------------------------------------


def _encode(answer: CachedAnswer, key: str, expires_at: float) -> bytes:
    return msgspec.json.encode({"format": FORMAT_VERSION, "key": key, "expires_at": expires_at,
                                "body": answer.body, "events": answer.events,
                                "num_tokens": answer.num_tokens})


def _decode(raw: bytes, key: str) -> tuple[CachedAnswer, float] | None:
    """The entry, or None when it is not one this version wrote for ``key``."""
    try:
        entry = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return None
    if not isinstance(entry, dict) or entry.get("format") != FORMAT_VERSION \
            or entry.get("key") != key:
        return None
    body, events, expires_at = entry.get("body"), entry.get("events"), entry.get("expires_at")
    valid = ((isinstance(body, dict) and events is None)
             or (body is None and isinstance(events, list)
                 and all(isinstance(e, dict) for e in events)))
    if not valid or not isinstance(expires_at, int | float):
        return None
    return CachedAnswer(body=body, events=events,
                        num_tokens=int(entry.get("num_tokens") or 0)), float(expires_at)

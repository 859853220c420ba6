"""The cache's parts without a server: the local LRU's bounds, Cache-Control, what a
stream must be to be kept, and the Redis tier against the real Redis of this machine."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import msgspec
import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry
from starlette.requests import Request

from surge.cache.exact import CacheSettings, ExactCache
from surge.cache.keys import CacheControl
from surge.cache.local import LocalLRU
from surge.cache.metrics import CacheMetrics
from surge.cache.semantic import SemanticIndex, SemanticSettings
from surge.cache.shared import RedisTier
from surge.http.gate import KEY_ID_STATE
from surge.http.responses import SSE_DONE, sse_event
from surge.server.response_cache import CachedAnswer, CacheQuery
from tests.cache.conftest import REDIS_URL, dead_redis_url

# -- the local tier --------------------------------------------------------------------------


class _Clock:
    """Time the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _answer(text: str) -> CachedAnswer:
    return CachedAnswer(body={"text": text})


def test_local_tier_keeps_at_most_its_bytes_evicting_the_least_recently_used() -> None:
    evicted: list[str] = []
    lru = LocalLRU(300, on_evict=evicted.append)
    for name in "abc":
        assert lru.put(name, _answer(name), 100, ttl=60)
    assert lru.get("a") is not None  # "a" is now the most recently used, "b" the least
    assert lru.put("d", _answer("d"), 100, ttl=60)
    assert lru.get("b") is None
    assert [lru.get(k) is not None for k in "acd"] == [True, True, True]
    assert lru.num_bytes == 300 and len(lru) == 3 and evicted == ["size"]
    assert not lru.put("huge", _answer("x"), 301, ttl=60)  # larger than the whole cache
    assert lru.num_bytes == 300 and lru.get("huge") is None


def test_local_tier_forgets_an_entry_at_its_deadline() -> None:
    clock, evicted = _Clock(), []
    lru = LocalLRU(1000, on_evict=evicted.append, clock=clock)
    lru.put("a", _answer("a"), 10, ttl=5.0)
    clock.now = 4.9
    assert lru.get("a") is not None
    clock.now = 5.0
    assert lru.get("a") is None
    assert evicted == ["expired"] and lru.num_bytes == 0


def test_local_tier_refuses_a_bound_below_one_byte() -> None:
    with pytest.raises(ValueError, match="max_bytes=0 is invalid: allowed is an integer >= 1"):
        LocalLRU(0)


@pytest.mark.parametrize(("header", "no_cache", "no_store"), [
    (None, False, False), ("no-cache", True, False), ("No-Store", False, True),
    ("max-age=0, no-cache, no-store", True, True), ("private, x-unknown=1, max-age=5", False,
                                                    False), ("", False, False)])
def test_cache_control_directives(header: str | None, no_cache: bool, no_store: bool) -> None:
    assert CacheControl.of(header) == CacheControl(no_cache, no_store)


def test_settings_refuse_bad_bounds() -> None:
    with pytest.raises(ValueError, match="--response-cache-bytes=0 is invalid"):
        CacheSettings(max_bytes=0)
    with pytest.raises(ValueError, match="--response-cache-ttl=0 is invalid"):
        CacheSettings(ttl=0)
    with pytest.raises(ValueError, match="--response-cache-wait=-1 is invalid: allowed is a "
                                         "number of seconds >= 0"):
        CacheSettings(single_flight_wait=-1)
    with pytest.raises(ValueError, match="--cache-url='http://x' is invalid: allowed is a "
                                         "Redis URL"):
        RedisTier("http://x")


# -- the exact cache -------------------------------------------------------------------------


def _request(key: str | None = "key-a", cache_control: str | None = None) -> Request:
    headers = [(b"cache-control", cache_control.encode())] if cache_control else []
    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions",
                    "headers": headers, "state": {KEY_ID_STATE: key}})


def _query(prompt: list[int], *, reproducible: bool = True, user: str | None = None
           ) -> CacheQuery:
    return CacheQuery("chat", "tiny", None, "float32 cpu",
                      {"prompt_token_ids": [prompt], "temperature": 0}, reproducible, user)


def _cache(prefix: str | None = None, url: str = REDIS_URL, ttl: float = 60.0,
           max_bytes: int = 1 << 20) -> ExactCache:
    shared = RedisTier(url, timeout=0.2) if prefix is not None else None
    settings = CacheSettings(max_bytes=max_bytes, ttl=ttl, key_prefix=prefix or "unused:")
    return ExactCache(settings, CacheMetrics(CollectorRegistry()), shared)


def _chunk(text: str, finish: str | None = None) -> bytes:
    return sse_event({"id": "chatcmpl-1", "created": 1, "choices": [
        {"index": 0, "delta": {"content": text}, "finish_reason": finish}]})


async def _events(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def _drain(stream: AsyncIterator[bytes], stop_after: int | None = None) -> list[bytes]:
    seen: list[bytes] = []
    async for data in stream:
        seen.append(data)
        if stop_after is not None and len(seen) == stop_after:
            await stream.aclose()  # type: ignore[attr-defined]
            break
    return seen


def test_only_reproducible_requests_are_looked_up_and_kept() -> None:
    async def main() -> None:
        cache = _cache()
        lookup = await cache.lookup(_request(), _query([1, 2], reproducible=False))
        assert lookup.status == "bypass"
        await lookup.store_body({"choices": [{"finish_reason": "stop"}]})
        assert len(cache.local) == 0
        lookup = await cache.lookup(_request(), _query([1, 2]))
        assert lookup.status == "miss"
        await lookup.store_body({"choices": [{"finish_reason": "stop"}], "usage": {
            "total_tokens": 7}})
        hit = await cache.lookup(_request(), _query([1, 2]))
        assert hit.status == "hit" and hit.answer is not None and hit.answer.num_tokens == 7
        assert (await cache.lookup(_request("key-b"), _query([1, 2]))).status == "miss"
        assert (await cache.lookup(_request(), _query([1, 2], user="u"))).status == "miss"

    asyncio.run(main())


def test_a_stream_is_kept_only_when_it_ended_complete_and_well() -> None:
    async def main() -> None:
        cache = _cache()
        cases = {  # prompt -> (chunks, stop_after)
            1: ([_chunk("a"), _chunk("b"), _chunk("", "stop"), SSE_DONE], 2),  # aborted
            2: ([_chunk("a"), sse_event({"error": {"message": "boom"}}), SSE_DONE], None),
            3: ([_chunk("a"), _chunk("", "length"), SSE_DONE], None),  # cut by max_tokens
            4: ([_chunk("a"), _chunk("b")], None),  # ended without [DONE]
            5: ([_chunk("a"), _chunk("", "stop"), SSE_DONE], None),  # kept
        }
        for prompt, (chunks, stop_after) in cases.items():
            lookup = await cache.lookup(_request(), _query([prompt]))
            assert lookup.status == "miss"
            seen = await _drain(lookup.record_stream(_events(*chunks)), stop_after)
            assert seen == chunks[:stop_after]  # passed through untouched
        kept = {prompt: (await cache.lookup(_request(), _query([prompt]))).status
                for prompt in cases}
        assert kept == {1: "miss", 2: "miss", 3: "miss", 4: "miss", 5: "hit"}

    asyncio.run(main())


def test_no_store_keeps_nothing_and_no_cache_skips_the_lookup_but_refreshes() -> None:
    async def main() -> None:
        cache = _cache()
        body = {"choices": [{"finish_reason": "stop"}]}
        lookup = await cache.lookup(_request(cache_control="no-store"), _query([9]))
        assert lookup.status == "miss"
        await lookup.store_body(body)
        lookup = await cache.lookup(_request(cache_control="no-cache"), _query([9]))
        assert lookup.status == "bypass"
        await lookup.store_body(body)
        assert (await cache.lookup(_request(), _query([9]))).status == "hit"

    asyncio.run(main())


# -- the Redis tier --------------------------------------------------------------------------


def test_two_caches_share_entries_through_redis_until_their_ttl(redis_prefix: str) -> None:
    async def main() -> None:
        first, second = _cache(redis_prefix, ttl=0.5), _cache(redis_prefix, ttl=0.5)
        lookup = await first.lookup(_request(), _query([3, 4]))
        await lookup.store_body({"choices": [{"finish_reason": "stop", "text": "x"}]})
        hit = await second.lookup(_request(), _query([3, 4]))
        assert hit.status == "hit" and hit.answer is not None
        assert hit.answer.body == {"choices": [{"finish_reason": "stop", "text": "x"}]}
        await asyncio.sleep(0.7)
        third = _cache(redis_prefix, ttl=0.5)  # no local copy: Redis itself forgot it
        assert (await third.lookup(_request(), _query([3, 4]))).status == "miss"
        assert (await first.lookup(_request(), _query([3, 4]))).status == "miss"
        for cache in (first, second, third):
            await cache.close()

    asyncio.run(main())


@pytest.mark.parametrize("corruption", [b"{not json", b"[1, 2]",
                                         msgspec.json.encode({"format": 99, "body": {}})])
def test_a_corrupt_redis_entry_is_a_miss_and_is_overwritten(
        redis_prefix: str, sync_redis: redis.Redis, corruption: bytes) -> None:
    async def main() -> None:
        writer = _cache(redis_prefix)
        lookup = await writer.lookup(_request(), _query([5]))
        await lookup.store_body({"choices": [{"finish_reason": "stop"}]})
        [key] = list(sync_redis.scan_iter(match=redis_prefix + "*"))
        sync_redis.set(key, corruption)
        reader = _cache(redis_prefix)
        lookup = await reader.lookup(_request(), _query([5]))
        assert lookup.status == "miss"
        assert reader.metrics.corrupt._value.get() == 1
        await lookup.store_body({"choices": [{"finish_reason": "stop"}]})
        assert msgspec.json.decode(sync_redis.get(key))["format"] == 1
        assert (await _cache(redis_prefix).lookup(_request(), _query([5]))).status == "hit"
        for cache in (writer, reader):
            await cache.close()

    asyncio.run(main())


def test_redis_down_is_a_bypass_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        cache = _cache("surge-test-dead:", url=dead_redis_url())
        started = time.monotonic()
        statuses = []
        for _ in range(20):
            lookup = await cache.lookup(_request(), _query([6]))
            await lookup.store_body({"choices": [{"finish_reason": "stop"}]})
            statuses.append(lookup.status)
        # One failed connection, then the tier stays off: no request waits on Redis again.
        assert time.monotonic() - started < 1.0
        assert statuses == ["bypass"] * 20
        assert cache.metrics.bypasses.labels("shared_tier_down")._value.get() == 20
        await cache.close()

    with caplog.at_level(logging.WARNING, logger="surge.cache"):
        asyncio.run(main())
    warnings = [r for r in caplog.records if "requests bypass the cache" in r.getMessage()]
    assert len(warnings) == 1



def test_length_cut_answers_are_kept_only_when_asked() -> None:
    async def main() -> None:
        body = {"choices": [{"finish_reason": "length"}]}
        for keep, expected in ((False, "miss"), (True, "hit")):
            cache = ExactCache(CacheSettings(keep_length_cut=keep),
                               CacheMetrics(CollectorRegistry()))
            await (await cache.lookup(_request(), _query([8]))).store_body(body)
            assert (await cache.lookup(_request(), _query([8]))).status == expected

    asyncio.run(main())


def test_the_local_semantic_index_is_bounded() -> None:
    async def no_vector(text: str) -> None:
        return None

    async def main() -> None:
        settings = SemanticSettings(max_entries_per_scope=2, max_local_scopes=3)
        index = SemanticIndex(settings, no_vector, ttl=60.0)
        vector = np.array([1.0, 0.0], dtype=np.float32)
        for i in range(3):
            await index.add("scope", vector, f"key-{i}")
        assert [i.key for i in await index._items("scope")] == ["key-1", "key-2"]
        for name in ("b", "c", "d"):
            await index.add(name, vector, name)
        assert await index.nearest("scope", vector) is None  # the oldest scope left
        assert await index.nearest("d", vector) == ("d", 1.0)

    asyncio.run(main())


# -- identical requests in flight ------------------------------------------------------------


def test_identical_requests_in_flight_wait_for_the_first_answer() -> None:
    async def main() -> None:
        cache = _cache()
        leader = await cache.lookup(_request(), _query([5, 6]))
        assert leader.status == "miss"
        followers = [asyncio.create_task(cache.lookup(_request(), _query([5, 6])))
                     for _ in range(3)]
        other_tenant = await cache.lookup(_request("key-b"), _query([5, 6]))
        assert other_tenant.status == "miss"  # a different key never waits
        await asyncio.sleep(0.05)
        assert not any(task.done() for task in followers)  # no engine work for them yet
        await leader.store_body({"choices": [{"finish_reason": "stop", "text": "42"}]})
        answered = await asyncio.gather(*followers)
        assert [f.status for f in answered] == ["hit"] * 3
        assert all(f.answer is not None and f.answer.body["choices"][0]["text"] == "42"
                   for f in answered)
        assert cache.metrics.hits.labels("chat", "coalesced")._value.get() == 3

    asyncio.run(main())


def test_waiters_go_to_the_engine_when_the_first_keeps_nothing() -> None:
    async def main() -> None:
        cache = _cache()
        # The first request fails before answering: its lookup is simply dropped.
        failed = await cache.lookup(_request(), _query([7]))
        waiter = asyncio.create_task(cache.lookup(_request(), _query([7])))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        del failed
        assert (await asyncio.wait_for(waiter, 5)).status == "miss"
        # The first is cut by max_tokens (never kept): the waiter is a miss, not a hit.
        cut = await cache.lookup(_request(), _query([8]))
        waiter = asyncio.create_task(cache.lookup(_request(), _query([8])))
        await asyncio.sleep(0.05)
        await cut.store_body({"choices": [{"finish_reason": "length"}]})
        assert (await asyncio.wait_for(waiter, 5)).status == "miss"
        # A stream whose client left mid-way wakes its waiters too.
        streamed = await cache.lookup(_request(), _query([9]))
        waiter = asyncio.create_task(cache.lookup(_request(), _query([9])))
        await _drain(streamed.record_stream(_events(_chunk("a"), _chunk("b"), SSE_DONE)), 1)
        assert (await asyncio.wait_for(waiter, 5)).status == "miss"

    asyncio.run(main())


def test_a_waiter_gives_up_after_the_single_flight_wait() -> None:
    async def main() -> None:
        settings = CacheSettings(max_bytes=1 << 20, single_flight_wait=0.1)
        cache = ExactCache(settings, CacheMetrics(CollectorRegistry()))
        leader = await cache.lookup(_request(), _query([10]))
        started = time.monotonic()
        assert (await cache.lookup(_request(), _query([10]))).status == "miss"
        assert 0.1 <= time.monotonic() - started < 2.0
        assert leader.status == "miss"

    asyncio.run(main())

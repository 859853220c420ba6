"""A cached `surge serve` whose Redis is unreachable, and one bounded tightly in bytes and
time: requests are always answered, the bounds hold."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.cache._http import CACHE, chat, events, metric, post, stopping
from tests.cache.conftest import KEYS, dead_redis_url
from tests.server._helpers import start_server

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"


def test_redis_unreachable_means_bypass_never_a_failed_request(
        tiny_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    server = start_server(tiny_checkpoint("tiny-llama"), tmp_path, "--served-model-name",
                          "tiny", "--api-key", KEYS[0], "--cache-url", dead_redis_url(),
                          "--cache-key-prefix", f"surge-test-dead:{uuid.uuid4().hex}:")
    try:
        body = chat("is anyone there?")
        answers = [post(server, CHAT, body) for _ in range(3)]
        streamed = post(server, CHAT, {**body, "stream": True})
        assert [a.headers[CACHE] for a in [*answers, streamed]] == ["bypass"] * 4
        assert len({a.json()["choices"][0]["message"]["content"] for a in answers}) == 1
        assert events(streamed)[-1] == "[DONE]"
        assert metric(server, "surge:response_cache_bypasses_total",
                      reason="shared_tier_down") == 4
        flush = httpx.post(server.url + "/v1/response-cache/flush",
                           headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=10.0)
        assert flush.status_code == 503 and "Redis" in flush.json()["error"]["message"]
    finally:
        server.stop()
    assert server.log().count("requests bypass the cache") == 1  # logged once


def test_local_cache_bounds_bytes_and_time(tiny_checkpoint: Callable[[str], Path],
                                           tmp_path: Path) -> None:
    ttl, max_bytes = 4.0, 2500
    server = start_server(tiny_checkpoint("tiny-llama"), tmp_path, "--served-model-name",
                          "tiny", "--api-key", KEYS[0], "--response-cache",
                          "--response-cache-ttl", str(ttl),
                          "--response-cache-bytes", str(max_bytes))
    try:
        # Time: kept, answered, then gone after the TTL.
        body = stopping(server, chat("remember me briefly"))
        assert post(server, CHAT, body).headers[CACHE] == "miss"
        kept_at = time.monotonic()
        assert post(server, CHAT, body).headers[CACHE] == "hit"
        time.sleep(max(0.0, ttl + 0.3 - (time.monotonic() - kept_at)))
        assert post(server, CHAT, body).headers[CACHE] == "miss"
        assert metric(server, "surge:response_cache_evictions_total", reason="expired") == 1
        # Bytes: many answers, the oldest leave, the total stays under the bound.
        bodies = [stopping(server, chat(f"question number {i}")) for i in range(8)]
        for each in bodies:
            assert post(server, CHAT, each).headers[CACHE] == "miss"
        stats = httpx.get(server.url + "/v1/response-cache",
                          headers={"Authorization": f"Bearer {KEYS[0]}"}, timeout=10.0).json()
        assert 0 < stats["bytes"] <= max_bytes and stats["entries"] < len(bodies)
        assert metric(server, "surge:response_cache_bytes") == stats["bytes"]
        assert metric(server, "surge:response_cache_evictions_total", reason="size") >= 1
        assert post(server, CHAT, bodies[-1]).headers[CACHE] == "hit"
        assert post(server, CHAT, bodies[0]).headers[CACHE] == "miss"
    finally:
        server.stop()

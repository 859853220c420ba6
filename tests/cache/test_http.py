"""The response cache in a real `surge serve` (tiny random-weight Llama and BERT) with the
real Redis of this machine: what is cached, for whom, how a hit is framed, and what is never
kept."""

from __future__ import annotations

import uuid

import httpx
import pytest

from surge.http.sse import iter_sse_lines
from tests.cache._http import (
    CACHE,
    auth,
    chat,
    events,
    metric,
    post,
    stopping,
    without_identity,
)
from tests.server._helpers import ServerProcess

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"


def _unique(text: str) -> str:
    return f"{text} {uuid.uuid4().hex[:8]}"


def test_only_reproducible_requests_are_cached(cached_server: ServerProcess) -> None:
    before = metric(cached_server, "surge:response_cache_bypasses_total",
                    reason="not_reproducible")
    sampled = chat(_unique("tell me"), temperature=1.0)
    assert [post(cached_server, CHAT, sampled).headers[CACHE] for _ in range(2)] == \
        ["bypass", "bypass"]
    assert metric(cached_server, "surge:response_cache_bypasses_total",
                  reason="not_reproducible") == before + 2
    for fields in ({"temperature": 0}, {"temperature": 1.0, "seed": 1234}):
        body = stopping(cached_server, chat(_unique("again"), **fields))
        miss, hit = post(cached_server, CHAT, body), post(cached_server, CHAT, body)
        assert (miss.headers[CACHE], hit.headers[CACHE]) == ("miss", "hit")
        assert miss.json()["choices"] == hit.json()["choices"]
        assert miss.json()["usage"] == hit.json()["usage"]
        assert hit.json()["id"] != miss.json()["id"]
        assert hit.json()["choices"][0]["finish_reason"] == "stop"


def test_one_tenant_never_gets_anothers_answer(cached_server: ServerProcess) -> None:
    body = stopping(cached_server, chat(_unique("private question")))
    assert post(cached_server, CHAT, body, key="key-a").headers[CACHE] == "miss"
    assert post(cached_server, CHAT, body, key="key-a").headers[CACHE] == "hit"
    assert post(cached_server, CHAT, body, key="key-b").headers[CACHE] == "miss"
    assert post(cached_server, CHAT, body, key="key-b").headers[CACHE] == "hit"
    # End users behind one key (the body's `user`) are tenants of their own too.
    first, second = {**body, "user": "alice"}, {**body, "user": "bob"}
    assert post(cached_server, CHAT, first).headers[CACHE] == "miss"
    assert post(cached_server, CHAT, second).headers[CACHE] == "miss"
    assert post(cached_server, CHAT, first).headers[CACHE] == "hit"


@pytest.mark.parametrize("include_usage", [True, False])
def test_a_streamed_hit_is_framed_as_the_streamed_miss(cached_server: ServerProcess,
                                                        include_usage: bool) -> None:
    body = {**stopping(cached_server, chat(_unique("stream it"))), "stream": True,
            "stream_options": {"include_usage": include_usage}}
    miss, hit = post(cached_server, CHAT, body), post(cached_server, CHAT, body)
    assert (miss.headers[CACHE], hit.headers[CACHE]) == ("miss", "hit")
    assert hit.headers["content-type"].startswith("text/event-stream")
    miss_events, hit_events = events(miss), events(hit)
    assert without_identity(hit_events) == without_identity(miss_events)
    assert hit_events[-1] == "[DONE]" and len(hit_events) >= 3
    assert len({e["id"] for e in hit_events[:-1]}) == 1  # one fresh id for the whole answer
    assert hit_events[0]["id"] != miss_events[0]["id"]
    assert ("usage" in hit_events[-2] and hit_events[-2]["choices"] == []) == include_usage


def test_completions_and_embeddings_are_cached(cached_server: ServerProcess) -> None:
    prompt = {"model": "tiny", "prompt": _unique("Once"), "temperature": 0, "max_tokens": 12}
    prompt = stopping(cached_server, prompt, "/v1/completions")
    miss = post(cached_server, "/v1/completions", prompt)
    hit = post(cached_server, "/v1/completions", prompt)
    assert (miss.headers[CACHE], hit.headers[CACHE]) == ("miss", "hit")
    assert hit.json()["choices"] == miss.json()["choices"]
    assert hit.json()["id"].startswith("cmpl-")
    embed = {"model": "bert", "input": [_unique("a sentence"), "another"]}
    miss = post(cached_server, "/v1/embeddings", embed)
    hit = post(cached_server, "/v1/embeddings", embed)
    assert (miss.headers[CACHE], hit.headers[CACHE]) == ("miss", "hit")
    assert hit.json() == miss.json()
    other = post(cached_server, "/v1/embeddings", {**embed, "encoding_format": "base64"})
    assert other.headers[CACHE] == "miss"
    assert post(cached_server, "/v1/embeddings", embed, key="key-b").headers[CACHE] == "miss"


def test_cache_control_is_honoured_and_unknown_values_ignored(
        cached_server: ServerProcess) -> None:
    body = stopping(cached_server, chat(_unique("control")))
    assert post(cached_server, CHAT, body, cache_control="no-store").headers[CACHE] == "miss"
    assert post(cached_server, CHAT, body).headers[CACHE] == "miss"  # no-store kept nothing
    assert post(cached_server, CHAT, body).headers[CACHE] == "hit"
    assert post(cached_server, CHAT, body, cache_control="no-cache").headers[CACHE] == "bypass"
    odd = post(cached_server, CHAT, body, cache_control="x-surge-whatever, max-age=oops")
    assert odd.headers[CACHE] == "hit"


def test_an_answer_cut_by_max_tokens_is_not_kept(cached_server: ServerProcess) -> None:
    body = chat(_unique("long"), max_tokens=3, ignore_eos=True)
    first, second = post(cached_server, CHAT, body), post(cached_server, CHAT, body)
    assert first.json()["choices"][0]["finish_reason"] == "length"
    assert (first.headers[CACHE], second.headers[CACHE]) == ("miss", "miss")


def test_an_aborted_stream_is_not_kept(cached_server: ServerProcess) -> None:
    # Sampled with a seed: varied text, so a stop string near its end first occurs there.
    # No early end-of-sequence (the prompt is new each run): the text is always long.
    body = chat(_unique("abort"), temperature=1.0, seed=99, max_tokens=300, ignore_eos=True)
    probe = post(cached_server, CHAT, body, cache_control="no-store").json()
    text = probe["choices"][0]["message"]["content"]
    stop = next((text[-k:] for k in range(3, 40) if text.find(text[-k:]) == len(text) - k),
                None)
    assert stop is not None and len(text) > 200, text
    stream = {**body, "stop": [stop], "stream": True}
    with httpx.stream("POST", cached_server.url + CHAT, json=stream, headers=auth(),
                      timeout=60.0) as response:
        assert response.headers[CACHE] == "miss"
        next(iter_sse_lines(response))  # the first event, then hang up
    # The server saw the hang-up and aborted; the same request is not answered from cache.
    again = post(cached_server, CHAT, stream)
    assert again.headers[CACHE] == "miss" and events(again)[-1] == "[DONE]"
    assert post(cached_server, CHAT, stream).headers[CACHE] == "hit"


def test_replicas_share_answers_through_redis(cached_server: ServerProcess,
                                              replica_server: ServerProcess) -> None:
    body = stopping(cached_server, chat(_unique("shared")))
    before = metric(replica_server, "surge:response_cache_hits_total", endpoint="chat",
                    tier="shared")
    first = post(cached_server, CHAT, body)
    second = post(replica_server, CHAT, body)
    assert (first.headers[CACHE], second.headers[CACHE]) == ("miss", "hit")
    assert second.json()["choices"] == first.json()["choices"]
    assert metric(replica_server, "surge:response_cache_hits_total", endpoint="chat",
                  tier="shared") == before + 1
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    on_replica = post(replica_server, CHAT, streamed)
    on_first = post(cached_server, CHAT, streamed)
    assert (on_replica.headers[CACHE], on_first.headers[CACHE]) == ("miss", "hit")
    assert without_identity(events(on_first)) == without_identity(events(on_replica))


def test_flush_needs_the_api_key_and_forgets_every_answer(
        cached_server: ServerProcess, replica_server: ServerProcess) -> None:
    body = stopping(cached_server, chat(_unique("flush me")))
    post(cached_server, CHAT, body)
    assert post(cached_server, CHAT, body).headers[CACHE] == "hit"
    refused = httpx.post(cached_server.url + "/v1/response-cache/flush", timeout=10.0)
    assert refused.status_code == 401
    flushed = httpx.post(cached_server.url + "/v1/response-cache/flush", headers=auth(),
                         timeout=10.0)
    assert flushed.status_code == 200, flushed.text
    assert flushed.json()["flushed"]["local"] >= 1 and flushed.json()["flushed"]["shared"] >= 1
    assert post(cached_server, CHAT, body).headers[CACHE] == "miss"
    stats = httpx.get(cached_server.url + "/v1/response-cache", headers=auth(), timeout=10.0)
    assert stats.json()["shared_up"] is True and stats.json()["entries"] >= 1

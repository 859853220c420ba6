"""The semantic tier with the real all-MiniLM-L6-v2 (served beside the tiny LLM, through its
batcher) and the real Redis: a paraphrase of an answered question gets that answer, within
one tenant and one scope only."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from surge.cache.exact import CacheSettings, ExactCache
from surge.cache.metrics import CacheMetrics
from surge.cache.semantic import (
    SemanticIndex,
    SemanticSettings,
    compared_text,
    roles_swapped,
    unit,
)
from surge.cache.shared import RedisTier
from surge.hub import resolve_model
from surge.models.pooling_models import TextEmbedder
from surge.server.response_cache import CacheQuery
from tests.cache._http import CACHE, chat, metric, post, stopping
from tests.cache.conftest import KEYS, REDIS_URL
from tests.cache.test_exact import _request
from tests.server._helpers import ServerProcess, start_server

CHAT = "/v1/chat/completions"
QUESTION = "How do I reverse a list in Python?"
PARAPHRASE = "How can I reverse a Python list?"
UNRELATED = "How do I reverse a string in Python?"  # close in words, not in meaning
TO_INTEGER = "How do I convert a string to an integer in Python?"
TO_STRING = "How do I convert an integer to a string in Python?"  # 0.996 to TO_INTEGER


@pytest.fixture(scope="module")
def semantic_server(tiny_checkpoint: Callable[[str], Path], shared_prefix: str,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(tiny_checkpoint("tiny-llama"), tmp_path_factory.mktemp("semantic"),
                        "--served-model-name", "tiny", "--api-key", KEYS[0], "--api-key",
                        KEYS[1], "--extra-model", "all-minilm-l6-v2", "--semantic-cache",
                        "--cache-url", REDIS_URL, "--cache-key-prefix", shared_prefix)
    yield proc
    proc.stop()


def _asking(body: dict, question: str, system: str | None = None) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    return {**body, "messages": [*messages, {"role": "user", "content": question}]}


@pytest.mark.slow
def test_a_paraphrase_gets_the_answer_of_its_tenant_and_scope_only(
        semantic_server: ServerProcess) -> None:
    asked = stopping(semantic_server, chat(QUESTION))
    first = post(semantic_server, CHAT, asked)
    assert first.headers[CACHE] == "miss"
    before = metric(semantic_server, "surge:response_cache_hits_total", endpoint="chat",
                    tier="semantic")
    paraphrased = post(semantic_server, CHAT, _asking(asked, PARAPHRASE))
    assert paraphrased.headers[CACHE] == "semantic-hit"
    assert paraphrased.json()["choices"] == first.json()["choices"]
    assert metric(semantic_server, "surge:response_cache_hits_total", endpoint="chat",
                  tier="semantic") == before + 1
    assert post(semantic_server, CHAT, _asking(asked, UNRELATED)).headers[CACHE] == "miss"
    assert post(semantic_server, CHAT, _asking(asked, PARAPHRASE),
                key=KEYS[1]).headers[CACHE] == "miss"
    assert post(semantic_server, CHAT, _asking(asked, PARAPHRASE, system="Answer in French."),
                ).headers[CACHE] == "miss"
    sampled = {**_asking(asked, PARAPHRASE), "temperature": 1.0}
    assert post(semantic_server, CHAT, sampled).headers[CACHE] == "bypass"
    # 0.996 similar, the opposite question: answered by the model, not from the cache.
    to_integer = stopping(semantic_server, _asking(chat(QUESTION), TO_INTEGER))
    assert post(semantic_server, CHAT, to_integer).headers[CACHE] == "miss"
    assert post(semantic_server, CHAT, to_integer).headers[CACHE] == "hit"  # it was kept
    assert post(semantic_server, CHAT, _asking(to_integer, TO_STRING)).headers[CACHE] == "miss"


@pytest.fixture(scope="module")
def minilm() -> TextEmbedder:
    return TextEmbedder(resolve_model("all-minilm-l6-v2"))


def test_replicas_share_the_semantic_index_through_redis(minilm: TextEmbedder,
                                                         redis_prefix: str) -> None:
    async def embed(text: str) -> np.ndarray:
        [vector] = minilm.embed_batch(minilm.tokenize([text]))
        return unit(vector)

    async def main() -> None:
        settings = SemanticSettings()
        tiers = [RedisTier(REDIS_URL, timeout=0.5) for _ in range(2)]
        writer, reader = (SemanticIndex(settings, embed, 60.0, tier, redis_prefix)
                          for tier in tiers)
        await writer.add("scope", await embed(QUESTION), "answer-key")
        found = await reader.nearest("scope", await embed(PARAPHRASE))
        assert found is not None and found[0] == "answer-key" and found[1] >= 0.9
        assert await reader.nearest("scope", await embed(UNRELATED)) is None
        assert await reader.nearest("another scope", await embed(PARAPHRASE)) is None
        # The compared text travels with the vector, so every replica refuses swapped roles.
        await writer.add("scope", await embed(TO_INTEGER), "to-integer", TO_INTEGER)
        swapped = await embed(TO_STRING)
        assert float(swapped @ await embed(TO_INTEGER)) > 0.99
        assert await reader.nearest("scope", swapped, TO_STRING) is None
        for tier in tiers:
            await tier.close()

    asyncio.run(main())


def test_the_threshold_must_be_a_cosine_similarity() -> None:
    with pytest.raises(ValueError, match=r"--semantic-threshold=1.5 is invalid: allowed is a "
                                         r"cosine similarity in \(0, 1\]"):
        SemanticSettings(threshold=1.5)


def _messages(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


def test_what_is_compared_by_meaning_and_what_exactly() -> None:
    talk = _messages(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"),
                     ("user", [{"type": "text", "text": "What is recursion?"}]))
    assert compared_text(talk) == ("What is recursion?", talk[:-1])
    assert compared_text(talk, "conversation") == (
        "user: Hi\nassistant: Hello!\nuser: What is recursion?", talk[:1])
    assert compared_text(talk[:-1]) is None  # ends with the assistant: nothing to answer
    assert compared_text(_messages(("user", "  "))) is None
    with pytest.raises(ValueError, match="--semantic-compare='all' is invalid: allowed is one "
                                         "of last, conversation"):
        SemanticSettings(compare="all")


def test_the_exact_cache_answers_a_paraphrase_only_in_the_same_scope(
        minilm: TextEmbedder) -> None:
    async def embed(text: str) -> np.ndarray:
        [vector] = minilm.embed_batch(minilm.tokenize([text]))
        return unit(vector)

    def query(messages: list[dict]) -> CacheQuery:
        # As the server sends it: the rendered prompt's ids (here: one per character).
        ids = [ord(c) for m in messages for c in m["content"]]
        return CacheQuery("chat", "tiny", None, "float32 cpu",
                          {"prompt_token_ids": [ids], "temperature": 0}, True, None, messages)

    async def main() -> None:
        cache = ExactCache(CacheSettings(), CacheMetrics(CollectorRegistry()),
                           semantic=SemanticIndex(SemanticSettings(), embed, 60.0))
        asked = _messages(("user", QUESTION))
        lookup = await cache.lookup(_request(), query(asked))
        await lookup.store_body({"choices": [{"finish_reason": "stop", "text": "answer"}]})
        # Its token ids differ, so only the semantic tier can answer it.
        hit = await cache.lookup(_request(), query(_messages(("user", PARAPHRASE))))
        assert hit.status == "semantic-hit" and hit.answer is not None
        earlier = _messages(("user", "Hi"), ("assistant", "Hello"), ("user", PARAPHRASE))
        assert (await cache.lookup(_request(), query(earlier))).status == "miss"
        assert (await cache.lookup(_request("key-b"), query(_messages(("user", PARAPHRASE))))
                ).status == "miss"

    asyncio.run(main())


@pytest.mark.parametrize(("first", "second"), [
    (TO_INTEGER, TO_STRING),
    ("Is Python faster than Java?", "Is Java faster than Python?"),
    ("How do I copy a file from my laptop to a server?",
     "How do I copy a file from a server to my laptop?"),
    ("Convert Celsius to Fahrenheit", "convert fahrenheit to celsius"),
])
def test_the_same_things_in_opposite_roles_are_different_questions(first: str,
                                                                   second: str) -> None:
    assert roles_swapped(first, second) and roles_swapped(second, first)


@pytest.mark.parametrize(("first", "second"), [
    (TO_INTEGER, "How can I turn a string into an int in Python?"),
    (QUESTION, "In Python, how do I reverse a list?"),
    ("How do I migrate from MySQL to PostgreSQL?",
     "How do I move my data to PostgreSQL from MySQL?"),
    ("What is the difference between TCP and UDP?",
     "What is the difference between UDP and TCP?"),
    ("How do I copy a file from one directory to another in Linux?",
     "In Linux, how do I copy a file to another directory?"),
    ("How do I push to a remote branch?", "How do I pull from a remote branch?"),
])
def test_moving_a_phrase_or_a_symmetric_pair_keeps_the_question(first: str,
                                                                 second: str) -> None:
    assert not roles_swapped(first, second)


def test_a_long_text_is_compared_in_bounded_work() -> None:
    text = " ".join(f"from word{i} to word{i + 1}" for i in range(2000))
    assert not roles_swapped(text, text)


def test_the_nearest_entry_with_swapped_roles_gives_way_to_the_next() -> None:
    async def no_embedding(text: str) -> None:
        return None

    async def main() -> None:
        index = SemanticIndex(SemanticSettings(threshold=0.9), no_embedding, 60.0)
        query = unit(np.array([1.0, 0.0, 0.0]))
        await index.add("scope", unit(np.array([1.0, 0.01, 0.0])), "swapped", TO_STRING)
        await index.add("scope", unit(np.array([1.0, 0.3, 0.0])), "same", TO_INTEGER)
        found = await index.nearest("scope", query, TO_INTEGER)
        assert found is not None and found[0] == "same" and 0.9 <= found[1] < 0.99
        await index.add("scope", unit(np.array([1.0, 0.0, 0.0])), "unknown text")  # old entry
        assert (await index.nearest("scope", query, TO_INTEGER))[0] == "unknown text"

    asyncio.run(main())

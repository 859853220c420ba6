"""The semantic tier with the real all-MiniLM-L6-v2 (served beside the tiny LLM, through its
batcher) and the real Redis: a paraphrase of an answered question gets that answer, within
one tenant and one scope only."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from surge.cache.semantic import SemanticIndex, SemanticSettings, unit
from surge.cache.shared import RedisTier
from surge.hub import resolve_model
from surge.models.pooling_models import TextEmbedder
from tests.cache._http import CACHE, chat, metric, post, stopping
from tests.cache.conftest import KEYS, REDIS_URL
from tests.server._helpers import ServerProcess, start_server

CHAT = "/v1/chat/completions"
QUESTION = "How do I reverse a list in Python?"
PARAPHRASE = "How can I reverse a Python list?"
UNRELATED = "How do I reverse a string in Python?"  # close in words, not in meaning


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
        for tier in tiers:
            await tier.close()

    asyncio.run(main())


def test_the_threshold_must_be_a_cosine_similarity() -> None:
    with pytest.raises(ValueError, match=r"--semantic-threshold=1.5 is invalid: allowed is a "
                                         r"cosine similarity in \(0, 1\]"):
        SemanticSettings(threshold=1.5)

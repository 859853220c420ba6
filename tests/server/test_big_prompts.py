"""A prompt far longer than the context (but under the 8 MiB body limit) is refused before it is
tokenized whole: it used to hold the event loop for 7 s (/health too), 16.5 s for four at once,
and leave the API process 1.2 GB larger for good."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import psutil
import pytest

from surge.http.errors import APIError
from surge.server.tokenize import PIECE_CHARS, Tokenization, text_pieces
from surge.tokenizer import ChatTokenizer, load_tokenizer
from tests.server._helpers import start_server

BIG = 6_900_000  # characters: 6.9 MB of ASCII, under --max-body-bytes (8 MiB)


class RecordingTokenizer(ChatTokenizer):
    """The real tokenizer, remembering how long each text it encoded was."""

    def __init__(self, real: ChatTokenizer) -> None:
        super().__init__(real.tokenizer, real.config, set(real.eos_token_ids))
        self.lengths: list[int] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.lengths.append(len(text))
        return super().encode(text, add_special_tokens)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> ChatTokenizer:
    return load_tokenizer(model_dir)


def test_pieces_cut_at_whitespace_and_cover_the_text() -> None:
    text = "word " * 10_000 + "x" * 50_000
    pieces = list(text_pieces(text, 1000))
    assert "".join(pieces) == text and all(len(p) <= 1000 for p in pieces)
    assert all(p.endswith("word") for p in pieces[:40])  # the next piece starts at a space


def test_a_text_beyond_the_character_bound_is_never_tokenized(tokenizer: ChatTokenizer) -> None:
    recording = RecordingTokenizer(tokenizer)
    tokens = Tokenization(recording)
    bound = 2048 * tokens.max_token_chars
    with pytest.raises(APIError) as refused:
        asyncio.run(tokens.encode("a" * (bound + 1), max_tokens=2048))
    assert refused.value.code == "context_length_exceeded" and str(bound) in refused.value.message
    assert recording.lengths == []


def test_a_text_over_the_context_is_counted_in_pieces_and_refused_early(
        tokenizer: ChatTokenizer) -> None:
    recording = RecordingTokenizer(tokenizer)
    tokens = Tokenization(recording)
    limit = 8192
    text = "hello world " * (limit * tokens.max_token_chars // 13)  # under the bound, far over
    assert len(text) > 4 * PIECE_CHARS  # long enough to be counted in pieces
    with pytest.raises(APIError) as refused:
        asyncio.run(tokens.encode(text, max_tokens=limit))
    assert refused.value.code == "context_length_exceeded"
    assert max(recording.lengths) <= PIECE_CHARS  # never the whole text
    assert sum(recording.lengths) < len(text) / 2  # it stopped once past the context


def test_a_long_text_that_fits_gets_the_same_ids_as_whole(tokenizer: ChatTokenizer) -> None:
    text = "the quick brown fox jumps over the lazy dog\n" * 2000  # 88,000 characters
    ids = asyncio.run(Tokenization(tokenizer).encode(text, max_tokens=1_000_000))
    assert ids == tokenizer.encode(text)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_big_prompts_are_refused_at_once_and_the_server_keeps_its_memory(
        model_dir: Path, tmp_path: Path) -> None:
    server = start_server(model_dir, tmp_path)  # the default 8 MiB body limit
    try:
        api = psutil.Process(server.process.pid)
        prompt = "word " * (BIG // 5)
        requests = [("/v1/completions", {"prompt": prompt, "max_tokens": 1}),
                    ("/v1/chat/completions",
                     {"messages": [{"role": "user", "content": prompt}], "max_tokens": 1}),
                    ("/tokenize", {"prompt": prompt}),
                    ("/v1/completions", {"prompt": [prompt[: BIG // 2]], "max_tokens": 1})]
        # Encoded once here: the probe below measures the server, not this client's JSON.
        bodies = [(path, json.dumps(body).encode()) for path, body in requests]
        headers = {"content-type": "application/json"}
        # Warm up the paths once (first-use allocations are not growth).
        for path, body in bodies:
            httpx.post(f"{server.url}{path}", content=body, headers=headers, timeout=60)
        before = api.memory_info().rss

        async def flood() -> tuple[list[httpx.Response], list[float]]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
                health: list[float] = []
                calls = [asyncio.ensure_future(http.post(path, content=body, headers=headers))
                         for path, body in bodies]
                while not all(call.done() for call in calls):
                    started = time.monotonic()
                    assert (await http.get("/health")).status_code == 200
                    health.append(time.monotonic() - started)
                    await asyncio.sleep(0.02)  # pacing the health probe
                return [call.result() for call in calls], health

        started = time.monotonic()
        answers, health = asyncio.run(flood())
        elapsed = time.monotonic() - started
        after = api.memory_info().rss
        print(f"API RSS before {before / 2**20:.0f} MiB, after {after / 2**20:.0f} MiB; "
              f"4 refusals in {elapsed:.2f} s; /health worst {max(health or [0]):.3f} s")
        for answer in answers:
            assert answer.status_code == 400, answer.text[:300]
            assert answer.json()["error"]["code"] == "context_length_exceeded"
        assert elapsed < 10, "four 6.9 MB prompts took too long to refuse"
        # Reading and parsing the bodies takes the event loop ~0.1 s each; tokenizing them
        # took it for seconds.
        assert max(health or [0]) < 1.5, "/health waited on the big prompts"
        assert after - before < 150 * 2**20, (before, after)
    finally:
        server.stop()

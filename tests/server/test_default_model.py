"""A new user's first `surge serve`: no --model, the real SmolLM2-135M-Instruct answers sensibly.

The model is pulled once per machine (the session fixture ``smollm2_gguf`` warms the user cache,
exactly where `surge serve` looks for it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from surge.hub import DEFAULT_LLM
from tests.server._helpers import ServerProcess, start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_server(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory
                   ) -> Iterator[ServerProcess]:
    server = start_server(None, tmp_path_factory.mktemp("default_model"), "--dtype", "bfloat16",
                          "--no-apps")
    try:
        server.wait_healthy(timeout=240)
        yield server
    finally:
        server.stop()


@pytest.mark.timeout(400)
def test_serves_the_catalogue_chat_model_by_default(default_server: ServerProcess) -> None:
    models = httpx.get(f"{default_server.url}/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == [DEFAULT_LLM]
    assert "RANDOM" not in default_server.log()


@pytest.mark.timeout(300)
def test_greedy_answer_names_paris(default_server: ServerProcess) -> None:
    answer = httpx.post(f"{default_server.url}/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 32, "temperature": 0}).json()
    assert "Paris" in answer["choices"][0]["message"]["content"]


@pytest.mark.timeout(300)
def test_openai_client_streams_sensible_text(default_server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{default_server.url}/v1", api_key="unused",
                           max_retries=0, timeout=120)
    stream = client.chat.completions.create(
        model=DEFAULT_LLM, stream=True, temperature=0, max_tokens=48,
        messages=[{"role": "user", "content": "Name three primary colors."}])
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    text = "".join(pieces).lower()
    assert len([p for p in pieces if p]) > 3  # streamed, not one block
    assert sum(color in text for color in ("red", "blue", "yellow", "green")) >= 2, text

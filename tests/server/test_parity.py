"""32 concurrent greedy requests through HTTP give exactly what the offline engine gives."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from surge import LLM, SamplingParams
from tests.server._helpers import ServerProcess

NUM_REQUESTS = 32
MAX_TOKENS = 16


def _prompts() -> list[str]:
    words = ["server", "request", "token", "batch", "queue", "cache", "memory", "engine"]
    return [f"{words[i % 8]} {words[(i * 3) % 8]} number {i} says" for i in range(NUM_REQUESTS)]


@pytest.mark.timeout(180)
def test_concurrent_greedy_requests_equal_offline_outputs(server: ServerProcess,
                                                          model_dir: Path) -> None:
    prompts = _prompts()

    async def one(http: httpx.AsyncClient, prompt: str) -> dict:
        response = await http.post("/v1/completions", json={
            "model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
        assert response.status_code == 200, response.text
        return response.json()

    async def burst() -> list[dict]:
        limits = httpx.Limits(max_connections=NUM_REQUESTS)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as http:
            return await asyncio.gather(*(one(http, p) for p in prompts))

    served = asyncio.run(burst())
    offline = LLM(model_dir, dtype="float32").generate(
        prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0), use_tqdm=False)
    for got, want in zip(served, offline, strict=True):
        completion = want.outputs[0]
        assert got["choices"][0]["text"] == completion.text
        assert got["choices"][0]["finish_reason"] == completion.finish_reason
        assert got["usage"]["completion_tokens"] == len(completion.token_ids)
        assert got["usage"]["prompt_tokens"] == len(want.prompt_token_ids)

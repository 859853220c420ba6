"""The in-process EngineClient: async streaming, refusal, abort on early exit, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from surge import LLM, SamplingParams
from surge.config import EngineConfig
from surge.engine.client import EngineDeadError, InprocEngineClient
from surge.engine.protocol import AddRequest

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8], [100, 200, 300], list(range(40, 90))]


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint: Callable[[str], Path]) -> Path:
    return tiny_checkpoint("tiny-llama")


@contextlib.asynccontextmanager
async def running(model_dir: Path) -> AsyncIterator[InprocEngineClient]:
    """A started client, shut down on leaving."""
    client = InprocEngineClient(EngineConfig(dtype="float32"), str(model_dir))
    await client.start()
    try:
        yield client
    finally:
        await client.shutdown()


async def _collect(client: InprocEngineClient, request_id: str, prompt: list[int],
                   params: SamplingParams = GREEDY) -> list[int]:
    tokens: list[int] = []
    async for update in client.generate(AddRequest(request_id, prompt, params)):
        tokens.extend(update.new_token_ids)
    return tokens


def test_concurrent_streams_equal_offline_outputs(model_dir: Path) -> None:
    offline = LLM(model_dir, dtype="float32").generate(PROMPTS, GREEDY, use_tqdm=False)

    async def main() -> list[list[int]]:
        async with running(model_dir) as client:
            return await asyncio.gather(*(_collect(client, str(i), p)
                                          for i, p in enumerate(PROMPTS)))

    assert asyncio.run(main()) == [o.outputs[0].token_ids for o in offline]


def test_refused_request_raises_and_others_continue(model_dir: Path) -> None:
    async def main() -> tuple[str, list[int]]:
        async with running(model_dir) as client:
            good = asyncio.create_task(_collect(client, "good", PROMPTS[0]))
            with pytest.raises(ValueError, match="unknown") as refused:
                await _collect(client, "bad", [10**9])
            return str(refused.value), await good

    message, tokens = asyncio.run(main())
    assert "allowed is [0," in message
    assert len(tokens) == GREEDY.max_tokens


def test_leaving_a_stream_early_aborts_the_request(model_dir: Path) -> None:
    async def main() -> tuple[int, int]:
        async with running(model_dir) as client:
            long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
            stream = client.generate(AddRequest("r", PROMPTS[2], long))
            async for _ in stream:
                break
            await stream.aclose()
            for _ in range(200):  # the engine applies the abort within a step
                stats = client.stats()
                if stats.num_running == 0 and stats.kv_cache_usage == 0.0:
                    break
                await asyncio.sleep(0.01)
            return stats.num_running, stats.kv_cache_usage

    assert asyncio.run(main()) == (0, 0.0)


def test_a_duplicate_request_id_is_refused_and_the_first_continues(model_dir: Path) -> None:
    async def main() -> tuple[str, list[int]]:
        async with running(model_dir) as client:
            first = asyncio.create_task(_collect(client, "same", PROMPTS[0]))
            await asyncio.sleep(0)  # the first request's stream is registered
            with pytest.raises(ValueError, match="already in flight") as refused:
                await _collect(client, "same", PROMPTS[1])
            return str(refused.value), await first

    message, tokens = asyncio.run(main())
    assert "request_id='same'" in message and "allowed is an id unique" in message
    assert len(tokens) == GREEDY.max_tokens


def test_shutdown_ends_in_flight_streams(model_dir: Path) -> None:
    async def main() -> None:
        client = InprocEngineClient(EngineConfig(dtype="float32"), str(model_dir))
        await client.start()
        long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        stream = client.generate(AddRequest("r", PROMPTS[2], long))
        await anext(stream)
        await client.shutdown()
        with pytest.raises(EngineDeadError, match="shut down"):
            async for _ in stream:
                pass

    asyncio.run(asyncio.wait_for(main(), 60))

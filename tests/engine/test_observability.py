"""What the engine reports for observability: per-request timings on the finishing output,
the per-step phase histograms in its stats, and a torch.profiler capture of its next steps
(here on the in-process transport; tests/server/test_observability.py covers the process)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from surge import SamplingParams
from surge.config import EngineConfig
from surge.engine.client import InprocEngineClient
from surge.engine.protocol import AddRequest, EngineCoreOutput
from surge.engine.step_stats import PHASES, STEP_BUCKETS

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint: Callable[[str], Path]) -> Path:
    return tiny_checkpoint("tiny-llama")


@contextlib.asynccontextmanager
async def running(model_dir: Path) -> AsyncIterator[InprocEngineClient]:
    client = InprocEngineClient(EngineConfig(dtype="float32"), str(model_dir))
    await client.start()
    try:
        yield client
    finally:
        await client.shutdown()


async def _outputs(client: InprocEngineClient, request_id: str,
                   params: SamplingParams = GREEDY) -> list[EngineCoreOutput]:
    return [update async for update in client.generate(
        AddRequest(request_id, [5, 6, 7, 8], params))]


def test_the_finishing_output_carries_ordered_timings_and_steps_are_histogrammed(
        model_dir: Path) -> None:
    async def main() -> tuple[list[EngineCoreOutput], object]:
        async with running(model_dir) as client:
            outputs = await _outputs(client, "timed")
            await asyncio.sleep(0.3)  # the engine thread refreshes its stats after the step
            return outputs, client.stats()

    outputs, stats = asyncio.run(main())
    *running_outputs, last = outputs
    assert all(o.timings is None for o in running_outputs)
    timings = last.timings
    assert timings is not None and last.finish_reason is not None
    assert timings.queued <= timings.scheduled <= timings.first_token <= timings.finished
    assert timings.scheduled == last.first_scheduled_time
    breakdown = stats.step_breakdown
    assert breakdown is not None and breakdown.bounds == list(STEP_BUCKETS)
    assert set(breakdown.counts) == set(PHASES)
    for phase in PHASES:  # one observation per step and phase: 1 prefill + 5 decodes
        assert sum(breakdown.counts[phase]) == stats.num_steps == 6
    assert breakdown.sums["forward"] > 0


def test_profile_records_the_next_steps_one_at_a_time(model_dir: Path) -> None:
    async def main() -> tuple[object, str]:
        async with running(model_dir) as client:
            params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
            generating = asyncio.create_task(_outputs(client, "busy", params))
            profiling = asyncio.create_task(client.profile(3, 30.0))
            await asyncio.sleep(0)
            with pytest.raises(ValueError, match="one at a time") as refused:
                await client.profile(1, 1.0)
            result = await profiling
            await generating
            return result, str(refused.value)

    result, _ = asyncio.run(main())
    assert result.error is None and result.num_steps == 3
    names = {event.get("name") for event in json.loads(result.trace)["traceEvents"]}
    assert {"surge.step#1", "surge.step#2", "surge.step#3"} <= names
    assert "surge.step#4" not in names

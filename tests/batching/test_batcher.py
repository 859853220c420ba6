"""The dynamic batcher: batches form by size and by a window timed from the first item, the
queue is bounded, deadlines and cancellation drop items, and the model never runs on the loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest

from surge.batching import (
    BatcherClosed,
    BatcherConfig,
    BatcherFull,
    BatchObserver,
    BatchTimeout,
    DynamicBatcher,
)

# Every test is a few event-loop turns and short windows; nothing should take long.
pytestmark = [pytest.mark.timeout(30), pytest.mark.anyio]


class Recorder(BatchObserver):
    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.rejected: list[str] = []

    def on_batch(self, size: int, queue_times: Sequence[float], compute_time: float) -> None:
        self.sizes.append(size)

    def on_rejected(self, reason: str) -> None:
        self.rejected.append(reason)


class Model:
    """Doubles numbers; optionally blocks until released, to hold a batch 'running'."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.gate = gate
        self.batches: list[list[int]] = []
        self.threads: set[int] = set()

    def __call__(self, values: list[int]) -> list[int]:
        self.threads.add(threading.get_ident())
        self.batches.append(list(values))
        if self.gate is not None:
            assert self.gate.wait(10), "test never released the model"
        return [2 * v for v in values]


def make(model: Model, recorder: Recorder | None = None, **config: object
         ) -> DynamicBatcher[int, int]:
    batcher = DynamicBatcher("m", model, BatcherConfig(**config), recorder)  # type: ignore[arg-type]
    batcher.start()
    return batcher


async def test_concurrent_items_share_one_call_and_results_keep_their_order() -> None:
    model, recorder = Model(), Recorder()
    batcher = make(model, recorder, max_batch_size=8, max_wait_ms=200)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(8)))
    assert results == [2 * i for i in range(8)]
    assert model.batches == [list(range(8))]  # full before the window ended: one call
    assert recorder.sizes == [8]
    assert threading.get_ident() not in model.threads  # never on the event loop
    await batcher.close()


async def test_batches_never_exceed_max_batch_size() -> None:
    model = Model()
    batcher = make(model, max_batch_size=4, max_wait_ms=50)
    assert await batcher.submit_many(list(range(10))) == [2 * i for i in range(10)]
    assert [len(b) for b in model.batches] == [4, 4, 2]
    await batcher.close()


async def test_a_lone_item_waits_about_max_wait_ms_and_not_more() -> None:
    batcher = make(Model(), max_batch_size=32, max_wait_ms=100)
    started = time.monotonic()
    assert await batcher.submit(3) == 6
    waited = time.monotonic() - started
    # Lower bound: the window was honoured; upper: a generous margin for a busy machine.
    assert 0.09 <= waited < 0.6, waited
    await batcher.close()


async def test_the_window_is_timed_from_the_first_item_not_the_last() -> None:
    model = Model()
    batcher = make(model, max_batch_size=32, max_wait_ms=150)
    started = time.monotonic()
    first = asyncio.ensure_future(batcher.submit(1))
    # Keep adding items for longer than the window: they must not extend it.
    late: list[asyncio.Future[int]] = []
    while time.monotonic() - started < 0.3:
        late.append(asyncio.ensure_future(batcher.submit(0)))
        await asyncio.sleep(0.02)  # spacing the arrivals, not synchronising
    assert await first == 2
    assert time.monotonic() - started < 0.3 + 0.3
    await asyncio.gather(*late)
    assert len(model.batches) >= 2  # the late arrivals went out in later batches
    await batcher.close()


async def test_zero_wait_sends_at_once() -> None:
    batcher = make(Model(), max_batch_size=32, max_wait_ms=0)
    started = time.monotonic()
    assert await batcher.submit(1) == 2
    assert time.monotonic() - started < 0.2
    await batcher.close()


async def test_preferred_size_leaves_before_the_window() -> None:
    model = Model()
    batcher = make(model, max_batch_size=32, max_wait_ms=5000, preferred_batch_sizes=(4,))
    started = time.monotonic()
    assert await asyncio.gather(*(batcher.submit(i) for i in range(4))) == [0, 2, 4, 6]
    assert time.monotonic() - started < 2.0  # far less than the 5 s window
    assert model.batches == [[0, 1, 2, 3]]
    await batcher.close()


async def test_while_the_model_is_busy_waiting_items_form_the_next_full_batch() -> None:
    gate = threading.Event()
    model = Model(gate)
    batcher = make(model, max_batch_size=8, max_wait_ms=1)
    first = asyncio.ensure_future(batcher.submit(100))
    while not model.batches:  # the first batch is running on the worker
        await asyncio.sleep(0.005)
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(8)]
    await asyncio.sleep(0.05)  # let the window of the waiting items expire while busy
    gate.set()
    await asyncio.gather(first, *rest)
    assert model.batches == [[100], list(range(8))]
    await batcher.close()


async def test_full_queue_refuses_at_once_with_retry_after() -> None:
    gate = threading.Event()
    model, recorder = Model(gate), Recorder()
    batcher = make(model, recorder, max_batch_size=1, max_wait_ms=0, max_queue_size=2)
    running = asyncio.ensure_future(batcher.submit(0))
    while not model.batches:
        await asyncio.sleep(0.005)
    queued = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
    await asyncio.sleep(0)
    with pytest.raises(BatcherFull) as info:
        await batcher.submit(3)
    assert 1 <= info.value.retry_after <= 60
    assert "limit 2" in info.value.message
    assert recorder.rejected == ["queue_full"]
    gate.set()
    assert await asyncio.gather(running, *queued) == [0, 2, 4]
    await batcher.close()


async def test_an_empty_queue_takes_a_request_larger_than_the_limit() -> None:
    batcher = make(Model(), max_batch_size=4, max_wait_ms=0, max_queue_size=2)
    assert await batcher.submit_many([1, 2, 3, 4, 5]) == [2, 4, 6, 8, 10]
    await batcher.close()


async def test_cancelled_items_are_dropped_before_they_run() -> None:
    gate = threading.Event()
    model, recorder = Model(gate), Recorder()
    batcher = make(model, recorder, max_batch_size=8, max_wait_ms=0)
    running = asyncio.ensure_future(batcher.submit(1))
    while not model.batches:
        await asyncio.sleep(0.005)
    leaving = asyncio.ensure_future(batcher.submit_many([7, 7, 7]))
    staying = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0)
    assert batcher.queue_depth == 4
    leaving.cancel()  # the client hung up
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert batcher.queue_depth == 1
    gate.set()
    assert await asyncio.gather(running, staying) == [2, 4]
    assert model.batches == [[1], [2]]  # the 7s never reached the model
    assert recorder.rejected == ["cancelled"]
    await batcher.close()


async def test_deadline_raises_timeout_and_drops_the_items() -> None:
    gate = threading.Event()
    model = Model(gate)
    batcher = make(model, max_batch_size=8, max_wait_ms=0)
    running = asyncio.ensure_future(batcher.submit(1))
    while not model.batches:
        await asyncio.sleep(0.005)
    loop = asyncio.get_running_loop()
    with pytest.raises(BatchTimeout):
        await batcher.submit(5, deadline=loop.time() + 0.05)
    assert batcher.queue_depth == 0
    gate.set()
    assert await running == 2
    assert model.batches == [[1]]
    await batcher.close()


async def test_a_failing_model_fails_only_its_batch() -> None:
    calls = 0

    def flaky(values: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return values

    batcher = DynamicBatcher("m", flaky, BatcherConfig(max_wait_ms=0))
    batcher.start()
    with pytest.raises(RuntimeError, match="boom"):
        await batcher.submit(1)
    assert await batcher.submit(2) == 2
    await batcher.close()


async def test_close_fails_waiting_items_and_refuses_new_ones() -> None:
    gate = threading.Event()
    model = Model(gate)
    batcher = make(model, max_batch_size=1, max_wait_ms=0)
    running = asyncio.ensure_future(batcher.submit(1))
    while not model.batches:
        await asyncio.sleep(0.005)
    waiting = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0)
    await batcher.close()
    gate.set()
    for future in (running, waiting):
        with pytest.raises(BatcherClosed):
            await future
    with pytest.raises(BatcherClosed):
        await batcher.submit(3)


@pytest.mark.parametrize(("field", "value"), [
    ("max_batch_size", 0), ("max_wait_ms", -1), ("max_queue_size", 0),
    ("preferred_batch_sizes", (64,)),
])
def test_bad_config_names_the_field_and_what_is_allowed(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{field}=.*allowed is"):
        BatcherConfig(**{field: value})  # type: ignore[arg-type]


async def test_the_window_restarts_when_the_first_item_leaves() -> None:
    batcher = make(Model(), max_batch_size=32, max_wait_ms=300)
    leaving = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0.2)  # most of its window passes
    leaving.cancel()
    started = time.monotonic()
    assert await batcher.submit(2) == 4
    # The new item gets a whole window of its own, not the rest of the cancelled one's.
    assert time.monotonic() - started >= 0.28
    await batcher.close()

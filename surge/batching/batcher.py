"""A dynamic batcher: many concurrent one-shot requests become few model calls.

Embedding and classification models do one forward pass per input, and a forward pass over 32
inputs costs far less than 32 passes over one. The batcher collects items from concurrent
requests and hands them to the model in batches, bounded two ways so that no single request
waits long:

- ``max_batch_size``: a batch never holds more items;
- ``max_wait_ms``: timed from the arrival of the FIRST item of a batch. A lone request waits
  at most this long for company; under load the window has long expired by the time the model
  is free, so batches go out full and at once.

``preferred_batch_sizes`` (optional) let a batch leave before its window closes as soon as it
reaches one of those sizes and nothing else is waiting to join (as Triton's dynamic batcher
does), e.g. sizes a compiled or CUDA-graph model runs best at.

Overload is answered, not queued forever: the number of items waiting is bounded
(``max_queue_size``) and a submission that does not fit raises ``BatcherFull`` with a
Retry-After estimate from the measured throughput. Every submission can carry a deadline
(``BatchTimeout``), and cancelling the awaiting task (the client hung up) drops its items from
the queue if they have not started running.

The model runs on ONE dedicated worker thread per model, not on the event loop and not in a
worker process. A thread is enough because PyTorch releases the GIL inside its kernels, so the
event loop keeps serving HTTP while a batch computes; a process would add a copy of every input
and output across a pipe, a second copy of the weights' page cache, and a start-up cost, for
isolation the engine process already gives text generation (where a step loop holds the GIL far
more). One thread per model also means one batch at a time per model, which is what the
"window from the first item" rule assumes: the next batch forms while this one computes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from surge.config import require

__all__ = [
    "BatchObserver",
    "BatchTimeout",
    "BatcherClosed",
    "BatcherConfig",
    "BatcherFull",
    "DynamicBatcher",
]

In = TypeVar("In")
Out = TypeVar("Out")

# Retry-After bounds in seconds, as the generation admission control uses them.
MIN_RETRY_AFTER = 1
MAX_RETRY_AFTER = 60
# Weight of the newest batch in the throughput average: follows a change of load within about
# ten batches.
EWMA_ALPHA = 0.2


class BatcherFull(Exception):
    """The waiting queue cannot take these items; answer 429 with ``Retry-After``."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class BatchTimeout(Exception):
    """The items did not finish before their deadline; answer 504."""


class BatcherClosed(Exception):
    """The batcher is stopping (server shutdown): no new items, pending ones are failed."""


@dataclass(frozen=True)
class BatcherConfig:
    """How batches are formed; every field is validated with a message saying what is allowed."""

    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024

    def __post_init__(self) -> None:
        require(_is_int(self.max_batch_size) and self.max_batch_size >= 1,
                 "max_batch_size", self.max_batch_size, "an integer >= 1")
        require(self.max_wait_ms >= 0 and math.isfinite(self.max_wait_ms), "max_wait_ms",
                 self.max_wait_ms, "a number of milliseconds >= 0")
        require(all(_is_int(s) and 1 <= s <= self.max_batch_size
                     for s in self.preferred_batch_sizes), "preferred_batch_sizes",
                 self.preferred_batch_sizes, f"integers in [1, {self.max_batch_size}] "
                 "(--max-batch-size)")
        require(_is_int(self.max_queue_size) and self.max_queue_size >= 1, "max_queue_size",
                 self.max_queue_size, "an integer >= 1")


class BatchObserver:
    """Hooks for metrics; the default observes nothing."""

    def on_batch(self, size: int, queue_times: Sequence[float], compute_time: float) -> None:
        """A batch of ``size`` items ran; each waited ``queue_times`` seconds before it."""

    def on_queue_depth(self, depth: int) -> None:
        """The number of items waiting changed."""

    def on_rejected(self, reason: str) -> None:
        """Items were refused: "queue_full", "timeout" or "cancelled"."""


@dataclass(eq=False)
class _Item(Generic[In, Out]):
    value: In
    arrival: float
    future: asyncio.Future[Out]
    running: bool = False


@dataclass
class _Throughput:
    """Items per second the model has been clearing, for Retry-After."""

    items_per_second: float | None = None

    def observe(self, size: int, seconds: float) -> None:
        rate = size / max(seconds, 1e-6)
        previous = self.items_per_second
        self.items_per_second = rate if previous is None else (
            EWMA_ALPHA * rate + (1 - EWMA_ALPHA) * previous)


@dataclass
class _State(Generic[In, Out]):
    pending: collections.deque[_Item[In, Out]] = field(default_factory=collections.deque)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False


class DynamicBatcher(Generic[In, Out]):
    """Groups submitted items into calls of ``run_batch(items) -> results`` (same order).

    ``run_batch`` runs on the batcher's worker thread; it must return one result per item.
    Use inside a running event loop: ``start()`` then ``await submit_many(...)``, ``await
    close()`` at shutdown.
    """

    def __init__(self, name: str, run_batch: Callable[[list[In]], Sequence[Out]],
                 config: BatcherConfig, observer: BatchObserver | None = None) -> None:
        self.name = name
        self.config = config
        self._run_batch = run_batch
        self._observer = observer or BatchObserver()
        self._state: _State[In, Out] = _State()
        self._throughput = _Throughput()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"surge-{name}")
        self._task: asyncio.Task[None] | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._state.pending)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"batcher-{self.name}")

    async def close(self) -> None:
        """Refuse new items, fail waiting ones with BatcherClosed, wait for the running batch."""
        self._state.closed = True
        for item in self._state.pending:
            if not item.future.done():
                item.future.set_exception(BatcherClosed(f"{self.name} is shutting down"))
        self._state.pending.clear()
        self._observer.on_queue_depth(0)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # The running batch (if any) finishes on its thread; nothing waits for its result.
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, value: In, deadline: float | None = None) -> Out:
        return (await self.submit_many([value], deadline))[0]

    async def submit_many(self, values: Sequence[In], deadline: float | None = None) -> list[Out]:
        """Results for ``values`` (in order), each batched with whatever else is waiting.

        ``deadline`` is an event-loop time (``loop.time()``). Raises BatcherFull at once when
        the queue has no room for all of them, BatchTimeout past the deadline. Cancelling the
        caller drops the items that have not started running.
        """
        items = self._enqueue(values)
        try:
            async with asyncio.timeout_at(deadline):
                return list(await asyncio.gather(*(item.future for item in items)))
        except TimeoutError:
            self._observer.on_rejected("timeout")
            raise BatchTimeout(f"{len(values)} item(s) did not finish in time") from None
        except asyncio.CancelledError:
            self._observer.on_rejected("cancelled")
            raise
        finally:
            self._drop(items)

    def retry_after(self) -> int:
        """Whole seconds until the items waiting now have likely run, in [1, 60]."""
        rate = self._throughput.items_per_second
        seconds = math.ceil(self.queue_depth / rate) if rate else MIN_RETRY_AFTER
        return min(max(seconds, MIN_RETRY_AFTER), MAX_RETRY_AFTER)

    # -- queue -------------------------------------------------------------------------------

    def _enqueue(self, values: Sequence[In]) -> list[_Item[In, Out]]:
        state = self._state
        if state.closed:
            raise BatcherClosed(f"{self.name} is shutting down")
        depth, limit = len(state.pending), self.config.max_queue_size
        # An empty queue takes any request, however many items: otherwise a request larger
        # than the whole queue would be refused forever and retrying could never help.
        if depth and depth + len(values) > limit:
            self._observer.on_rejected("queue_full")
            retry = self.retry_after()
            raise BatcherFull(f"Server is busy: {depth} items are waiting for {self.name!r} and "
                              f"this request adds {len(values)} (limit {limit}). Retry after "
                              f"{retry} s.", retry)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        items = [_Item(value, now, loop.create_future()) for value in values]
        state.pending.extend(items)
        state.arrived.set()
        self._observer.on_queue_depth(len(state.pending))
        return items

    def _drop(self, items: list[_Item[In, Out]]) -> None:
        """Remove items that never started (their caller left, timed out or failed)."""
        waiting = {item for item in items if not item.running}
        if not waiting:
            return
        self._state.pending = collections.deque(
            i for i in self._state.pending if i not in waiting)
        for item in waiting:
            item.future.cancel()
        self._observer.on_queue_depth(len(self._state.pending))

    # -- batch loop --------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            batch = await self._next_batch()
            await self._run(batch)

    async def _next_batch(self) -> list[_Item[In, Out]]:
        state, config = self._state, self.config
        while True:
            while not state.pending:
                state.arrived.clear()
                await state.arrived.wait()
            await self._fill_window()
            if state.pending:  # else every waiting item was cancelled: start over
                return self._take(config.max_batch_size)

    async def _fill_window(self) -> None:
        """Wait for more items until the batch is full, a preferred size is reached with
        nothing else arriving, or the window of the oldest waiting item ends."""
        state, config = self._state, self.config
        while state.pending and len(state.pending) < config.max_batch_size:
            # From the oldest item still waiting: the first may have been cancelled meanwhile.
            remaining = state.pending[0].arrival + config.max_wait_ms / 1000 - time.monotonic()
            if remaining <= 0:
                return
            state.arrived.clear()
            if len(state.pending) in config.preferred_batch_sizes:
                await asyncio.sleep(0)  # one turn for requests already on their way
                if not state.arrived.is_set():
                    return
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await state.arrived.wait()

    def _take(self, size: int) -> list[_Item[In, Out]]:
        pending = self._state.pending
        batch = [pending.popleft() for _ in range(min(size, len(pending)))]
        for item in batch:
            item.running = True
        self._observer.on_queue_depth(len(pending))
        return batch

    async def _run(self, batch: list[_Item[In, Out]]) -> None:
        started = time.monotonic()
        values = [item.value for item in batch]
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self._executor, self._call, values)
        except BaseException as exc:
            # The loop being cancelled means the batcher is closing: say so to the callers.
            error = exc if isinstance(exc, Exception) else BatcherClosed(
                f"{self.name} is shutting down")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return
        compute = time.monotonic() - started
        self._throughput.observe(len(batch), compute)
        self._observer.on_batch(len(batch), [started - item.arrival for item in batch], compute)
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():  # its caller may have left meanwhile
                item.future.set_result(result)

    def _call(self, values: list[In]) -> Sequence[Out]:
        results = self._run_batch(values)
        if len(results) != len(values):
            raise RuntimeError(f"{self.name}: the model returned {len(results)} results for "
                               f"{len(values)} inputs")
        return results


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


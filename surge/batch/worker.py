"""Batch workers: take lines from the queue, send each to its endpoint, keep the answer.

One ``BatchWorker`` class serves both places work runs:

- inside ``surge serve`` (the default), sending lines through the server's own request path
  in-process (``httpx.ASGITransport``), so validation, admission control, rate limits and
  metrics apply to batch work as to any request; it yields to interactive traffic;
- in ``surge batch worker`` processes (RabbitMQ only), sending lines over HTTP to an upstream
  server and publishing results to the results queue the server stores from.

How batch work yields to interactive requests (in ``surge serve``), at two levels:

- the engine: batch requests run at a low priority (``BATCH_PRIORITY`` unless a line sets its
  own). The scheduler gives a waiting interactive request its prompt tokens before the prompt
  chunks of running batch requests, lets batch prompts take at most 1/16 of each step's token
  budget while interactive requests are in the engine and for a second after (so every step
  stays short), and takes a batch request's seat if seats or KV blocks run out; running batch
  requests keep decoding (one token each per step) meanwhile;
- the worker: up to ``--batch-concurrency`` lines in flight, minus one per interactive request
  in flight, and only one while any interactive request waits for its first token or did
  within the last ``QUIET_SECONDS`` (a new batch prompt would otherwise share, and lengthen,
  the engine step that prefills it). At least one line always stays in flight, so batch work
  slows under interactive load but never stops.

Where the time goes (``benchmarks/bench_batch.py``, smollm2-135m shape on 2 CPU cores): an
interactive request's first token waits for the engine step in progress when it arrives, then
for one step with its prompt. Two interactive decodes make a step of about 27 ms; with three
batch decodes about 38 ms; with a 60-token batch prompt about 90 ms, and a full 512-token batch
prompt chunk takes seconds (hence the engine's share rule). An interactive request that arrives
while none is in the engine can still meet one such step. The worker's work on the event loop
costs little (loop lag under 10 ms at p99). The rest is other processes taking the cores:
torch's threads then stall, longer for bigger steps.

``surge batch worker`` processes (RabbitMQ) cannot see the server's interactive load: they
send lines over HTTP at their full concurrency and rely on the engine priority alone, and on
429/503 from the server's admission control. Run them with a small ``--concurrency``.

A 429 or 503 means "not now": the worker waits (``Retry-After``, capped) and tries again; it
never turns back-pressure into a failed line. Any other answer, success or error, is the line's
result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from surge.batch.queue import BatchQueue, Delivery, LineTask
from surge.batch.store import LineResult

__all__ = ["BATCH_PRIORITY", "QUIET_SECONDS", "BatchWorker", "call_endpoint"]

logger = logging.getLogger(__name__)

# Engine priority of batch lines: lower runs first and interactive requests default to 0.
BATCH_PRIORITY = 100
_PRIORITY_URLS = frozenset({"/v1/chat/completions", "/v1/completions"})
_NOT_NOW = frozenset({429, 503})
MAX_RETRY_SECONDS = 5.0
MIN_RETRY_SECONDS = 0.05
# How often a worker that has no room (interactive load) looks again.
ROOM_POLL_SECONDS = 0.05
# After interactive requests stop waiting for a first token, how long the worker still keeps
# to one line: requests often come in bursts, and the next one should not find a new batch
# prompt in its step.
QUIET_SECONDS = 0.25


def request_body(task: LineTask) -> dict[str, Any]:
    body = dict(task.body)
    if task.url in _PRIORITY_URLS:
        body.setdefault("priority", BATCH_PRIORITY)
    return body


async def call_endpoint(client: httpx.AsyncClient, task: LineTask,
                        headers: dict[str, str]) -> LineResult:
    """The line's answer; waits out 429/503 and unreachable upstreams (a restarting server)."""
    attempt = 0
    while True:
        try:
            response = await client.post(task.url, json=request_body(task), headers=headers)
        except httpx.TransportError as exc:
            delay = _backoff(attempt)
            logger.warning("batch line %s/%s: upstream unreachable (%s); retrying in %.1f s",
                           task.batch_id, task.custom_id, exc, delay)
        else:
            if response.status_code not in _NOT_NOW:
                return LineResult(task.batch_id, task.custom_id, task.line_no,
                                  response.status_code, _json_body(response))
            delay = _retry_after(response, attempt)
        attempt += 1
        await asyncio.sleep(delay)  # back-off before retrying, not synchronization


class BatchWorker:
    """Up to ``concurrency`` lines at once, fewer under interactive load (module docstring).

    ``is_active(batch_id)`` says whether the line's batch still runs (cancelled and expired
    batches' lines are skipped); ``keep(result)`` stores or forwards the result and must be
    durable when it returns, because the delivery is acknowledged right after.
    ``interactive_load()`` counts interactive requests in flight and ``interactive_waiting()``
    those still waiting for their first token (both 0 where the worker cannot see them).
    """

    def __init__(self, queue: BatchQueue, client: httpx.AsyncClient, *, concurrency: int,
                 headers: dict[str, str], is_active: Callable[[str], Awaitable[bool]],
                 keep: Callable[[LineResult], Awaitable[None]],
                 interactive_load: Callable[[], int] = lambda: 0,
                 interactive_waiting: Callable[[], int] = lambda: 0,
                 can_run: Callable[[], bool] = lambda: True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency={concurrency} is invalid: allowed is >= 1")
        self.queue = queue
        self.client = client
        self.concurrency = concurrency
        self.headers = headers
        self.is_active = is_active
        self.keep = keep
        self.interactive_load = interactive_load
        self.interactive_waiting = interactive_waiting
        self.can_run = can_run
        self.clock = clock
        self.num_in_flight = 0
        self.num_done = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_interactive_wait = -math.inf

    def allowed_concurrency(self) -> int:
        """Lines that may be in flight now: none while the server cannot take requests; one
        while interactive requests wait for a first token (or did just now); else one seat
        fewer per interactive request in flight, down to one (never starved)."""
        if not self.can_run():
            return 0
        if self._interactive_recently_waiting():
            return 1
        return max(1, self.concurrency - max(self.interactive_load(), 0))

    def _interactive_recently_waiting(self) -> bool:
        now = self.clock()
        if self.interactive_waiting() > 0:
            self._last_interactive_wait = now
        return now - self._last_interactive_wait < QUIET_SECONDS

    async def run(self) -> None:
        """Work until cancelled; lines in progress then go back to the queue."""
        try:
            while True:
                await self._wait_for_room()
                delivery = await self.queue.get()
                await self._wait_for_room()  # load may have risen while the queue was empty
                self.num_in_flight += 1
                task = asyncio.create_task(self._process(delivery))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _wait_for_room(self) -> None:
        while self.num_in_flight >= self.allowed_concurrency():
            await asyncio.sleep(ROOM_POLL_SECONDS)  # no event says "load dropped"

    async def _process(self, delivery: Delivery) -> None:
        task = delivery.task
        try:
            if await self.is_active(task.batch_id):
                await self.keep(await call_endpoint(self.client, task, self.headers))
                self.num_done += 1
            await delivery.ack()
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(delivery.release())
            raise
        except Exception:
            logger.exception("batch line %s/%s failed in the worker; it is queued again",
                             task.batch_id, task.custom_id)
            await delivery.release()
        finally:
            self.num_in_flight -= 1


def _json_body(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        return body
    return {"error": {"message": f"the endpoint answered {response.status_code} with a "
                                 f"non-JSON body: {response.text[:200]!r}",
                      "type": "server_error", "param": None, "code": None}}


def _retry_after(response: httpx.Response, attempt: int) -> float:
    header = response.headers.get("retry-after", "")
    try:
        seconds = float(header)
    except ValueError:
        return _backoff(attempt)
    return min(max(seconds, MIN_RETRY_SECONDS), MAX_RETRY_SECONDS)


def _backoff(attempt: int) -> float:
    return min(0.1 * 2 ** min(attempt, 10), MAX_RETRY_SECONDS)

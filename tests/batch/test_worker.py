"""The in-server batch worker yields to interactive requests and still makes progress.

A real SQLite queue and real HTTP (httpx over ASGI) to a stand-in upstream that holds each
request until told, so the test sees how many lines the worker keeps in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from surge.batch.queue import LineTask, SqliteQueue
from surge.batch.store import LineResult
from surge.batch.worker import QUIET_SECONDS, BatchWorker

WAIT = 10.0  # bound on every wait for the worker


class Upstream:
    """Counts requests in flight; each is answered when ``release`` is set or after
    ``hold_seconds``, whichever comes first."""

    def __init__(self) -> None:
        self.active = 0
        self.max_active = 0
        self.hold_seconds = WAIT
        self.release = asyncio.Event()
        self.changed = asyncio.Event()
        self.app = Starlette(routes=[Route("/v1/completions", self.answer, methods=["POST"])])

    async def answer(self, request: Request) -> JSONResponse:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.changed.set()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), self.hold_seconds)
        finally:
            self.active -= 1
        return JSONResponse({"id": "cmpl-1", "choices": [{"text": "ok"}]})

    async def wait_until_active(self, count: int) -> None:
        async with asyncio.timeout(WAIT):
            while self.active < count:
                self.changed.clear()
                await self.changed.wait()


class Harness:
    def __init__(self, tmp_path: Path) -> None:
        self.upstream = Upstream()
        self.queue = SqliteQueue(tmp_path / "queue.db")
        self.kept: list[LineResult] = []
        self.kept_changed = asyncio.Event()
        self.waiting = 0  # interactive requests waiting for a first token
        self.now = 1000.0
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.upstream.app),
                                        base_url="http://upstream")
        self.worker = BatchWorker(self.queue, self.client, concurrency=4, headers={},
                                  is_active=self._is_active, keep=self._keep,
                                  interactive_waiting=lambda: self.waiting,
                                  clock=lambda: self.now)
        self.num_lines = 0

    async def _is_active(self, batch_id: str) -> bool:
        return True

    async def _keep(self, result: LineResult) -> None:
        self.kept.append(result)
        self.kept_changed.set()

    async def put(self, count: int) -> None:
        tasks = [LineTask("batch_1", self.num_lines + i, f"line-{self.num_lines + i}",
                          "/v1/completions", {"prompt": "hi"}) for i in range(count)]
        self.num_lines += count
        await self.queue.put(tasks)

    async def wait_kept(self, count: int) -> None:
        async with asyncio.timeout(WAIT):
            while len(self.kept) < count:
                self.kept_changed.clear()
                await self.kept_changed.wait()


def test_allowed_concurrency_policy(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        load = 0
        h.worker.interactive_load = lambda: load
        assert h.worker.allowed_concurrency() == 4
        load = 2
        assert h.worker.allowed_concurrency() == 2  # one seat per interactive request
        load = 9
        assert h.worker.allowed_concurrency() == 1  # never below one
        load, h.waiting = 0, 1
        assert h.worker.allowed_concurrency() == 1  # someone waits for a first token
        h.waiting = 0
        h.now += QUIET_SECONDS / 2
        assert h.worker.allowed_concurrency() == 1  # not quiet for long enough yet
        h.now += QUIET_SECONDS
        assert h.worker.allowed_concurrency() == 4
        h.worker.can_run = lambda: False
        assert h.worker.allowed_concurrency() == 0  # draining or engine down
        await h.client.aclose()

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_worker_keeps_one_line_while_interactive_requests_wait(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        await h.queue.start(prefetch=4)
        runner = asyncio.create_task(h.worker.run())
        try:
            # An interactive request is waiting: lines go one at a time, yet all get done.
            h.waiting = 1
            h.upstream.hold_seconds = 0.2  # room for a 2nd line to arrive if one were sent
            await h.put(3)
            await h.wait_kept(3)
            assert h.upstream.max_active == 1

            # Quiet again: the worker goes back to its full concurrency.
            h.waiting, h.now = 0, h.now + QUIET_SECONDS + 0.01
            h.upstream.hold_seconds, h.upstream.max_active = WAIT, 0
            await h.put(6)
            await h.upstream.wait_until_active(4)
            h.upstream.release.set()
            await h.wait_kept(9)
            assert h.upstream.max_active == 4
            assert sorted(r.custom_id for r in h.kept) == sorted(f"line-{i}" for i in range(9))
            assert all(r.status_code == 200 for r in h.kept)
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
            await h.client.aclose()
            await h.queue.close()

    asyncio.run(scenario())

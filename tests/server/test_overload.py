"""Past the waiting-queue bound the server answers 429 at once, and what it accepted completes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from surge.http.sse import aiter_sse_lines
from tests.server._helpers import ServerProcess, metric_value, start_server

BURST = 16
BODY = {"prompt": "overload test prompt", "max_tokens": 120, "ignore_eos": True,
        "temperature": 0}


@pytest.fixture(scope="module")
def small_queue_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory
                       ) -> Iterator[ServerProcess]:
    server = start_server(model_dir, tmp_path_factory.mktemp("overload"),
                          "--engine-mode", "thread", "--max-queued-requests", "2",
                          "--max-num-seqs", "2")
    yield server
    server.stop()


@pytest.mark.timeout(180)
def test_burst_gets_429_fast_and_accepted_requests_complete(
        small_queue_server: ServerProcess) -> None:
    url = small_queue_server.url
    expected = httpx.post(f"{url}/v1/completions", json=BODY, timeout=60).json()
    rejected_before = _rejected(url)

    async def one(http: httpx.AsyncClient) -> tuple[httpx.Response, float]:
        response = await http.post("/v1/completions", json=BODY)
        return response, time.monotonic()

    async def burst() -> list[tuple[httpx.Response, float]]:
        limits = httpx.Limits(max_connections=BURST)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
            return await asyncio.gather(*(one(http) for _ in range(BURST)))

    results = asyncio.run(burst())
    busy = [(r, t) for r, t in results if r.status_code == 429]
    done = [(r, t) for r, t in results if r.status_code == 200]
    assert len(busy) + len(done) == BURST, [r.text for r, _ in results]
    assert busy and done
    for response, _ in busy:
        assert int(response.headers["Retry-After"]) >= 1
        error = response.json()["error"]
        assert error["code"] == "queue_full_requests" and error["type"] == "rate_limit_error"
        assert "--max-queued-requests=2" in error["message"]
    for response, _ in done:
        assert response.json()["choices"][0]["text"] == expected["choices"][0]["text"]
    # Refusals never wait on the engine: all of them came back before any accepted request.
    assert max(t for _, t in busy) < min(t for _, t in done)
    assert _rejected(url) == rejected_before + len(busy)


def _rejected(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return metric_value(text, "surge:request_rejected_total", reason="queue_full_requests")


@pytest.mark.timeout(180)
def test_a_full_queue_refuses_before_reading_the_body(
        small_queue_server: ServerProcess) -> None:
    """Clients that ignore Retry-After used to cost ~4 ms of API CPU per 429 (body, JSON,
    validation, tokenizing) and starve the engine. With the queue full, even a body that is not
    JSON gets the 429: nothing of it was parsed."""
    url = small_queue_server.url

    async def flood() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=8)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
            running = [asyncio.Event() for _ in range(2)]

            async def streamed(started: asyncio.Event) -> None:
                async with http.stream("POST", "/v1/completions",
                                       json={**BODY, "stream": True}) as response:
                    async for _ in aiter_sse_lines(response):
                        started.set()

            long = [asyncio.ensure_future(streamed(event)) for event in running]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in running)), 60)
            # Both engine slots busy: the next two wait in the queue, which is then full.
            long += [asyncio.ensure_future(http.post("/v1/completions", json=BODY))
                     for _ in range(2)]
            answers = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                answers.append(await http.post(
                    "/v1/chat/completions", content=b"not json at all",
                    headers={"content-type": "application/json"}))
                if answers[-1].status_code == 429:
                    break
                await asyncio.sleep(0.02)  # until the long requests fill the queue
            await asyncio.gather(*long)
            return answers

    answers = asyncio.run(flood())
    assert answers[-1].status_code == 429, [a.text for a in answers[-3:]]
    assert answers[-1].json()["error"]["code"] == "queue_full_requests"
    assert int(answers[-1].headers["Retry-After"]) >= 1
    assert {a.status_code for a in answers[:-1]} <= {400}  # before the queue filled: parsed

"""Helpers for the bench tests: real HTTP on 127.0.0.1 against the scripted fake server.

The fake server runs on the generator's own event loop: a server thread would make the two
take turns on the GIL every 5 ms (Python's switch interval), which shows up as latency.
"""

from __future__ import annotations

import asyncio
from typing import Any

from surge.bench.fake_server import FakeScript, FakeServer
from surge.bench.runner import BenchConfig, run_benchmark_async

DEFAULTS: dict[str, Any] = {"input_len": "8", "output_len": "4", "num_requests": 20}


def bench(script: FakeScript | None = None, **settings: Any) -> tuple[dict[str, Any], Any]:
    """Run the generator against a fake server; return the results document and what the
    server saw. ``url=...`` aims it elsewhere (the fake still runs, unused)."""

    async def main() -> tuple[dict[str, Any], Any]:
        async with FakeServer(script) as server:
            config = BenchConfig(**{"url": server.url, **DEFAULTS, **settings})
            return await run_benchmark_async(config, progress=False), server.stats

    return asyncio.run(main())


def bench_run(script: FakeScript | None = None, **settings: Any) -> dict[str, Any]:
    """The single run of a one-point benchmark."""
    doc, _ = bench(script, **settings)
    assert len(doc["runs"]) == 1
    return doc["runs"][0]

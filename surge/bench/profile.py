"""``surge bench --profile FILE``: one torch.profiler trace of the server's engine, captured
in the middle of the first load point (``POST /debug/profile``; the server needs
``--enable-profiler``), so the steps it records run under the benchmark's load.

Mid-run means: once half of the point's requests have completed, or half of its
``--duration`` has passed. The profile slows the steps it records, so the point's numbers
are a little lower than without it; compare profiled runs with profiled runs.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from surge.bench.client import endpoint_url

__all__ = ["MidRunProfile"]


class MidRunProfile:
    """Starts the capture once, when the run is half done; ``finish`` writes the file."""

    def __init__(self, session: aiohttp.ClientSession, url: str, path: str, num_steps: int,
                 num_requests: int | None, duration: float | None) -> None:
        base = endpoint_url(url, "completions").removesuffix("/v1/completions")
        self._session, self._url = session, base + "/debug/profile"
        self.path, self.num_steps = Path(path), num_steps
        self._half = max((num_requests or 0) // 2, 1) if num_requests else None
        self._duration = duration
        self._done = 0
        self._task: asyncio.Task[bytes] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """The measured phase begins: a duration-bound run captures at its middle."""
        if self._half is None and self._duration:
            self._timer = asyncio.get_running_loop().call_later(self._duration / 2, self._begin)

    def on_record(self, record: Any) -> None:
        self._done += 1
        if self._half is not None and self._done >= self._half:
            self._begin()

    def _begin(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._capture())

    async def _capture(self) -> bytes:
        body = {"num_steps": self.num_steps, "max_seconds": 60}
        async with self._session.post(self._url, json=body) as response:
            content = await response.read()
            if response.status != 200:
                raise RuntimeError(
                    f"POST /debug/profile answered {response.status}: "
                    f"{content[:300].decode(errors='replace')} (is the server started with "
                    "--enable-profiler, and --api-key given here if it needs one?)")
            return content

    async def finish(self) -> dict[str, Any]:
        """Wait for the capture and write it; what the results document records."""
        if self._timer is not None:
            self._timer.cancel()
        if self._task is None:
            return {"path": None, "error": "the run ended before its middle was reached"}
        try:
            trace = await self._task
        except (RuntimeError, aiohttp.ClientError, TimeoutError) as exc:
            return {"path": None, "error": str(exc)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_bytes(trace)
        steps = sum(1 for e in json.loads(trace).get("traceEvents", [])
                    if str(e.get("name", "")).startswith("surge.step#"))
        return {"path": str(self.path), "steps": steps, "error": None}

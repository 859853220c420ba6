"""SIGTERM to the whole process group (systemd's default KillMode, `kill -TERM -- -PGID`):
the server drains and every in-flight stream completes. The engine used to exit on the
signal at once, failing them all."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from surge.batch.config import DATA_DIR_ENV
from surge.http.sse import aiter_sse_lines
from tests.server._helpers import ServerProcess, _wait_for_port

STREAMS = 8
LONG = {"prompt": "a long story", "max_tokens": 64, "ignore_eos": True, "temperature": 0,
        "stream": True}


def _start_in_own_group(model_dir: Path, log_dir: Path) -> ServerProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "serve.log"
    command = [sys.executable, "-m", "surge.cli", "serve", "--model", str(model_dir),
               "--dtype", "float32", "--port", "0", "--num-threads", "1",
               "--max-num-seqs", str(STREAMS), "--drain-timeout", "60", "--no-apps"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True,  # its own process group
                                   env={**os.environ, DATA_DIR_ENV: str(log_dir / "data")})
    server = ServerProcess(process, log_path, _wait_for_port(process, log_path))
    server.wait_healthy()
    return server


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigterm_to_the_process_group_drains_every_stream(model_dir: Path,
                                                          tmp_path: Path) -> None:
    server = _start_in_own_group(model_dir, tmp_path)
    engine_pid = server.health().json()["engine_pid"]
    assert os.getpgid(engine_pid) == server.process.pid  # the engine is in the group too

    async def streams() -> list[list[str]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            started = asyncio.Event()
            count = 0

            async def one() -> list[str]:
                nonlocal count
                events = []
                async with http.stream("POST", "/v1/completions", json=LONG) as response:
                    assert response.status_code == 200
                    async for line in aiter_sse_lines(response):
                        if line.startswith("data: "):
                            events.append(line)
                            if len(events) == 1:
                                count += 1
                                if count == STREAMS:
                                    started.set()
                return events

            tasks = [asyncio.ensure_future(one()) for _ in range(STREAMS)]
            await asyncio.wait_for(started.wait(), 60)
            os.killpg(server.process.pid, signal.SIGTERM)  # kill -TERM -- -PGID
            return await asyncio.gather(*tasks)

    try:
        results = asyncio.run(streams())
        assert server.process.wait(60) == 0, server.log()[-3000:]
    finally:
        if server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGKILL)
    for events in results:
        assert events[-1] == "data: [DONE]", events[-3:]
        finals = [json.loads(e[6:]) for e in events[:-1]]
        assert not any("error" in f for f in finals), finals[-1]
        assert finals[-1]["choices"][0]["finish_reason"] == "length"
    deadline = time.monotonic() + 10
    while psutil.pid_exists(engine_pid) and time.monotonic() < deadline:
        time.sleep(0.1)  # the engine is reaped right after the server exits
    assert not psutil.pid_exists(engine_pid) or \
        psutil.Process(engine_pid).status() == psutil.STATUS_ZOMBIE

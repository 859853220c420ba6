"""A real `surge serve` on loopback, as a subprocess: found by its log line, ready when /health
answers 200, stopped with a signal."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from surge.batch.config import DATA_DIR_ENV

# Generous: on 2 shared cores the engine process imports torch and loads the model.
STARTUP_SECONDS = 90.0
STOP_SECONDS = 30.0
_LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)")


@dataclass
class ServerProcess:
    process: subprocess.Popen
    log_path: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> httpx.Response:
        return httpx.get(f"{self.url}/health", timeout=5.0)

    def wait_healthy(self, timeout: float = STARTUP_SECONDS) -> list[int]:
        """Poll /health until 200; returns every status seen on the way."""
        statuses: list[int] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._require_running()
            try:
                statuses.append(self.health().status_code)
            except httpx.TransportError:
                statuses.append(0)
            if statuses[-1] == 200:
                return statuses
            time.sleep(0.05)  # polling interval, not synchronization
        raise AssertionError(f"no /health 200 within {timeout} s:\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_SECONDS) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"server did not exit within {timeout} s:\n"
                                 f"{self.log()[-3000:]}") from None

    def _require_running(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"server exited with {self.process.returncode}:\n"
                                 f"{self.log()[-3000:]}")


def start_server(model_dir: Path | None, log_dir: Path, *args: str,
                 env: dict[str, str] | None = None, wait: bool = True) -> ServerProcess:
    """`surge serve` on a free port; waits for /health 200 unless ``wait`` is False.

    ``model_dir`` None starts it as a user's first `surge serve` does, with no ``--model``.

    The server keeps its data (web-app history, batch files) in ``log_dir/data`` unless
    ``env`` names another ``SURGE_DATA_DIR``: never in the user's home, never shared with
    another test's server."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"serve-{time.monotonic_ns()}.log"
    # One torch thread unless a test asks for more: on 2 cores the test process (and a browser)
    # busy the other core, and two OpenMP threads then wait on each other many times slower.
    threads = () if "--num-threads" in args else ("--num-threads", "1")
    model = ["--model", str(model_dir)] if model_dir is not None else []
    command = [sys.executable, "-m", "surge.cli", "serve", *model,
               "--dtype", "float32", "--port", "0", *threads, *args]
    data_dir = {DATA_DIR_ENV: str(log_dir / "data")}
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **data_dir, **(env or {})})
    server = ServerProcess(process, log_path, _wait_for_port(process, log_path))
    if wait:
        server.wait_healthy()
    return server


def _wait_for_port(process: subprocess.Popen, log_path: Path) -> int:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        match = _LISTENING.search(log_path.read_bytes())
        if match:
            return int(match.group(1))
        if process.poll() is not None:
            break
        time.sleep(0.05)  # polling the log for the port line
    process.kill()
    raise AssertionError(f"server never listened:\n{log_path.read_text(errors='replace')}")


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus exposition text (0 if absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0

"""Servers and workers as real subprocesses in their own process groups, so a test can kill
-9 the whole group (server and engine) the way a machine crash would; and batch files."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from surge.batch.config import DATA_DIR_ENV

STARTUP_SECONDS = 120.0
_LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)")
TERMINAL = ("completed", "failed", "expired", "cancelled")


@dataclass
class Proc:
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        """SIGKILL to the whole process group (a server's engine process too)."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill9()


@dataclass
class Server(Proc):
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def batch(self, batch_id: str) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/v1/batches/{batch_id}", timeout=10.0)
        assert response.status_code == 200, response.text
        return response.json()

    def wait_batch(self, batch_id: str, *, until: Any = None,
                   timeout: float = 120.0) -> dict[str, Any]:
        """Poll until ``until(batch)`` (default: the batch ended)."""
        until = until or (lambda b: b["status"] in TERMINAL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited:\n{self.log()[-3000:]}")
            batch = self.batch(batch_id)
            if until(batch):
                return batch
            time.sleep(0.05)  # polling interval, not synchronization
        raise AssertionError(f"batch {batch_id} not there within {timeout} s: "
                             f"{self.batch(batch_id)}\n{self.log()[-3000:]}")


def spawn(command: list[str], log_dir: Path, name: str,
          env: dict[str, str] | None = None) -> Proc:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}-{time.monotonic_ns()}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, env={**os.environ, **(env or {})})
    return Proc(process, log_path)


def start_server(model_dir: Path, log_dir: Path, data_dir: Path, *args: str) -> Server:
    """`surge serve` on a free port with its batch data in ``data_dir``; waits for /health."""
    proc = spawn([sys.executable, "-m", "surge.cli", "serve", "--model", str(model_dir),
                  "--dtype", "float32", "--port", "0", "--served-model-name", "tiny",
                  "--batch-data-dir", str(data_dir), *args], log_dir, "serve",
                 # The web apps' history goes next to the batch data, not into the user's home.
                 env={DATA_DIR_ENV: str(data_dir)})
    server = Server(proc.process, proc.log_path)
    deadline = time.monotonic() + STARTUP_SECONDS
    try:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise AssertionError(f"server exited:\n{server.log()[-3000:]}")
            match = _LISTENING.search(server.log_path.read_bytes())
            if match:
                server.port = int(match.group(1))
                if _healthy(server):
                    return server
            time.sleep(0.05)  # polling for readiness
        raise AssertionError(f"server not ready in {STARTUP_SECONDS} s:\n{server.log()[-3000:]}")
    except BaseException:
        server.kill9()
        raise


def _healthy(server: Server) -> bool:
    try:
        return httpx.get(f"{server.url}/health", timeout=5.0).status_code == 200
    except httpx.TransportError:
        return False


def chat_lines(count: int, max_tokens: int = 2, prefix: str = "req") -> list[dict[str, Any]]:
    return [{"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "tiny", "max_tokens": max_tokens, "temperature": 0,
                      "ignore_eos": True,
                      "messages": [{"role": "user", "content": f"Say {i}"}]}}
            for i in range(count)]


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def submit(server: Server, lines: list[dict[str, Any]], window: str = "24h") -> dict[str, Any]:
    with httpx.Client(base_url=server.url, timeout=30.0) as http:
        uploaded = http.post("/v1/files", data={"purpose": "batch"},
                             files={"file": ("in.jsonl", jsonl(lines))})
        assert uploaded.status_code == 200, uploaded.text
        created = http.post("/v1/batches", json={
            "input_file_id": uploaded.json()["id"], "endpoint": lines[0]["url"],
            "completion_window": window})
        assert created.status_code == 200, created.text
        return created.json()


def output_lines(server: Server, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    response = httpx.get(f"{server.url}/v1/files/{file_id}/content", timeout=30.0)
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines() if line.strip()]


def done(batch: dict[str, Any]) -> int:
    counts = batch["request_counts"]
    return counts["completed"] + counts["failed"]

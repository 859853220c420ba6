"""Kill -9 in the middle of a batch, at random points, and start again: the batch resumes,
no line is lost, none appears twice. With the SQLite queue (the server crashes) and with a
real RabbitMQ (the server and a separate `surge batch worker` crash)."""

from __future__ import annotations

import asyncio
import random
import socket
import sys
import uuid
from pathlib import Path

import pytest

from surge.batch.queue import AmqpQueue
from tests.batch._helpers import (
    TERMINAL,
    Proc,
    Server,
    chat_lines,
    done,
    output_lines,
    spawn,
    start_server,
    submit,
)

NUM_LINES = 80
NUM_KILLS = 6
BROKER = ("127.0.0.1", 5672)


def _progress_points(seed: int) -> list[int]:
    """Where to kill: after this many lines are done (0: right after the batch was created)."""
    return sorted(random.Random(seed).sample(range(0, NUM_LINES - 10), NUM_KILLS))


def _assert_every_line_once(server: Server, batch_id: str) -> None:
    batch = server.wait_batch(batch_id, timeout=90)
    assert batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": NUM_LINES, "completed": NUM_LINES, "failed": 0}
    output = output_lines(server, batch["output_file_id"])
    assert [o["custom_id"] for o in output] == [f"req-{i}" for i in range(NUM_LINES)]
    assert all(o["response"]["status_code"] == 200 for o in output)
    assert batch["error_file_id"] is None


def _kill_at(server: Server, batch_id: str, target: int) -> bool:
    """Wait until ``target`` lines are done, then kill -9; True if the batch was mid-way."""
    batch = server.wait_batch(batch_id, until=lambda b: done(b) >= target
                              or b["status"] in TERMINAL, timeout=180)
    server.kill9()
    return batch["status"] not in TERMINAL


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sqlite_queue_survives_kill_9_of_the_server(model_dir: Path, tmp_path: Path) -> None:
    def start() -> Server:
        return start_server(model_dir, tmp_path / "logs", tmp_path / "data",
                            "--batch-concurrency", "4")

    server = start()
    try:
        batch_id = submit(server, chat_lines(NUM_LINES))["id"]
        mid_batch = 0
        for target in _progress_points(seed=8):
            mid_batch += _kill_at(server, batch_id, target)
            server = start()
        assert mid_batch >= 5, "the kills must land while the batch runs"
        _assert_every_line_once(server, batch_id)
    finally:
        server.kill9()


def _broker_reachable() -> bool:
    try:
        socket.create_connection(BROKER, timeout=2).close()
    except OSError:
        return False
    return True


@pytest.fixture
def amqp_url() -> str:
    if not _broker_reachable():
        pytest.skip("no RabbitMQ broker on 127.0.0.1:5672")
    url = f"amqp://guest:guest@127.0.0.1:5672/?queue=surge-test-{uuid.uuid4().hex[:12]}"
    yield url

    async def delete() -> None:
        queue = AmqpQueue(url)
        await queue.start()
        await queue.delete_queues()
        await queue.close()

    asyncio.run(delete())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_rabbitmq_survives_kill_9_of_server_and_worker(model_dir: Path, tmp_path: Path,
                                                       amqp_url: str) -> None:
    port = _free_port()  # the same port after each restart: the worker keeps its upstream

    def start_server_() -> Server:
        return start_server(model_dir, tmp_path / "logs", tmp_path / "data", "--port",
                            str(port), "--batch-queue-url", amqp_url, "--batch-concurrency", "2")

    def start_worker() -> Proc:
        return spawn([sys.executable, "-m", "surge.cli", "batch", "worker", "--queue-url",
                      amqp_url, "--upstream", f"http://127.0.0.1:{port}", "--concurrency", "2"],
                     tmp_path / "logs", "worker")

    server, worker = start_server_(), start_worker()
    try:
        batch_id = submit(server, chat_lines(NUM_LINES))["id"]
        mid_batch = 0
        for kill_number, target in enumerate(_progress_points(seed=9)):
            if kill_number % 2 == 0:  # the server (and its engine) crash; the worker waits
                mid_batch += _kill_at(server, batch_id, target)
                server = start_server_()
            else:  # a remote worker crashes holding unacknowledged lines
                server.wait_batch(batch_id, until=lambda b, t=target: done(b) >= t
                                  or b["status"] in TERMINAL, timeout=180)
                worker.kill9()
                mid_batch += server.batch(batch_id)["status"] not in TERMINAL
                worker = start_worker()
        assert mid_batch >= 5, "the kills must land while the batch runs"
        _assert_every_line_once(server, batch_id)
        assert "Traceback" not in worker.log(), worker.log()[-3000:]
    finally:
        for proc in (worker, server):
            proc.kill9()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

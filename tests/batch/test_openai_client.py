"""The official `openai` client against a real `surge serve`: upload, create, follow, list,
cancel, expire and download; plus the `surge batch` CLI and the batch metrics."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.batch._helpers import (
    TERMINAL,
    Server,
    chat_lines,
    done,
    jsonl,
    start_server,
)
from tests.server._helpers import metric_value

KEY = "batch-test-key"


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # With an API key: the in-server worker must send lines with the server's own key.
    root = tmp_path_factory.mktemp("batch_server")
    proc = start_server(model_dir, root / "logs", root / "data", "--api-key", KEY,
                        "--batch-concurrency", "2")
    yield proc
    proc.stop()


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=30)


def _upload(client: openai.OpenAI, lines: list[dict]) -> str:
    return client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))),
                               purpose="batch").id


def _wait(client: openai.OpenAI, batch_id: str, timeout: float = 90.0) -> openai.types.Batch:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in TERMINAL:
            return batch
        time.sleep(0.05)  # polling interval
    raise AssertionError(f"batch {batch_id} still {batch.status}")


def _content(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


@pytest.mark.timeout(180)
def test_batch_round_trip_with_the_openai_client(client: openai.OpenAI) -> None:
    lines = chat_lines(12, max_tokens=3)
    lines[5]["body"]["max_tokens"] = 4000  # valid JSON, refused by the endpoint (context)
    file_id = _upload(client, lines)
    assert client.files.retrieve(file_id).purpose == "batch"
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"job": "nightly"})
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"job": "nightly"}
    assert batch.request_counts.total == 12
    batch = _wait(client, batch.id)
    assert batch.status == "completed" and batch.completed_at and batch.finalizing_at
    assert (batch.request_counts.completed, batch.request_counts.failed) == (11, 1)
    output = _content(client, batch.output_file_id)
    # Every line exactly once, in input order, with the endpoint's real answer.
    assert [o["custom_id"] for o in output] == [f"req-{i}" for i in range(12) if i != 5]
    for entry in output:
        body = entry["response"]["body"]
        assert entry["response"]["status_code"] == 200 and entry["error"] is None
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 3
    errors = _content(client, batch.error_file_id)
    assert [e["custom_id"] for e in errors] == ["req-5"]
    assert errors[0]["response"]["status_code"] == 400
    assert "max_tokens" in errors[0]["response"]["body"]["error"]["message"]


@pytest.mark.timeout(60)
def test_validation_errors_name_the_line(client: openai.OpenAI) -> None:
    lines = chat_lines(3)
    lines[1]["body"]["messages"] = [{"role": "robot", "content": "x"}]
    with pytest.raises(openai.BadRequestError) as info:
        _upload(client, lines)
    message = info.value.body["message"]
    assert "line 2:" in message and "role" in message, message
    assert info.value.body["param"] == "file"
    # A batch's lines must all use its endpoint.
    file_id = _upload(client, chat_lines(2))
    with pytest.raises(openai.BadRequestError, match="line 1"):
        client.batches.create(input_file_id=file_id, endpoint="/v1/completions",
                              completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                              completion_window="soon")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_missing")


@pytest.mark.timeout(120)
def test_list_pages_through_every_batch(client: openai.OpenAI) -> None:
    file_id = _upload(client, chat_lines(1))
    created = [client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                     completion_window="24h").id for _ in range(3)]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == created[::-1][:2] and first.has_more
    second = client.batches.list(limit=2, after=first.data[-1].id)
    assert second.data[0].id == created[0]
    listed = [b.id for b in client.batches.list(limit=2)]  # auto-pagination follows `after`
    assert set(created) <= set(listed) and len(listed) == len(set(listed))
    for batch_id in created:
        assert _wait(client, batch_id).status == "completed"


@pytest.mark.timeout(120)
def test_cancel_stops_dispatching_and_keeps_what_finished(client: openai.OpenAI) -> None:
    file_id = _upload(client, chat_lines(150, max_tokens=24))
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled") and cancelled.cancelling_at
    batch = _wait(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    counts = batch.request_counts
    assert counts.completed + counts.failed < counts.total == 150
    output = _content(client, batch.output_file_id)
    assert len(output) == counts.completed
    assert len({o["custom_id"] for o in output}) == len(output)
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(_wait(client, client.batches.create(
            input_file_id=_upload(client, chat_lines(1)), endpoint="/v1/chat/completions",
            completion_window="24h").id).id)


@pytest.mark.timeout(120)
def test_an_expired_batch_keeps_partial_results(client: openai.OpenAI) -> None:
    file_id = _upload(client, chat_lines(150, max_tokens=24))
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                  completion_window="2s")
    batch = _wait(client, batch.id)
    assert batch.status == "expired" and batch.expired_at
    output = _content(client, batch.output_file_id)
    expired = _content(client, batch.error_file_id)
    assert {e["error"]["code"] for e in expired} == {"batch_expired"}
    # Finished and expired lines together are the input, each once.
    ids = [o["custom_id"] for o in output] + [e["custom_id"] for e in expired]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(150))
    assert len(output) == batch.request_counts.completed < 150


@pytest.mark.timeout(120)
def test_cli_submit_status_results(server: Server, tmp_path: Path) -> None:
    source = tmp_path / "requests.jsonl"
    source.write_bytes(jsonl(chat_lines(4)))
    base = [sys.executable, "-m", "surge.cli", "batch"]
    auth = ["--url", server.url, "--api-key", KEY]
    submitted = subprocess.run([*base, "submit", str(source), "--wait", "-o",
                                str(tmp_path / "out.jsonl"), *auth],
                               capture_output=True, text=True, timeout=90)
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.split(":")[0]
    assert "4/4" in submitted.stderr  # the progress bar reached the end
    status = subprocess.run([*base, "status", batch_id, *auth], capture_output=True,
                            text=True, timeout=30)
    assert "completed (4 completed, 0 failed of 4)" in status.stdout
    results = subprocess.run([*base, "results", batch_id, "-o", str(tmp_path / "again.jsonl"),
                              *auth], capture_output=True, text=True, timeout=30)
    assert results.returncode == 0, results.stderr
    out = [json.loads(x) for x in (tmp_path / "again.jsonl").read_text().splitlines()]
    assert [o["custom_id"] for o in out] == [f"req-{i}" for i in range(4)]
    assert (tmp_path / "out.jsonl").read_text() == (tmp_path / "again.jsonl").read_text()
    missing = subprocess.run([*base, "status", "batch_nope", *auth], capture_output=True,
                             text=True, timeout=30)
    assert missing.returncode == 2 and "No batch found" in missing.stderr


@pytest.mark.timeout(60)
def test_metrics_count_lines_and_batches(server: Server, client: openai.OpenAI) -> None:
    batch = _wait(client, client.batches.create(
        input_file_id=_upload(client, chat_lines(2)), endpoint="/v1/chat/completions",
        completion_window="24h").id)
    assert batch.status == "completed"
    deadline = time.monotonic() + 10
    while True:  # the gauges follow within a monitor period
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        if metric_value(text, "surge:batch_api_batches", status="completed") >= 1 or \
                time.monotonic() > deadline:
            break
        time.sleep(0.1)  # polling interval
    assert metric_value(text, "surge:batch_api_batches", status="completed") >= 1
    assert metric_value(text, "surge:batch_api_lines_total", result="completed") >= 2
    assert "surge:batch_api_queue_depth" in text
    raw = httpx.get(f"{server.url}/v1/batches/{batch.id}", timeout=10,
                    headers={"Authorization": f"Bearer {KEY}"}).json()
    assert done(raw) == 2  # the raw API agrees with the client

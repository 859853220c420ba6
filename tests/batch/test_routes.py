"""The Files and Batches routes against a real `surge serve`: a batch's input file cannot be
deleted before the batch ends (the batch needs it to expire its unanswered lines and to resume
after a restart; without it the batch stayed `finalizing` forever and the server no longer
started), and it can be once the batch ended."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.batch._helpers import Server, chat_lines, jsonl, start_server, submit


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("batch_routes")
    proc = start_server(model_dir, root / "logs", root / "data", "--batch-concurrency", "1")
    yield proc
    proc.stop()


@pytest.mark.timeout(120)
def test_the_input_file_of_an_unfinished_batch_cannot_be_deleted(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=30.0) as http:
        # Enough long lines that the batch is still running when we try.
        uploaded = http.post("/v1/files", data={"purpose": "batch"},
                             files={"file": ("in.jsonl", jsonl(chat_lines(64, max_tokens=40)))})
        assert uploaded.status_code == 200, uploaded.text
        file_id = uploaded.json()["id"]
        batch = http.post("/v1/batches", json={"input_file_id": file_id,
                                               "endpoint": "/v1/chat/completions"}).json()

        refused = http.delete(f"/v1/files/{file_id}")
        assert refused.status_code == 409, refused.text
        error = refused.json()["error"]
        assert error["code"] == "file_in_use" and batch["id"] in error["message"]
        assert http.get(f"/v1/files/{file_id}").status_code == 200  # nothing was lost

        assert http.post(f"/v1/batches/{batch['id']}/cancel").status_code == 200
        ended = server.wait_batch(batch["id"], timeout=90)
        assert ended["status"] == "cancelled"
        deleted = http.delete(f"/v1/files/{file_id}")
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
        assert http.get(f"/v1/files/{file_id}").status_code == 404


def test_an_unknown_file_is_404_not_409(server: Server) -> None:
    response = httpx.delete(f"{server.url}/v1/files/file-unknown", timeout=10.0)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "file_not_found"


@pytest.mark.timeout(180)
def test_a_batch_whose_input_file_vanished_fails_and_the_server_still_starts(
        model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = start_server(model_dir, tmp_path / "logs", data, "--batch-concurrency", "1")
    try:
        with httpx.Client(base_url=first.url, timeout=30.0) as http:
            uploaded = http.post("/v1/files", data={"purpose": "batch"}, files={
                "file": ("in.jsonl", jsonl(chat_lines(64, max_tokens=40)))}).json()
            stuck = http.post("/v1/batches", json={"input_file_id": uploaded["id"],
                                                   "endpoint": "/v1/chat/completions"}).json()
    finally:
        first.kill9()
    # Someone removed the file on disk while the server was down (the API refuses to).
    [input_path] = data.rglob(f"{uploaded['id']}.jsonl")
    input_path.unlink()

    second = start_server(model_dir, tmp_path / "logs", data, "--batch-concurrency", "1")
    try:
        assert second.batch(stuck["id"])["status"] == "failed"
        fresh = submit(second, chat_lines(2, max_tokens=2, prefix="after"))
        assert second.wait_batch(fresh["id"], timeout=90)["status"] == "completed"
        assert "cannot resume" in second.log()
    finally:
        second.stop()


def _poisoned(lines: list[dict]) -> bytes:
    """The same file with a lone surrogate in the first custom_id: valid JSON, not Unicode."""
    return jsonl(lines).replace(b'"custom_id": "req-0"', b'"custom_id": "req-0\\ud800"', 1)


@pytest.mark.timeout(240)
def test_a_batch_file_with_a_lone_surrogate_fails_one_batch_never_the_server(
        model_dir: Path, tmp_path: Path) -> None:
    """Such files were accepted at upload; the batch then answered 500 and stayed validating,
    and every later start crashed in recovery (SQLite refuses the string), on every replica."""
    data = tmp_path / "data"
    lines = chat_lines(64, max_tokens=40)
    first = start_server(model_dir, tmp_path / "logs", data, "--batch-concurrency", "1")
    try:
        with httpx.Client(base_url=first.url, timeout=30.0) as http:
            refused = http.post("/v1/files", data={"purpose": "batch"},
                                files={"file": ("in.jsonl", _poisoned(lines))})
            assert refused.status_code == 400, refused.text
            assert "line 1: 'custom_id' holds a lone UTF-16 surrogate" in refused.text

            # Files stored by a server from before the check: the batch fails, not the server.
            old = http.post("/v1/files", data={"purpose": "batch"},
                            files={"file": ("in.jsonl", jsonl(lines))}).json()
            [old_path] = data.rglob(f"{old['id']}.jsonl")
            old_path.write_bytes(_poisoned(lines))
            created = http.post("/v1/batches", json={"input_file_id": old["id"],
                                                     "endpoint": "/v1/chat/completions"})
            assert created.status_code == 400, created.text
            assert created.json()["error"]["code"] == "invalid_batch_file"
            assert http.delete(f"/v1/files/{old['id']}").status_code == 200  # not stuck (409)

            running = http.post("/v1/files", data={"purpose": "batch"},
                                files={"file": ("in.jsonl", jsonl(lines))}).json()
            stuck = http.post("/v1/batches", json={"input_file_id": running["id"],
                                                   "endpoint": "/v1/chat/completions"}).json()
    finally:
        first.kill9()
    [input_path] = data.rglob(f"{running['id']}.jsonl")
    input_path.write_bytes(_poisoned(lines))  # the restart re-queues unanswered lines from it

    second = start_server(model_dir, tmp_path / "logs", data, "--batch-concurrency", "1")
    try:
        assert second.batch(stuck["id"])["status"] == "failed"
        fresh = submit(second, chat_lines(2, max_tokens=2, prefix="after"))
        assert second.wait_batch(fresh["id"], timeout=90)["status"] == "completed"
        assert "cannot resume" in second.log()
    finally:
        second.stop()


@pytest.mark.timeout(180)
def test_files_and_batches_are_scoped_by_api_key(model_dir: Path, tmp_path: Path) -> None:
    """As OpenAI scopes them by organization: another key's ids are not found (404, never 403,
    which would confirm they exist), and its lists are empty."""
    server = start_server(model_dir, tmp_path / "logs", tmp_path / "data",
                          "--batch-concurrency", "1", "--api-key", "key-a", "--api-key", "key-b")
    a = httpx.Client(base_url=server.url, timeout=30.0, headers={"Authorization": "Bearer key-a"})
    b = httpx.Client(base_url=server.url, timeout=30.0, headers={"Authorization": "Bearer key-b"})
    try:
        uploaded = a.post("/v1/files", data={"purpose": "batch"}, files={
            "file": ("in.jsonl", jsonl(chat_lines(2, max_tokens=2)))}).json()
        file_id = uploaded["id"]
        assert b.post("/v1/batches", json={"input_file_id": file_id,
                                           "endpoint": "/v1/chat/completions"}
                      ).status_code == 404
        batch = a.post("/v1/batches", json={"input_file_id": file_id,
                                            "endpoint": "/v1/chat/completions"}).json()
        for path in (f"/v1/files/{file_id}", f"/v1/files/{file_id}/content",
                     f"/v1/batches/{batch['id']}"):
            assert b.get(path).status_code == 404, path
            assert a.get(path).status_code == 200, path
        assert b.delete(f"/v1/files/{file_id}").status_code == 404
        assert b.post(f"/v1/batches/{batch['id']}/cancel").status_code == 404
        assert b.get("/v1/files").json()["data"] == []
        assert b.get("/v1/batches").json()["data"] == []
        assert [f["id"] for f in a.get("/v1/files").json()["data"]] == [file_id]

        deadline = time.monotonic() + 90
        while (done := a.get(f"/v1/batches/{batch['id']}").json())["status"] != "completed":
            assert time.monotonic() < deadline, done
            time.sleep(0.1)  # polling the batch
        # Its results belong to the batch's key too.
        assert a.get(f"/v1/files/{done['output_file_id']}/content").status_code == 200
        assert b.get(f"/v1/files/{done['output_file_id']}/content").status_code == 404
    finally:
        a.close()
        b.close()
        server.stop()

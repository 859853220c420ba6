"""Batch lines with tools: each line goes through /v1/chat/completions in the server, so tool
calls come back as they do online (constrained, ``finish_reason: "tool_calls"``) and a bad
``tools`` field fails its own line with the endpoint's 400."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import pytest

from tests.batch._helpers import TERMINAL, Server, output_lines, start_server, submit

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
          "required": ["city"], "additionalProperties": False}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("tools_batch")
    proc = start_server(model_dir, root / "logs", root / "data")
    yield proc
    proc.stop()


@pytest.mark.timeout(180)
def test_batch_lines_call_tools(server: Server) -> None:
    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "tiny", "max_tokens": 80, "seed": i, "tools": [TOOL],
                       "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                       "messages": [{"role": "user", "content": f"Weather {i}?"}]}}
             for i in range(4)]
    lines[2]["body"]["tools"] = [TOOL, TOOL]  # duplicate names: this line alone fails
    batch = submit(server, lines)
    deadline = time.monotonic() + 120
    while batch["status"] not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.1)  # polling interval
        batch = httpx.get(f"{server.url}/v1/batches/{batch['id']}", timeout=30).json()
    assert batch["status"] == "completed", batch
    output = output_lines(server, batch["output_file_id"])
    assert [o["custom_id"] for o in output] == ["req-0", "req-1", "req-3"]
    for entry in output:
        choice = entry["response"]["body"]["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        [call] = choice["message"]["tool_calls"]
        assert call["function"]["name"] == "get_weather"
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMA)
    [error] = output_lines(server, batch["error_file_id"])
    assert error["custom_id"] == "req-2" and error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["param"] == "tools[1].function.name"

"""Errors come back in OpenAI's shape with the right status and the field they are about."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("body", "param", "words"), [
    ({"prompt": "hi", "temperature": -1}, "temperature", ["greater than or equal to 0"]),
    ({"prompt": "hi", "top_p": 1.5}, "top_p", ["less than or equal to 1"]),
    ({"prompt": "hi", "n": 0}, "n", ["greater than or equal to 1"]),
    ({"prompt": "hi", "logprobs": 50}, "logprobs", ["20"]),
    ({"prompt": {"text": "hi"}}, "prompt", ["a string", "token ids"]),
    ({"prompt": [1, "a"]}, "prompt", ["a string", "token ids"]),
    ({"prompt": []}, "prompt", ["empty"]),
    ({"prompt": [[]]}, "prompt", []),
    ({"prompt": [999999]}, "prompt", ["unknown", "[0, 2047]"]),
    ({"max_tokens": 4}, "prompt", ["required"]),
    ({"prompt": "hi", "stop": [""]}, "stop", ["non-empty"]),
    ({"prompt": "hi", "suffix": "x"}, "suffix", []),
    ({"prompt": "hi", "logit_bias": {"5": 1}}, "logit_bias", []),
    ({"prompt": "hi", "seed": 2**70}, "seed", []),
])
def test_completion_400_names_the_field(client: httpx.Client, body: dict[str, Any],
                                        param: str, words: list[str]) -> None:
    error = _error(client.post(COMPLETIONS, json=body), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert all(word in error["message"] for word in words), error["message"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("body", "param", "words"), [
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role",
     ["'system'", "'user'", "'assistant'"]),
    ({"messages": []}, "messages", ["at least 1"]),
    ({"messages": [{"role": "user"}]}, "messages[0].content", ["null"]),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs",
     ["logprobs"]),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     "tools[0].function", ["required"]),
])
def test_chat_400_names_the_field(client: httpx.Client, body: dict[str, Any], param: str,
                                  words: list[str]) -> None:
    error = _error(client.post(CHAT, json=body), 400)
    assert error["param"] == param
    assert all(word in error["message"] for word in words), error["message"]


@pytest.mark.timeout(30)
def test_body_that_is_not_json_is_400(client: httpx.Client) -> None:
    error = _error(client.post(COMPLETIONS, content=b"{not json",
                               headers={"content-type": "application/json"}), 400)
    assert "JSON" in error["message"]
    error = _error(client.post(COMPLETIONS, json=["a", "list"]), 400)
    assert "JSON object" in error["message"]


@pytest.mark.timeout(30)
def test_context_overflow_gives_the_numbers(client: httpx.Client) -> None:
    error = _error(client.post(COMPLETIONS, json={"prompt": [5] * 100, "max_tokens": 2000}),
                   400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    assert error["message"].startswith(
        "This model's maximum context length is 2048 tokens. However, you requested 2100 "
        "tokens (100 in the prompt, 2000 for the completion).")
    error = _error(client.post(COMPLETIONS, json={"prompt": [5] * 2048, "max_tokens": 1}), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"


@pytest.mark.timeout(30)
def test_unknown_model_and_route_are_404(client: httpx.Client) -> None:
    error = _error(client.post(CHAT, json={"model": "gpt-4o", "messages": [
        {"role": "user", "content": "hi"}]}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'tiny'" in error["message"]
    error = _error(client.get("/v1/nothing-here"), 404)
    assert "/v1/nothing-here" in error["message"]


@pytest.mark.timeout(30)
def test_oversized_body_is_413_declared_or_chunked(client: httpx.Client) -> None:
    big = b'{"prompt": "' + b"a" * (2 << 20) + b'"}'
    error = _error(client.post(COMPLETIONS, content=big,
                               headers={"content-type": "application/json"}), 413)
    assert str(1 << 20) in error["message"] and error["code"] == "request_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted while reading
        for start in range(0, len(big), 1 << 16):
            yield big[start:start + (1 << 16)]

    error = _error(client.post(COMPLETIONS, content=chunked(),
                               headers={"content-type": "application/json"}), 413)
    assert error["code"] == "request_too_large"


@pytest.mark.timeout(30)
def test_tokenize_detokenize_round_trip(client: httpx.Client) -> None:
    tokens = client.post("/tokenize", json={"prompt": "hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 2048
    text = client.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text.strip() == "hello world"
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 200 and chat.json()["count"] > 1
    error = _error(client.post("/detokenize", json={"tokens": [10**6]}), 400)
    assert error["param"] == "tokens"
    error = _error(client.post("/tokenize", json={}), 400)
    assert "prompt" in error["message"] and "messages" in error["message"]


# A lone surrogate is valid JSON (`"\ud800"`), not Unicode text: it gave 500 wherever it went
# (the tokenizer, SQLite, or the error message that echoed it).
_LONE = "tiny\\ud800"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("path", "body", "param"), [
    (CHAT, f'{{"model": "{_LONE}", "messages": [{{"role": "user", "content": "hi"}}]}}',
     "model"),
    (COMPLETIONS, f'{{"model": "tiny", "prompt": "{_LONE}", "max_tokens": 1}}', "prompt"),
    (CHAT, f'{{"messages": [{{"role": "user", "content": "{_LONE}"}}]}}',
     "messages[0].content"),
    ("/v1/embeddings", f'{{"model": "{_LONE}", "input": "hi"}}', "model"),
    ("/tokenize", f'{{"model": "tiny", "prompt": "{_LONE}"}}', "prompt"),
    ("/v1/batches", f'{{"input_file_id": "{_LONE}", "endpoint": "/v1/completions"}}',
     "input_file_id"),
    ("/api/apps/writing/generations",
     f'{{"template": "summary", "inputs": {{"text": "{_LONE}"}}}}', "inputs.text"),
    ("/api/apps/chat/sessions", f'{{"title": "{_LONE}"}}', "title"),
])
def test_a_lone_surrogate_is_400_naming_the_field(client: httpx.Client, path: str, body: str,
                                                   param: str) -> None:
    response = client.post(path, content=body.encode(),
                           headers={"content-type": "application/json"})
    error = _error(response, 400)
    assert error["param"] == param and error["code"] == "invalid_unicode", error
    assert "lone UTF-16 surrogate" in error["message"]


def test_an_error_message_that_echoes_a_lone_surrogate_still_encodes() -> None:
    from surge.http.errors import APIError, error_response, sse_error_event

    error = APIError(404, "No file found with id 'a\ud800'", param="file\udc00")
    assert b"a\\\\ud800" in error_response(error).body  # the escape, shown as text
    assert b"file\\\\udc00" in sse_error_event(error)

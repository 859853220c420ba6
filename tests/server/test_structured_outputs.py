"""Structured outputs over HTTP against a real `surge serve` (random-weight tiny model): the
official client's ``chat.completions.parse`` with a Pydantic model, vLLM's guided_* fields,
400s naming the field, and vLLM fields Surge does not implement refused by name."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from surge.http.sse import iter_sse_lines
from tests.server._helpers import ServerProcess

MESSAGES = [{"role": "user", "content": "Who are you?"}]


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)
    pet: str | None = Field(max_length=6)


@pytest.fixture
def sync_client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.mark.timeout(180)
def test_openai_parse_returns_a_pydantic_object(sync_client: openai.OpenAI) -> None:
    for seed in (None, 1, 2):
        completion = sync_client.chat.completions.parse(
            model="tiny", messages=MESSAGES, response_format=Person, max_tokens=80,
            temperature=0 if seed is None else 1.0, seed=seed)
        message = completion.choices[0].message
        assert completion.choices[0].finish_reason == "stop", message.content
        assert isinstance(message.parsed, Person)
        assert 0 <= message.parsed.age <= 120 and len(message.parsed.name) <= 8


@pytest.mark.timeout(120)
def test_streamed_json_schema_chat_is_valid_json(client: httpx.Client) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {
        "type": "integer", "minimum": 1, "maximum": 9}}, "required": ["ok", "n"],
        "additionalProperties": False}
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 40, "temperature": 0,
            "stream": True, "response_format": {"type": "json_schema", "json_schema": {
                "name": "check", "schema": schema, "strict": True}}}
    text = ""
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for line in iter_sse_lines(response):
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["delta"].get("content") or ""
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra, check", [
    ({"guided_choice": ["red", "green"]}, lambda t: t in ("red", "green")),
    ({"guided_regex": "[0-9]{2}:[0-9]{2}"}, lambda t: re.fullmatch("[0-9]{2}:[0-9]{2}", t)),
    ({"guided_json": {"type": "object", "properties": {"a": {"enum": [1, 2]}},
                      "required": ["a"], "additionalProperties": False}},
     lambda t: json.loads(t)["a"] in (1, 2)),
    ({"guided_grammar": 'root ::= "yes" | "no"'}, lambda t: t in ("yes", "no")),
    ({"structured_outputs": {"choice": ["up", "down"]}}, lambda t: t in ("up", "down")),
    ({"response_format": {"type": "json_object"}, "max_tokens": 120, "seed": 3,
      "temperature": 0.8}, lambda t: isinstance(json.loads(t), dict)),
])
def test_completions_honour_vllm_guided_fields(client: httpx.Client, extra: dict,
                                               check: object) -> None:
    body = {"model": "tiny", "prompt": "Answer:", "max_tokens": 40, "temperature": 0, **extra}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and check(choice["text"]), choice  # type: ignore[operator]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("extra, param, words", [
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "strng"}}}},
     "guided_json", "strng"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(["}}}}}},
     "response_format", "regex"),
    ({"guided_regex": "[a-"}, "guided_regex", "unclosed"),
    ({"guided_grammar": "root ::= missing"}, "guided_grammar", "missing"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "required"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_regex", "at most one"),
    ({"use_beam_search": True}, "use_beam_search", "not supported"),
    ({"allowed_token_ids": [1], "bad_words": ["x"]}, "allowed_token_ids", "bad_words"),
    ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend", "not supported"),
])
def test_bad_constraints_and_unimplemented_fields_are_400_naming_them(
        client: httpx.Client, extra: dict, param: str, words: str) -> None:
    for path, base in (("/v1/completions", {"prompt": "Hi"}),
                       ("/v1/chat/completions", {"messages": MESSAGES})):
        response = client.post(path, json={"model": "tiny", "max_tokens": 4, **base, **extra})
        assert response.status_code == 400, (path, response.text)
        error = response.json()["error"]
        assert error["param"] == param and words in error["message"], error


@pytest.mark.timeout(60)
def test_vllm_fields_at_their_defaults_are_accepted(client: httpx.Client) -> None:
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 2, "use_beam_search": False,
            "spaces_between_special_tokens": True, "prompt_logprobs": None,
            "guided_decoding_backend": "guidance", "some_other_servers_field": 1}
    assert client.post("/v1/completions", json=body).status_code == 200

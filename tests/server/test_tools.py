"""Tool calling against a real `surge serve` (random-weight tiny model, whose template has no
tool support, so Surge's default tool prompt is used): the official `openai` client and
LangChain's ``bind_tools``; forced calls always validate against the function's schema;
streamed deltas reassemble to the non-streamed answer; ``tool_choice: "none"`` never calls;
each bad input is a 400 naming the field and leaves other requests alone."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from surge.http.sse import iter_sse_lines
from tests.server._helpers import ServerProcess, start_server

WEATHER_SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 16},
    "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "days"], "additionalProperties": False}
ORDER_SCHEMA = {"type": "object", "properties": {
    "order_id": {"type": "string", "pattern": "^SRG-[0-9]{4}$"}},
    "required": ["order_id"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                      "parameters": WEATHER_SCHEMA}},
    {"type": "function", "function": {"name": "order_status", "description": "Order status",
                                      "parameters": ORDER_SCHEMA}},
]
SCHEMAS = {"get_weather": WEATHER_SCHEMA, "order_status": ORDER_SCHEMA}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris this week?"}]


@pytest.fixture
def sync_client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _validate(calls: list[Any]) -> None:
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


@pytest.mark.timeout(240)
@pytest.mark.parametrize("choice, names", [
    ("required", {"get_weather", "order_status"}),
    ({"type": "function", "function": {"name": "order_status"}}, {"order_status"}),
])
def test_forced_calls_always_validate(sync_client: openai.OpenAI, choice: Any,
                                      names: set[str]) -> None:
    for seed in range(4):
        completion = sync_client.chat.completions.create(
            model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice=choice,
            parallel_tool_calls=False, max_tokens=120, temperature=1.0, seed=seed)
        choice0 = completion.choices[0]
        assert choice0.finish_reason == "tool_calls", choice0
        calls = choice0.message.tool_calls or []
        assert len(calls) == 1 and calls[0].function.name in names
        assert choice0.message.content is None
        _validate(calls)


@pytest.mark.timeout(240)
def test_parallel_required_calls_validate(sync_client: openai.OpenAI) -> None:
    completion = sync_client.chat.completions.create(
        model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", max_tokens=200,
        temperature=1.0, seed=5)
    calls = completion.choices[0].message.tool_calls or []
    assert calls, completion
    assert len({c.id for c in calls}) == len(calls)
    if completion.choices[0].finish_reason == "length":
        calls = calls[:-1]  # the last call may be cut off (as OpenAI returns it)
    else:
        assert completion.choices[0].finish_reason == "tool_calls"
    _validate(calls)


def _stream(client: httpx.Client, body: dict) -> tuple[str | None, list[dict], str, list[dict]]:
    """(content, calls, finish_reason, every delta) of a streamed chat completion."""
    content, calls, finish, deltas = None, {}, "", []
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as reply:
        assert reply.status_code == 200
        for line in iter_sse_lines(reply):
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:])["choices"]:
                delta = choice["delta"]
                deltas.append(delta)
                if delta.get("content"):
                    content = (content or "") + delta["content"]
                for part in delta.get("tool_calls", []):
                    if part["index"] not in calls:
                        assert part["id"] and part["function"]["name"], part  # id, name first
                        assert part["function"]["arguments"] == ""
                        calls[part["index"]] = {"name": part["function"]["name"],
                                                "arguments": ""}
                    else:
                        assert "id" not in part and "name" not in part["function"]
                        calls[part["index"]]["arguments"] += part["function"]["arguments"]
                finish = choice["finish_reason"] or finish
    return content, [calls[i] for i in sorted(calls)], finish, deltas


@pytest.mark.timeout(240)
@pytest.mark.parametrize("choice, parallel", [
    ("required", False), ("required", True),
    ({"type": "function", "function": {"name": "get_weather"}}, None), ("auto", None)])
def test_streamed_deltas_reassemble_to_the_non_streamed_answer(
        client: httpx.Client, choice: Any, parallel: bool | None) -> None:
    body = {"model": "tiny", "messages": MESSAGES, "tools": TOOLS, "tool_choice": choice,
            "max_tokens": 150, "temperature": 0}
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    content, calls, finish, deltas = _stream(client, body)
    expected = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                for c in whole["message"].get("tool_calls") or []]
    assert calls == expected
    assert finish == whole["finish_reason"]
    assert (content or "").strip() == (whole["message"]["content"] or "").strip()
    assert len(deltas) > len(calls) + 2 or not calls  # arguments came in fragments
    if choice != "auto":
        assert calls


@pytest.mark.timeout(240)
def test_tool_choice_none_never_calls(sync_client: openai.OpenAI, client: httpx.Client) -> None:
    # Even a history that ends in a tool result, which invites another call.
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 2}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "<tool_call>\nsunny"}]
    for seed in range(3):
        completion = sync_client.chat.completions.create(
            model="tiny", messages=messages, tools=TOOLS, tool_choice="none", max_tokens=40,
            temperature=1.0, seed=seed)
        assert completion.choices[0].message.tool_calls is None
        assert completion.choices[0].finish_reason in ("stop", "length")
    content, calls, finish, _ = _stream(client, {
        "model": "tiny", "messages": messages, "tools": TOOLS, "tool_choice": "none",
        "max_tokens": 40})
    assert calls == [] and finish in ("stop", "length") and content


@pytest.mark.timeout(120)
def test_tool_history_is_accepted(sync_client: openai.OpenAI) -> None:
    completion = sync_client.chat.completions.create(model="tiny", max_tokens=8, messages=[
        *MESSAGES, {"role": "assistant", "tool_calls": [{"id": "call_9", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "{\"temp_c\": 4}"}], tools=TOOLS)
    assert completion.choices[0].finish_reason in ("stop", "length", "tool_calls")


BAD = [
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].function.name", "unique"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "nope"),
    ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice", "allowed"),
    ({"tool_choice": "required"}, "tool_choice", "no 'tools'"),
    ({"tools": TOOLS, "messages": [{"role": "tool", "content": "12 C"}]},
     "messages[0].tool_call_id", "required"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "strng"}}}}}]},
     "tools[0].function.parameters", "strng"),
    ({"tools": [TOOLS[0], {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(["}}}}}]},
     "tools[1].function.parameters", "invalid"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "array"}}}]}, "tools[0].function.parameters", "object"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]},
     "tools[0].function.name", "allowed"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice", "cannot be combined"),
    ({"tools": TOOLS, "messages": [{"role": "user", "content": "x", "tool_calls": []}]},
     "messages[0].tool_calls", "assistant"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("extra, param, words", BAD)
def test_bad_tool_input_is_400_naming_the_field(client: httpx.Client, extra: dict, param: str,
                                                words: str) -> None:
    reply = client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": MESSAGES, "max_tokens": 4, **extra})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and words in error["message"], error


@pytest.mark.timeout(240)
def test_bad_tools_do_not_affect_other_requests(server: ServerProcess) -> None:
    good = {"model": "tiny", "messages": MESSAGES, "tools": TOOLS, "tool_choice": "required",
            "parallel_tool_calls": False, "max_tokens": 100, "temperature": 0}

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            bad = [http.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES,
                                                           "max_tokens": 4, **extra})
                   for extra, _, _ in BAD]
            return await asyncio.gather(*bad, *(http.post("/v1/chat/completions", json=good)
                                                for _ in range(3)))

    replies = asyncio.run(run())
    assert [r.status_code for r in replies] == [400] * len(BAD) + [200] * 3
    answers = [r.json()["choices"][0] for r in replies[len(BAD):]]
    assert all(a["finish_reason"] == "tool_calls" for a in answers)
    assert len({json.dumps(a["message"]["tool_calls"][0]["function"]) for a in answers}) == 1


@pytest.mark.timeout(240)
def test_langchain_bind_tools(server: ServerProcess) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    class OrderStatus(BaseModel):
        """Look up the status of an order."""

        order_id: str = Field(pattern="^SRG-[0-9]{4}$")

    llm = langchain_openai.ChatOpenAI(base_url=f"{server.url}/v1", api_key="unused",
                                      model="tiny", max_tokens=200, temperature=0.7,
                                      max_retries=0)
    bound = llm.bind_tools([OrderStatus], tool_choice="OrderStatus")
    for _ in range(3):
        message = bound.invoke("Where is my order SRG-1234?")
        assert len(message.tool_calls) == 1, message
        call = message.tool_calls[0]
        assert call["name"] == "OrderStatus" and call["id"]
        OrderStatus.model_validate(call["args"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smollm2_fills_arguments_from_the_question(smollm2_gguf: Path, tmp_path: Path) -> None:
    """The real default model (no tool support in its template: Surge's default tool prompt)
    names the city the user asked about; streamed and whole answers agree."""
    server = start_server(smollm2_gguf, tmp_path)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        for city in ("Paris", "Berlin"):
            question = [{"role": "user", "content": f"What is the weather in {city} today?"}]
            completion = client.chat.completions.create(
                model=model, messages=question, tools=TOOLS, tool_choice="required",
                parallel_tool_calls=False, temperature=0, max_tokens=60)
            [call] = completion.choices[0].message.tool_calls or []
            assert call.function.name == "get_weather"
            arguments = json.loads(call.function.arguments)
            jsonschema.validate(arguments, WEATHER_SCHEMA)
            assert arguments["city"] == city
            stream = client.chat.completions.create(
                model=model, messages=question, tools=TOOLS, tool_choice="required",
                parallel_tool_calls=False, temperature=0, max_tokens=60, stream=True)
            fragments = [c.choices[0].delta.tool_calls[0] for c in stream
                         if c.choices and c.choices[0].delta.tool_calls]
            assert fragments[0].function.name == "get_weather" and fragments[0].id
            assert "".join(f.function.arguments or "" for f in fragments) == \
                call.function.arguments
    finally:
        server.stop()


@pytest.mark.timeout(240)
def test_each_of_n_choices_streams_its_own_calls(client: httpx.Client) -> None:
    body = {"model": "tiny", "messages": MESSAGES, "tools": TOOLS, "tool_choice": "required",
            "parallel_tool_calls": False, "max_tokens": 120, "n": 2, "seed": 11,
            "temperature": 1.0, "stream": True}
    heads: dict[int, list[dict]] = {0: [], 1: []}
    arguments = {0: "", 1: ""}
    finishes = {}
    with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        for line in iter_sse_lines(reply):
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:])["choices"]:
                for part in choice["delta"].get("tool_calls", []):
                    if "id" in part:
                        heads[choice["index"]].append(part)
                    else:
                        arguments[choice["index"]] += part["function"]["arguments"]
                if choice["finish_reason"]:
                    finishes[choice["index"]] = choice["finish_reason"]
    assert finishes == {0: "tool_calls", 1: "tool_calls"}
    assert [len(h) for h in heads.values()] == [1, 1]
    assert heads[0][0]["id"] != heads[1][0]["id"]
    for index in (0, 1):
        jsonschema.validate(json.loads(arguments[index]), SCHEMAS[
            heads[index][0]["function"]["name"]])

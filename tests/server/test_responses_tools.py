"""Function tools on ``POST /v1/responses`` against a real `surge serve` (random-weight tiny
model): forced calls are ``function_call`` items whose arguments validate against the tool's
schema; streamed events add up to the non-streamed answer; a conversation with calls and
their outputs is the chat path's conversation; LangChain's ``bind_tools`` with
``use_responses_api``; bad tool input is a 400 naming the Responses field."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.server._helpers import ServerProcess

WEATHER_SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 16},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}
ORDER_SCHEMA = {"type": "object", "properties": {
    "order_id": {"type": "string", "pattern": "^SRG-[0-9]{4}$"}},
    "required": ["order_id"], "additionalProperties": False}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather forecast",
          "parameters": WEATHER_SCHEMA},
         {"type": "function", "name": "order_status", "description": "Order status",
          "parameters": ORDER_SCHEMA}]
SCHEMAS = {"get_weather": WEATHER_SCHEMA, "order_status": ORDER_SCHEMA}
QUESTION = "Where is my order SRG-1234?"


@pytest.fixture
def sync_client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _calls(response: Any) -> list[Any]:
    calls = [item for item in response.output if item.type == "function_call"]
    for call in calls:
        assert call.call_id.startswith("call_") and call.id.startswith("fc_")
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    return calls


@pytest.mark.timeout(240)
@pytest.mark.parametrize("choice, names", [
    ("required", {"get_weather", "order_status"}),
    ({"type": "function", "name": "order_status"}, {"order_status"}),
])
def test_forced_calls_are_function_call_items(sync_client: openai.OpenAI, choice: Any,
                                              names: set[str]) -> None:
    for temperature in (0.0, 1.0, 1.0):
        response = sync_client.responses.create(
            model="tiny", input=QUESTION, tools=TOOLS, tool_choice=choice,
            parallel_tool_calls=False, max_output_tokens=120, temperature=temperature)
        assert response.status == "completed", response.output
        calls = _calls(response)
        assert len(calls) == 1 and calls[0].name in names
        assert [item.type for item in response.output] == ["function_call"]
        assert response.tools[0].name == "get_weather"


@pytest.mark.timeout(240)
def test_streamed_calls_add_up_to_the_answer(sync_client: openai.OpenAI) -> None:
    request = dict(model="tiny", input=QUESTION, tools=TOOLS, tool_choice="required",
                   max_output_tokens=160, temperature=0)
    whole = sync_client.responses.create(**request)
    events = list(sync_client.responses.create(**request, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert events[-1].type == f"response.{whole.status}"
    streamed = [(i.name, i.arguments, i.status) for i in final.output]
    assert streamed == [(i.name, i.arguments, i.status) for i in whole.output]
    for index, item in enumerate(final.output):
        fragments = "".join(e.delta for e in events
                            if e.type == "response.function_call_arguments.delta"
                            and e.output_index == index)
        done = next(e for e in events if e.type == "response.function_call_arguments.done"
                    and e.output_index == index)
        added = next(e for e in events if e.type == "response.output_item.added"
                     and e.output_index == index)
        assert fragments == done.arguments == item.arguments
        assert added.item.call_id == item.call_id and added.item.name == item.name
        assert added.item.arguments == ""


@pytest.mark.timeout(120)
def test_tool_choice_none_never_calls(sync_client: openai.OpenAI) -> None:
    response = sync_client.responses.create(model="tiny", input=QUESTION, tools=TOOLS,
                                            tool_choice="none", max_output_tokens=40,
                                            temperature=1.0)
    assert [item.type for item in response.output] == ["message"]


@pytest.mark.timeout(120)
def test_calls_and_outputs_in_the_input_are_the_chat_conversation(
        sync_client: openai.OpenAI, client: httpx.Client) -> None:
    """The items of an earlier turn (a call and its output) give the same prompt and greedy
    answer as the chat messages they stand for."""
    arguments = '{"order_id": "SRG-1234"}'
    response = sync_client.responses.create(
        model="tiny", instructions="You help customers.", tools=TOOLS, temperature=0,
        max_output_tokens=12, input=[
            {"role": "user", "content": QUESTION},
            {"type": "function_call", "call_id": "call_1", "name": "order_status",
             "arguments": arguments},
            {"type": "function_call_output", "call_id": "call_1",
             "output": '{"status": "shipped"}'}])
    chat = client.post("/v1/chat/completions", json={
        "model": "tiny", "tools": [{"type": "function", "function": {
            k: v for k, v in tool.items() if k != "type"}} for tool in TOOLS],
        "temperature": 0, "max_tokens": 12, "messages": [
            {"role": "system", "content": "You help customers."},
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function", "function": {
                    "name": "order_status", "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "shipped"}'}]})
    assert chat.status_code == 200, chat.text
    assert response.usage.input_tokens == chat.json()["usage"]["prompt_tokens"]
    message = chat.json()["choices"][0]["message"]
    calls = [(c.name, c.arguments) for c in _calls(response)]
    assert calls == [(c["function"]["name"], c["function"]["arguments"])
                     for c in message.get("tool_calls") or []]
    texts = [i.content[0].text for i in response.output if i.type == "message"]
    assert (texts[0] if texts else None) == message["content"]


@pytest.mark.timeout(240)
def test_langchain_bind_tools_with_the_responses_api(server: ServerProcess) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    order_status = {"type": "function", "function": {
        "name": "order_status", "description": "Order status", "parameters": ORDER_SCHEMA}}
    llm = langchain_openai.ChatOpenAI(
        model="tiny", base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
        use_responses_api=True, temperature=0, max_tokens=120)
    answer = llm.bind_tools([order_status], tool_choice="order_status").invoke(QUESTION)
    assert [call["name"] for call in answer.tool_calls] == ["order_status"], answer
    jsonschema.validate(answer.tool_calls[0]["args"], ORDER_SCHEMA)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("extra, param, words", [
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].name", "unique"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice",
     "nope"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "string"}}]},
     "tools[0].parameters", "object"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "strng"}}}}]},
     "tools[0].parameters", "strng"),
    ({"tools": [{"type": "function", "name": "a b"}]}, "tools[0].name", "a-z"),
    ({"tools": TOOLS, "tool_choice": "required", "text": {"format": {"type": "json_object"}}},
     "tool_choice", "text.format"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id",
     "required"),
    ({"input": [{"type": "function_call", "call_id": "c", "arguments": "{}"}]},
     "input[0].name", "required"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": [
        {"type": "input_image"}]}]}, "input[0].output[0].type", "text only"),
])
def test_bad_tool_input_is_400_naming_the_field(client: httpx.Client, extra: dict,
                                                param: str, words: str) -> None:
    body = {"model": "tiny", "input": "Hi", "max_output_tokens": 4, **extra}
    response = client.post("/v1/responses", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error

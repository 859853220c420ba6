"""``POST /v1/responses`` against a real `surge serve` (random-weight tiny model): the official
client's ``responses.create`` (text and streamed events), ``responses.parse`` with a Pydantic
model, LangChain's ``ChatOpenAI(use_responses_api=True)``, and 400s naming the field."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from surge.http.sse import iter_sse_lines
from tests.server._helpers import ServerProcess

MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Who are you?"}]
# The events of a one-message text answer, in OpenAI's order (deltas collapsed to one).
TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added", "response.output_text.delta",
               "response.output_text.done", "response.content_part.done",
               "response.output_item.done"]


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)
    pet: str | None = Field(max_length=6)


@pytest.fixture
def sync_client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _chat_text(client: httpx.Client, **extra: object) -> dict:
    body = {"model": "tiny", "messages": MESSAGES, "temperature": 0, **extra}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.timeout(120)
def test_create_answers_as_the_chat_path_does(sync_client: openai.OpenAI,
                                              client: httpx.Client) -> None:
    """instructions + message items are the chat messages: greedy text and token counts equal
    the chat completion's; max_output_tokens reached makes the response incomplete."""
    chat = _chat_text(client, max_tokens=12)
    response = sync_client.responses.create(
        model="tiny", instructions="Be brief.", input=[{"role": "user", "content": [
            {"type": "input_text", "text": "Who are you?"}]}],
        max_output_tokens=12, temperature=0)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.output_text == chat["choices"][0]["message"]["content"]
    assert response.usage.input_tokens == chat["usage"]["prompt_tokens"]
    assert response.usage.output_tokens == 12 == chat["usage"]["completion_tokens"]
    assert response.usage.total_tokens == response.usage.input_tokens + 12
    assert response.status == "incomplete" and chat["choices"][0]["finish_reason"] == "length"
    assert response.incomplete_details.reason == "max_output_tokens"
    message = response.output[0]
    assert message.type == "message" and message.role == "assistant"
    assert message.status == "incomplete" and message.content[0].type == "output_text"
    assert response.instructions == "Be brief." and response.max_output_tokens == 12


@pytest.mark.timeout(120)
def test_a_string_input_is_one_user_message(sync_client: openai.OpenAI,
                                            client: httpx.Client) -> None:
    chat = client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6,
        "temperature": 0}).json()
    response = sync_client.responses.create(model="tiny", input="Hello", max_output_tokens=6,
                                            temperature=0, metadata={"k": "v"})
    assert response.output_text == chat["choices"][0]["message"]["content"]
    assert response.metadata == {"k": "v"} and response.store is False


@pytest.mark.timeout(120)
def test_streamed_events_are_numbered_and_add_up_to_the_answer(
        sync_client: openai.OpenAI) -> None:
    whole = sync_client.responses.create(model="tiny", instructions="Be brief.",
                                         input="Who are you?", max_output_tokens=10,
                                         temperature=0)
    events = list(sync_client.responses.create(
        model="tiny", instructions="Be brief.", input="Who are you?", max_output_tokens=10,
        temperature=0, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    collapsed = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
    assert collapsed == [*TEXT_EVENTS, "response.incomplete"], kinds
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = next(e for e in events if e.type == "response.output_text.done")
    final = events[-1].response
    assert deltas == done.text == final.output_text == whole.output_text
    assert final.usage.output_tokens == 10 and final.status == "incomplete"
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
    assert item_ids == {final.output[0].id}
    assert events[0].response.status == "in_progress" and events[0].response.output == []


@pytest.mark.timeout(120)
def test_a_stream_that_stops_ends_with_response_completed(client: httpx.Client) -> None:
    body = {"model": "tiny", "input": "Pick.", "stream": True, "temperature": 0,
            "text": {"format": {"type": "json_schema", "name": "pick", "schema": {
                "type": "object", "properties": {"color": {"enum": ["red", "blue"]}},
                "required": ["color"], "additionalProperties": False}}}}
    events = []
    with client.stream("POST", "/v1/responses", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in iter_sse_lines(response) if line]
    for name, data in zip(lines[::2], lines[1::2], strict=True):
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        events.append(event)
    final = events[-1]
    assert final["type"] == "response.completed" and final["response"]["status"] == "completed"
    assert json.loads(final["response"]["output"][0]["content"][0]["text"])["color"] in (
        "red", "blue")
    assert final["response"]["text"]["format"]["name"] == "pick"


@pytest.mark.timeout(180)
def test_parse_returns_a_pydantic_object(sync_client: openai.OpenAI) -> None:
    for seed_temperature in (0.0, 1.0):
        response = sync_client.responses.parse(
            model="tiny", input="Describe a person.", text_format=Person,
            max_output_tokens=80, temperature=seed_temperature)
        assert response.status == "completed", response.output_text
        assert isinstance(response.output_parsed, Person)
        jsonschema.validate(json.loads(response.output_text), Person.model_json_schema())


@pytest.mark.timeout(120)
def test_json_object_format_gives_an_object(sync_client: openai.OpenAI) -> None:
    response = sync_client.responses.create(
        model="tiny", input="JSON please", text={"format": {"type": "json_object"}},
        max_output_tokens=120, temperature=0)
    assert response.status == "completed", response.output_text
    assert isinstance(json.loads(response.output_text), dict)


@pytest.mark.timeout(180)
def test_langchain_chat_openai_with_the_responses_api(server: ServerProcess) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(
        model="tiny", base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
        use_responses_api=True, temperature=0, max_tokens=8)
    answer = llm.invoke([("system", "Be brief."), ("human", "Who are you?")])
    assert isinstance(answer.text, str) and answer.text
    assert answer.usage_metadata["output_tokens"] == 8
    streamed = "".join(chunk.text for chunk in llm.stream("Who are you?"))
    assert streamed == llm.invoke("Who are you?").text
    structured = langchain_openai.ChatOpenAI(
        model="tiny", base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
        use_responses_api=True, temperature=0, max_tokens=80).with_structured_output(Person)
    assert isinstance(structured.invoke("Describe a person."), Person)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("extra, param, words", [
    ({"store": True}, "store", "keeps no responses"),
    ({"previous_response_id": "resp_1"}, "previous_response_id", "whole conversation"),
    ({"conversation": "conv_1"}, "conversation", "not supported"),
    ({"background": True}, "background", "not supported"),
    ({"reasoning": {"effort": "high"}}, "reasoning", "not supported"),
    ({"include": ["message.output_text.logprobs"]}, "include", "not supported"),
    ({"input": []}, "input", "empty list"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type", "stored"),
    ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role", "robot"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0].type", "text only"),
    ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]},
     "input[0].content[0].text", "required"),
    ({"input": [{"role": "user", "content": 3}]}, "input[0].content", "allowed"),
    ({"max_output_tokens": 0}, "max_output_tokens", "greater than or equal"),
    ({"max_output_tokens": 10**6}, "max_output_tokens", "maximum context length"),
    ({"temperature": 3}, "temperature", "less than or equal"),
    ({"truncation": "auto"}, "truncation", "disabled"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema",
     "required"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "strng"}}}}}}, "text.format", "strng"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(["}}}}}},
     "text.format", "regex"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type", "function"),
    ({"tool_choice": "required"}, "tool_choice", "tools"),
])
def test_bad_requests_are_400_naming_the_field(client: httpx.Client, extra: dict, param: str,
                                               words: str) -> None:
    body = {"model": "tiny", "input": "Hi", "max_output_tokens": 4, **extra}
    response = client.post("/v1/responses", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
    assert "messages" not in error["message"] and "response_format" not in error["message"]


@pytest.mark.timeout(60)
def test_store_false_and_unknown_model_fields(client: httpx.Client) -> None:
    ok = client.post("/v1/responses", json={"model": "tiny", "input": "Hi", "store": False,
                                            "max_output_tokens": 2, "truncation": "disabled",
                                            "reasoning": None, "include": []})
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["output_tokens"] == 2
    unknown = client.post("/v1/responses", json={"model": "nope", "input": "Hi"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"

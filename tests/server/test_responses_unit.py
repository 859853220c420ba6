"""The Responses API without a server: a request's items as chat messages, and the output
items and events formed from generated text (with the Hermes tool parser), however the text
is chunked."""

from __future__ import annotations

import json
import random

import pytest

from surge.http.errors import APIError
from surge.server.responses import chat_request_of
from surge.server.responses_output import ResponseOutput, SSEEvents
from surge.server.responses_schemas import ResponsesRequest
from surge.server.tools import HermesToolParser, tool_request_of

TOOLS = [{"type": "function", "name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def _request(**fields: object) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"input": "Hi", **fields})


def test_items_become_chat_messages() -> None:
    chat = chat_request_of(_request(instructions="Be brief.", max_output_tokens=9, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Weather "},
                                     {"type": "input_text", "text": "in Paris?"}]},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "Checking.", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather",
         "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather",
         "arguments": '{"city": "Lyon"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "rain"}]}]))
    messages = [m.model_dump(exclude_none=True) for m in chat.messages]
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1] == {"role": "user", "content": "Weather in Paris?"}
    # The assistant's text and both calls are one turn.
    assert messages[2]["content"] == "Checking."
    assert [c["id"] for c in messages[2]["tool_calls"]] == ["c1", "c2"]
    assert messages[3:] == [{"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                            {"role": "tool", "tool_call_id": "c2", "content": "rain"}]
    assert chat.max_tokens == 9 and chat.temperature == 1.0


def test_text_format_becomes_response_format() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    chat = chat_request_of(_request(text={"format": {"type": "json_schema", "name": "x",
                                                     "schema": schema, "strict": True}}))
    assert chat.response_format is not None
    assert chat.response_format.json_schema.schema_ == schema
    plain = chat_request_of(_request(text={"format": {"type": "text"}}))
    assert plain.response_format is None


@pytest.mark.parametrize("fields, param", [
    ({"store": True}, "store"), ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"input": [{"type": "function_call", "call_id": "", "name": "f", "arguments": "{}"}]},
     "input[0].call_id"),
])
def test_unsupported_input_is_refused_by_name(fields: dict, param: str) -> None:
    with pytest.raises(APIError) as caught:
        chat_request_of(_request(**fields))
    assert caught.value.status == 400 and caught.value.param == param


def _streamer() -> object:
    request = tool_request_of(TOOLS, "auto", None)
    assert request is not None
    return HermesToolParser().streamer(request, incremental=True)


def _run(text: str, chunks: list[str], tools: bool) -> tuple[list[dict], list[dict]]:
    output = ResponseOutput(SSEEvents(), _streamer() if tools else None)  # type: ignore[arg-type]
    data = b"".join(b"".join(output.feed(chunk)) for chunk in chunks)
    data += b"".join(output.finish("completed"))
    events = [json.loads(block.split(b"\ndata: ", 1)[1])
              for block in data.split(b"\n\n") if block]
    assert "".join(chunks) == text
    return output.items("completed"), events


def _chunked(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(8, len(text) - 1)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@pytest.mark.parametrize("text, shape", [
    ("Hello there.", [("message", "Hello there.")]),
    ("", [("message", "")]),
    (CALL, [("function_call", '{"city": "Paris"}')]),
    (f"Let me check.\n{CALL}", [("message", "Let me check."),
                                ("function_call", '{"city": "Paris"}')]),
    (f"{CALL}\n{CALL}", [("function_call", '{"city": "Paris"}')] * 2),
    (f"{CALL}\nIt is sunny.", [("function_call", '{"city": "Paris"}'),
                               ("message", "It is sunny.")]),
    ("  Just text\n", [("message", "  Just text\n")]),
])
def test_output_items_do_not_depend_on_chunking(text: str, shape: list) -> None:
    whole, _ = _run(text, [text] if text else [], tools=True)
    assert [(i["type"], _value(i)) for i in whole] == shape
    rng = random.Random(0)
    for _ in range(20 if len(text) > 1 else 0):
        items, events = _run(text, _chunked(text, rng), tools=True)
        assert _without_ids(items) == _without_ids(whole)
        _check_events(events, items)


def test_text_without_tools_is_one_message_even_if_blank() -> None:
    items, events = _run("  \n", ["  ", "\n"], tools=False)
    assert [_text(i) for i in items] == ["  \n"]
    _check_events(events, items)


def _text(item: dict) -> str:
    return item["content"][0]["text"]


def _value(item: dict) -> str:
    """A message's text or a call's arguments."""
    return _text(item) if item["type"] == "message" else item["arguments"]


def _without_ids(items: list[dict]) -> list[dict]:
    return [{k: v for k, v in i.items() if k not in ("id", "call_id")} for i in items]


def _check_events(events: list[dict], items: list[dict]) -> None:
    """Numbered from 0; per item: added, then its deltas, then done events that repeat
    what the deltas added up to, and the final item as the output holds it."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for index, item in enumerate(items):
        mine = [e for e in events if e.get("output_index") == index]
        assert mine[0]["type"] == "response.output_item.added"
        assert mine[-1] == {**mine[-1], "type": "response.output_item.done", "item": item}
        deltas = "".join(e["delta"] for e in mine if e["type"].endswith(".delta"))
        assert deltas == _value(item)

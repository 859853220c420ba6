"""Tool calling without a server: validation (400s naming the field), rendering through the
chat template (native ``tools`` variable or Surge's default Hermes prompt), the calls' grammar
(llguidance, with SmolLM2's real vocabulary), and the streaming assembler (any chunking of the
text gives the same calls as the non-streamed parse, deltas in OpenAI's order)."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import llguidance
import pytest

from surge.http.errors import APIError
from surge.server.tools import (
    HermesToolParser,
    ToolRequest,
    chat_tools_of,
    check_tool_messages,
    render_tool_chat,
    template_supports_tools,
    tool_parser_for,
    tool_request_of,
    tool_stream_choices,
)
from surge.tokenizer import ChatTokenizer, load_tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time"}}

# A Qwen2.5-style template that renders tools itself (as templates with tool support do).
NATIVE_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTOOLS:{% for t in tools %} {{ t.function.name }}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{%- if m.tool_calls %}{% for c in m.tool_calls %}[call {{ c.function.name }} "
    "{{ c.function.arguments | tojson }}]{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _request(*tools: dict, choice: Any = None, parallel: Any = None) -> ToolRequest:
    request = tool_request_of(list(tools), choice, parallel)
    assert request is not None
    return request


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("tools, choice, param, words", [
    ([WEATHER, WEATHER], None, "tools[1].function.name", "unique"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice", "nope"),
    ([WEATHER], "sometimes", "tool_choice", "'required'"),
    ([WEATHER], {"type": "function"}, "tool_choice", "must be"),
    ([], "required", "tool_choice", "no 'tools'"),
    ([{"type": "function", "function": {"name": "a b"}}], None, "tools[0].function.name",
     "a-z"),
    ([{"type": "retrieval"}], None, "tools[0].type", "'function'"),
    ([{"type": "function"}], None, "tools[0].function", "required"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
     None, "tools[0].function.parameters", "type 'object'"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], None,
     "tools[0].function.parameters", "JSON schema"),
])
def test_bad_tools_are_400_naming_the_field(tools: list, choice: Any, param: str,
                                            words: str) -> None:
    with pytest.raises(APIError) as caught:
        tool_request_of(tools, choice, None)
    assert caught.value.status == 400 and caught.value.param == param, caught.value
    assert words in caught.value.message


def test_responses_api_flat_tools_and_choice_are_accepted() -> None:
    flat = {"type": "function", "name": "get_time", "parameters": {"type": "object"}}
    request = tool_request_of([flat], {"type": "function", "name": "get_time"}, False)
    assert request is not None and request.function == "get_time" and not request.parallel


@pytest.mark.parametrize("messages, param", [
    ([{"role": "tool", "content": "12 C"}], "messages[0].tool_call_id"),
    ([{"role": "user", "content": "x", "tool_calls": []}], "messages[0].tool_calls"),
    ([{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "function": {}}]}],
     "messages[0].tool_calls[0].function.name"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 3}}]}],
     "messages[0].tool_calls[0].function.arguments"),
])
def test_bad_tool_messages_are_400_naming_the_field(messages: list, param: str) -> None:
    with pytest.raises(APIError) as caught:
        check_tool_messages(messages)
    assert caught.value.status == 400 and caught.value.param == param


@pytest.mark.parametrize("schema, words", [
    ({"type": "object", "properties": {"a": {"type": "strng"}}}, "strng"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(["}}}, "regex"),
])
def test_uncompilable_parameters_are_400_naming_the_tool(schema: dict, words: str,
                                                         tiny_tokenizer: ChatTokenizer) -> None:
    tools = [WEATHER, {"type": "function", "function": {"name": "bad", "parameters": schema}}]
    with pytest.raises(APIError) as caught:
        asyncio.run(chat_tools_of(tiny_tokenizer, tools, "auto", None, [], False))
    assert caught.value.param == "tools[1].function.parameters", caught.value
    assert words in caught.value.message.lower()


def test_forced_choice_with_response_format_is_400(tiny_tokenizer: ChatTokenizer) -> None:
    with pytest.raises(APIError) as caught:
        asyncio.run(chat_tools_of(tiny_tokenizer, [WEATHER], "required", None, [], True))
    assert caught.value.param == "tool_choice"
    auto = asyncio.run(chat_tools_of(tiny_tokenizer, [WEATHER], "auto", None, [], True))
    assert auto.constraint is None and auto.active  # their constraint wins; calls still parsed


# -- rendering ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_checkpoint: Any) -> ChatTokenizer:
    return load_tokenizer(tiny_checkpoint("tiny-llama"))


HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
     "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 12}"},
]


def test_default_tool_prompt_for_templates_without_tools(tiny_tokenizer: ChatTokenizer) -> None:
    assert not template_supports_tools(tiny_tokenizer.chat_template)
    text = render_tool_chat(tiny_tokenizer, HISTORY, _request(WEATHER), True)
    assert text.startswith("<|im_start|>system\n# Tools")
    assert json.dumps(WEATHER) in text.split("<tools>\n", 1)[1]
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call><|im_end|>') in text
    assert ('<|im_start|>user\n<tool_response>\n{"temp_c": 12}\n</tool_response><|im_end|>\n'
            '<|im_start|>assistant\n') in text
    # tool_choice none: the model is not told about tools at all.
    none = render_tool_chat(tiny_tokenizer, HISTORY[:1], _request(WEATHER, choice="none"), True)
    assert "<tools>" not in none


def test_native_template_gets_tools_and_call_objects(tiny_tokenizer: ChatTokenizer) -> None:
    native = ChatTokenizer(tiny_tokenizer.tokenizer, {**tiny_tokenizer.config,
                                                      "chat_template": NATIVE_TEMPLATE},
                           set(tiny_tokenizer.eos_token_ids))
    assert template_supports_tools(NATIVE_TEMPLATE)
    text = render_tool_chat(native, HISTORY, _request(WEATHER, TIME), True)
    assert text.startswith("<|im_start|>system\nTOOLS: get_weather get_time<|im_end|>")
    assert '[call get_weather {"city": "Paris"}]' in text  # arguments passed as an object
    assert "<|im_start|>tool\n{\"temp_c\": 12}<|im_end|>" in text


def test_parser_registry_picks_by_template_and_name() -> None:
    assert isinstance(tool_parser_for(None), HermesToolParser)
    assert tool_parser_for("anything", name="hermes").name == "hermes"
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        tool_parser_for(None, name="nope")


# -- grammar -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_llg(smollm2_gguf: Path) -> tuple[ChatTokenizer, llguidance.LLTokenizer]:
    tokenizer = load_tokenizer(smollm2_gguf)
    return tokenizer, llguidance.LLTokenizer(tokenizer.tokenizer.to_str(),
                                             n_vocab=tokenizer.vocab_size,
                                             eos_token=sorted(tokenizer.eos_token_ids))


def _accepts(llg: tuple[ChatTokenizer, llguidance.LLTokenizer], request: ToolRequest,
             text: str) -> bool:
    tokenizer, index = llg
    constraint = HermesToolParser().constraint(request)
    assert constraint is not None and constraint.grammar is not None
    matcher = llguidance.LLMatcher(index, llguidance.grammar_from("grammar", constraint.grammar))
    assert not matcher.is_error(), matcher.get_error()
    for token in tokenizer.encode(text, add_special_tokens=False):
        if not matcher.consume_token(token):
            return False
    return matcher.is_accepting()


NAMED = {"type": "function", "function": {"name": "get_time"}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TIME_CALL = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'


@pytest.mark.parametrize("choice, parallel, text, ok", [
    ("auto", None, "Just text, no call.", True),
    ("auto", None, "Let me look. " + CALL, True),
    ("auto", None, "Text " + CALL + "\n" + TIME_CALL, True),
    ("auto", False, CALL + "\n" + TIME_CALL, False),  # one call at most
    ("auto", None, 'x <tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>', False),
    ("auto", None, CALL.replace('"Paris"', "3"), False),  # arguments break the schema
    ("required", None, CALL, True),
    ("required", None, CALL + "\n" + TIME_CALL, True),
    ("required", None, "Sure! " + CALL, False),  # calls only
    ("required", False, CALL + "\n" + TIME_CALL, False),
    (NAMED, None, TIME_CALL, True),
    (NAMED, None, CALL, False),  # the named function only
    (NAMED, None, TIME_CALL + "\n" + TIME_CALL, False),
])
def test_call_grammar(smollm2_llg: Any, choice: Any, parallel: bool | None, text: str,
                      ok: bool) -> None:
    assert _accepts(smollm2_llg, _request(WEATHER, TIME, choice=choice, parallel=parallel),
                    text) is ok


# -- parsing and streaming ---------------------------------------------------------------------

OUTPUTS = [
    "Let me check. " + CALL.replace("Paris", "Paris {x} </tool") + "\n" + TIME_CALL,
    CALL,
    "no calls at all <tool_ and a partial tag",
    'Bad: <tool_call>\n{"name": "get_weather", "arguments": {"city": 3}\n</tool_call> end',
    '<tool_call>\n{"arguments": {"city": "Oslo"}, "name": "get_weather"}\n</tool_call>',
    '<tool_call>\n{"name": "unknown_fn", "arguments": {}}\n</tool_call>',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Ro',  # cut off by length
]


def _assemble(deltas: list[dict]) -> tuple[str, list[tuple[str, str, str]]]:
    """Content and (id, name, arguments) of OpenAI deltas, checking their order."""
    content, calls = "", {}
    for delta in deltas:
        content += delta.get("content", "")
        for part in delta.get("tool_calls", []):
            if part["index"] not in calls:  # the first delta of a call: id, type and name
                assert part["type"] == "function" and part["id"].startswith("call_")
                assert part["function"] == {"name": part["function"]["name"], "arguments": ""}
                calls[part["index"]] = [part["id"], part["function"]["name"], ""]
            else:
                assert set(part) == {"index", "function"} and set(part["function"]) == {
                    "arguments"} and part["function"]["arguments"]
                calls[part["index"]][2] += part["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls)))
    return content, [tuple(calls[i]) for i in sorted(calls)]  # type: ignore[misc]


@pytest.mark.parametrize("incremental", [True, False])
@pytest.mark.parametrize("text", OUTPUTS)
def test_any_chunking_streams_the_non_streamed_calls(text: str, incremental: bool) -> None:
    request, parser = _request(WEATHER, TIME), HermesToolParser()
    whole = parser.parse(request, text, incremental)
    rng = random.Random(text)
    for _ in range(60):
        streamer = parser.streamer(request, incremental)
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, min(30, len(text) - 1))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        deltas = [d for piece in pieces for d in streamer.feed(piece)] + streamer.finish()
        content, calls = _assemble(deltas)
        assert [(n, a) for _, n, a in calls] == [(c.name, c.arguments) for c in whole.calls]
        assert [c.id for c in streamer.calls] == [i for i, _, _ in calls]
        assert content.strip() == (whole.content or "").strip()
    if not incremental:  # (incremental output follows the grammar: these texts cannot occur)
        for call in whole.calls:
            assert isinstance(json.loads(call.arguments), dict)


def test_parse_results() -> None:
    request, parser = _request(WEATHER, TIME), HermesToolParser()
    first = parser.parse(request, OUTPUTS[0], True)
    assert first.content == "Let me check."
    assert [(c.name, c.arguments) for c in first.calls] == [
        ("get_weather", '{"city": "Paris {x} </tool"}'), ("get_time", "{}")]
    assert parser.parse(request, OUTPUTS[2], False).content == OUTPUTS[2]
    invalid = parser.parse(request, OUTPUTS[3], False)  # unconstrained: stays text
    assert invalid.calls == [] and invalid.content == OUTPUTS[3]
    reordered = parser.parse(request, OUTPUTS[4], False).calls[0]
    assert (reordered.name, json.loads(reordered.arguments)) == ("get_weather", {"city": "Oslo"})
    assert parser.parse(request, OUTPUTS[5], False).calls == []  # not an offered function
    cut = parser.parse(request, OUTPUTS[6], True)
    assert [(c.name, c.arguments) for c in cut.calls] == [("get_weather", '{"city": "Ro')]


def test_stream_choices_end_with_tool_calls_finish() -> None:
    request = _request(WEATHER)
    streamer = HermesToolParser().streamer(request, True)
    choices = tool_stream_choices(streamer, 0, CALL, "stop", None, None)
    assert choices[-1]["finish_reason"] == "tool_calls" and choices[-1]["delta"] == {}
    assert all(c["finish_reason"] is None for c in choices[:-1])
    plain = HermesToolParser().streamer(request, True)
    assert tool_stream_choices(plain, 0, "hi", "stop", None, None)[-1]["finish_reason"] == "stop"


def test_call_grammar_generates_only_declared_keys_of_open_objects(smollm2_llg: Any) -> None:
    """Open objects (no additionalProperties) are closed in the grammar: still valid for the
    original schema, and a model cannot ramble on in made-up keys."""
    open_schema = {"type": "function", "function": {"name": "find", "parameters": {
        "type": "object", "properties": {"q": {"type": "string"}, "where": {
            "type": "object", "properties": {"city": {"type": "string"}}}},
        "anyOf": [{"required": ["q"]}, {"required": ["where"]}]}}}
    request = _request(open_schema, choice="required")
    call = '<tool_call>\n{"name": "find", "arguments": {%s}}\n</tool_call>'
    assert _accepts(smollm2_llg, request, call % '"q": "shoes"')
    assert _accepts(smollm2_llg, request, call % '"where": {"city": "Oslo"}')
    assert not _accepts(smollm2_llg, request, call % '"q": "shoes", "extra": 1')
    assert not _accepts(smollm2_llg, request, call % '"where": {"city": "Oslo", "zip": 1}')
    assert not _accepts(smollm2_llg, request, call % "")  # anyOf still applies

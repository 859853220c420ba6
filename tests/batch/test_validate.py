"""The whole input file is validated at upload, each problem named by its line."""

from __future__ import annotations

import json

import pytest

from surge.batch.validate import BatchFileError, validate_batch_file
from surge.server.schemas import ChatCompletionRequest, CompletionRequest

SCHEMAS = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}


def _line(custom_id: str = "a", url: str = "/v1/completions", **body: object) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url,
                       "body": body or {"prompt": "hi", "max_tokens": 2}})


def _validate(*lines: str) -> object:
    return validate_batch_file("\n".join(lines).encode(), schemas=SCHEMAS,
                               served_models={"tiny"})


def test_a_good_file_parses_with_line_numbers() -> None:
    result = _validate(_line("a"), "", _line("b", "/v1/chat/completions", model="tiny",
                                            messages=[{"role": "user", "content": "x"}]))
    assert [(x.line_no, x.custom_id) for x in result.lines] == [(1, "a"), (3, "b")]
    assert result.urls == ["/v1/chat/completions", "/v1/completions"]


@pytest.mark.parametrize(("line", "expected"), [
    ("{not json", "line 2: not valid JSON"),
    ('["a"]', "line 2: must be a JSON object"),
    (_line("a"), "line 2: custom_id 'a' was already used on line 1"),
    (_line("b", "/v1/images"), "line 2: 'url' '/v1/images' is not served here"),
    (_line("b", prompt="x", max_tokens=0), "line 2: body: 'max_tokens'=0 is invalid"),
    (_line("b", max_tokens=3), "line 2: body: 'prompt' is required"),
    (_line("b", prompt="x", stream=True), "line 2: body: 'stream' must be false"),
    (_line("b", prompt="x", model="gpt-4"), "line 2: body: model 'gpt-4' is not served"),
    (json.dumps({"custom_id": "b", "method": "GET", "url": "/v1/completions", "body": {}}),
     "line 2: 'method' must be \"POST\""),
    (json.dumps({"custom_id": "", "method": "POST", "url": "/v1/completions", "body": {}}),
     "line 2: 'custom_id' must be a non-empty string"),
])
def test_each_problem_names_its_line(line: str, expected: str) -> None:
    with pytest.raises(BatchFileError) as info:
        _validate(_line("a"), line)
    assert expected in info.value.message, info.value.message


def test_every_bad_line_is_reported_at_once() -> None:
    with pytest.raises(BatchFileError) as info:
        _validate("x", _line("a"), "y", "z")
    assert [p.line_no for p in info.value.problems] == [1, 3, 4]
    assert info.value.message.startswith("the batch input file has 3 invalid lines")


def test_empty_and_non_utf8_files_are_refused() -> None:
    with pytest.raises(BatchFileError, match="has no requests"):
        _validate("", "  ")
    with pytest.raises(BatchFileError, match="not UTF-8"):
        validate_batch_file(b"\xff\xfe", schemas=SCHEMAS, served_models={"tiny"})


@pytest.mark.parametrize(("line", "field"), [
    (_line("a\ud800"), "'custom_id'"),
    (_line("b", prompt="hi\udc00", max_tokens=2), "'body.prompt'"),
    (_line("b", "/v1/chat/completions", messages=[{"role": "user", "content": "\ud83d"}]),
     "'body.messages[0].content'"),
])
def test_a_lone_surrogate_is_refused_naming_its_line_and_field(line: str, field: str) -> None:
    """Valid JSON that no store accepts: it used to pass upload, then fail the batch with a 500
    and crash every later start in recovery (SQLite refuses the string)."""
    assert "\\ud" in line  # json.dumps escapes it: the file is plain ASCII
    with pytest.raises(BatchFileError) as caught:
        _validate(_line("a0"), line)
    assert f"line 2: {field} holds a lone UTF-16 surrogate" in caught.value.message
    caught.value.message.encode("utf-8")  # the message itself can always be sent


def test_a_surrogate_pair_written_as_escapes_is_valid_text() -> None:
    emoji = json.dumps({"custom_id": "\U0001f600", "method": "POST", "url": "/v1/completions",
                        "body": {"prompt": "\U0001f600", "max_tokens": 2}})
    assert "\\ud83d\\ude00" in emoji
    assert [x.custom_id for x in _validate(emoji).lines] == ["\U0001f600"]

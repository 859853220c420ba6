"""The PII redactor on a table of strings that hold (or only resemble) e-mail addresses, phone
numbers and card numbers, whole and streamed in pieces split at every place."""

from __future__ import annotations

import asyncio

import pytest

from surge.server.schemas import ChatCompletionRequest
from surge.stages.api import StageRequest
from surge.stages.pii import PIIRedactor, luhn_ok, redact

POSITIVE = [
    ("write to john.doe@example.com today", "write to [EMAIL] today"),
    ("A.B-c+tag@mail.co.uk.", "[EMAIL]."),
    ("<x_y%z@sub.domain.io>", "<[EMAIL]>"),
    ("call +1 (555) 123-4567 now", "call [PHONE] now"),
    ("call 555-123-4567", "call [PHONE]"),
    ("call 555.123.4567.", "call [PHONE]."),
    ("uk: +44 20 7946 0958", "uk: [PHONE]"),
    ("fr: 06 12 34 56 78", "fr: [PHONE]"),
    ("e164 +15551234567", "e164 [PHONE]"),
    ("local 555-1234, ok", "local [PHONE], ok"),
    ("visa 4111 1111 1111 1111 exp", "visa [CARD] exp"),
    ("visa 4111-1111-1111-1111", "visa [CARD]"),
    ("mc 5555555555554444", "mc [CARD]"),
    ("amex 378282246310005.", "amex [CARD]."),
    ("two: a@b.io and 4012888888881881", "two: [EMAIL] and [CARD]"),
]
NEGATIVE = [
    "no personal data here",
    "the date 2024-01-15 and 15/01/2024",
    "version 1.2.3 and ip 10.1.20.3",
    "a sum of 1 000 000 dollars",
    "order id 1234567890",
    "not a card 4111 1111 1111 1112",  # fails the Luhn check
    "user@localhost has no domain",
    "an @ sign alone, or a.b@ c",
    "time 12:30:45, score 3-2",
    "short 123-45",
]


@pytest.mark.parametrize(("text", "expected"), POSITIVE)
def test_redacts_what_it_should(text: str, expected: str) -> None:
    assert redact(text) == expected


@pytest.mark.parametrize("text", NEGATIVE)
def test_leaves_what_only_looks_alike(text: str) -> None:
    assert redact(text) == text


def test_luhn() -> None:
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713")
    assert not luhn_ok("4111111111111112") and not luhn_ok("79927398710")


def _streamed(redactor: PIIRedactor, pieces: list[str]) -> str:
    stream = redactor.open(None)  # type: ignore[arg-type]
    assert stream is not None
    return "".join(stream.on_text(p) for p in pieces) + stream.on_end()


@pytest.mark.parametrize("text", [t for t, _ in POSITIVE] + NEGATIVE)
def test_streamed_in_two_pieces_split_anywhere(text: str) -> None:
    redactor = PIIRedactor()
    whole = redactor.redact(text)
    for cut in range(len(text) + 1):
        assert _streamed(redactor, [text[:cut], text[cut:]]) == whole, cut


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7])
def test_streamed_in_small_pieces(size: int) -> None:
    text = " ".join(t for t, _ in POSITIVE) + " " + " ".join(NEGATIVE)
    redactor = PIIRedactor()
    pieces = [text[i:i + size] for i in range(0, len(text), size)]
    assert _streamed(redactor, pieces) == redactor.redact(text)


def test_never_sends_part_of_a_match_early() -> None:
    redactor = PIIRedactor()
    stream = redactor.open(None)  # type: ignore[arg-type]
    assert stream is not None
    sent = stream.on_text("mail john.d")
    sent += stream.on_text("oe@exa")
    assert "john" not in sent and sent == "mail "
    sent += stream.on_text("mple.com, then")
    assert sent == "mail [EMAIL], "  # "then" could still begin an address: held
    assert stream.on_end() == "then"


def test_a_long_run_is_released_past_max_hold() -> None:
    redactor = PIIRedactor(max_hold=32)
    stream = redactor.open(None)  # type: ignore[arg-type]
    assert stream is not None
    sent = stream.on_text("x" * 100)
    assert len(sent) >= 60  # not held whole: the client keeps getting text


def test_redacts_prompts_both_chat_and_completions() -> None:
    redactor = PIIRedactor()
    request = StageRequest("chat", None, [
        {"role": "system", "content": "support bot"},
        {"role": "user", "content": [{"type": "text", "text": "I am a@b.io"}]},
        {"role": "user", "content": "call me: 555-123-4567"}], None, {}, None, {}, "r")
    assert redactor.before(request) is not None
    assert request.messages is not None
    assert request.messages[1]["content"][0]["text"] == "I am [EMAIL]"
    assert request.messages[2]["content"] == "call me: [PHONE]"
    clean = StageRequest("completions", None, None, "nothing here", {}, None, {}, "r")
    assert redactor.before(clean) is None and clean.prompt == "nothing here"


def test_only_the_kinds_asked_and_the_ways_asked() -> None:
    redactor = PIIRedactor(kinds=["email"], outputs=False, labels={"email": "<hidden>"})
    assert redactor.redact("a@b.io 555-123-4567") == "<hidden> 555-123-4567"
    assert redactor.open(None) is None  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="allowed is a non-empty list"):
        PIIRedactor(kinds=["ssn"])


def test_through_the_pipeline_into_the_body() -> None:
    from tests.stages.test_pipeline import _pipeline, _request

    pipeline, registry, _ = _pipeline(PIIRedactor())
    body = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "card 4111 1111 1111 1111"}]})
    asyncio.run(pipeline.before("chat", body, _request()))
    assert body.messages[0].content == "card [CARD]"
    assert registry.get_sample_value("surge:stage_decisions_total",
                                     {"stage": "PIIRedactor", "decision": "redacted"}) == 1

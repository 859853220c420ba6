"""The built-in PII redactor (``--stage pii-redactor``): e-mail addresses, phone numbers and
payment card numbers (13 to 19 digits that pass the Luhn check) are replaced by
``[EMAIL]``, ``[PHONE]``, ``[CARD]``, in prompts (every message, or string prompts) before
the model sees them and in the model's output as it streams.

Streaming: a match may be split across chunks ("john.d" + "oe@example.com"), so the output
holds back the trailing run of text that could still become part of one (the last run of
address characters, or of digits and their separators) until a character that cannot
continue it arrives, or the stream ends. Matches never cross what was sent, because every
pattern is made of one such run: the redacted stream equals the redaction of the whole text.
A run longer than ``max_hold`` characters is released as it is (redacting what it matches).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from surge.stages.api import Continue, StageRequest

__all__ = ["KINDS", "PIIRedactor", "luhn_ok", "redact"]

# Characters an address can hold, and those a phone or card number can (with separators).
_ADDRESS_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                           "._%+-@")
_NUMBER_CHARS = frozenset("0123456789 ()+.-")

_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*"
                    r"\.[A-Za-z]{2,24}(?![A-Za-z0-9\-@]|\.[A-Za-z0-9])")
# 13-19 digits, single spaces or dashes between groups; the Luhn check decides.
_CARD = re.compile(r"(?<![0-9\-])[0-9](?:[ \-]?[0-9]){12,18}(?![0-9]|[ \-][0-9])")
# Phone candidates: an optional +country code and (area code), then digit groups with one
# kind of separator throughout, or + and 7-15 digits; ``_looks_like_phone`` decides.
_PHONE = re.compile(
    r"(?<![0-9A-Za-z+])(?:"
    r"\+[0-9]{7,15}"
    r"|(?:\+[0-9]{1,3}[ .\-]?)?(?:\([0-9]{1,4}\)[ .\-]?)?"
    r"[0-9]{1,4}(?:([ .\-])[0-9]{1,4}(?:\1[0-9]{1,4}){0,5})?"
    r")(?![0-9]|[.\-][0-9])")
_DATE = re.compile(r"[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}|[0-9]{1,2}[./\-][0-9]{1,2}[./\-][0-9]{2,4}")
_DIGIT = re.compile(r"[0-9]")
KINDS = ("email", "card", "phone")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(digits)):
        value = int(char)
        if i % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _digit_count(text: str) -> int:
    return sum(c.isdigit() for c in text)


def _looks_like_phone(text: str) -> bool:
    """7-15 digits; with + or an (area code) that is enough; otherwise at least two groups,
    not a date, the last of 4 digits or more (or 4+ pairs, as "06 12 34 56 78"), so sums
    ("1 000 000"), versions and addresses ("10.1.20.3") stay."""
    if not 7 <= _digit_count(text) <= 15:
        return False
    if text.startswith("+") or "(" in text:
        return True
    if _DATE.fullmatch(text):
        return False
    groups = re.split(r"[ .\-]", text)
    if len(groups) < 2:
        return False
    return len(groups[-1]) >= 4 or (len(groups) >= 4 and all(len(g) == 2 for g in groups[1:]))


def _spans(text: str, kinds: Sequence[str]) -> list[tuple[int, int, str]]:
    """Non-overlapping matches, cards before phones (a card number also looks like one)."""
    found: list[tuple[int, int, str]] = []

    def free(start: int, end: int) -> bool:
        return all(end <= s or start >= e for s, e, _ in found)

    if "email" in kinds and "@" in text:
        found += [(m.start(), m.end(), "email") for m in _EMAIL.finditer(text)]
    if not _DIGIT.search(text):  # most streamed text: no number, nothing more to look for
        return sorted(found)
    if "card" in kinds:
        for m in _CARD.finditer(text):
            digits = re.sub(r"[ \-]", "", m.group())
            if luhn_ok(digits) and free(m.start(), m.end()):
                found.append((m.start(), m.end(), "card"))
    if "phone" in kinds:
        for m in _PHONE.finditer(text):
            if _looks_like_phone(m.group()) and free(m.start(), m.end()):
                found.append((m.start(), m.end(), "phone"))
    return sorted(found)


def _replace(text: str, spans: list[tuple[int, int, str]], labels: dict[str, str]) -> str:
    parts, last = [], 0
    for start, end, kind in spans:
        parts += [text[last:start], labels[kind]]
        last = end
    parts.append(text[last:])
    return "".join(parts)


def redact(text: str, kinds: Sequence[str] = KINDS,
           labels: dict[str, str] | None = None) -> str:
    """``text`` with every match replaced by its label."""
    labels = labels or {kind: f"[{kind.upper()}]" for kind in KINDS}
    return _replace(text, _spans(text, kinds), labels)


class PIIRedactor:
    """A pre- and post-stage. Options: ``kinds`` (some of email, card, phone), ``prompts``
    and ``outputs`` (which way to redact), ``labels`` ({kind: replacement}), ``max_hold``."""

    blocking = False  # regexes over short texts: cheaper on the loop than a thread hop

    def __init__(self, kinds: Sequence[str] = KINDS, prompts: bool = True,
                 outputs: bool = True, labels: dict[str, str] | None = None,
                 max_hold: int = 256) -> None:
        unknown = [kind for kind in kinds if kind not in KINDS]
        if unknown or not kinds:
            raise ValueError(f"kinds={list(kinds)!r} is invalid: allowed is a non-empty list "
                             f"of {', '.join(KINDS)}")
        if max_hold < 16:
            raise ValueError(f"max_hold={max_hold} is invalid: allowed is an integer >= 16")
        self.kinds = tuple(kinds)
        self.prompts = prompts
        self.outputs = outputs
        self.rewrites_output = outputs  # logprobs would show what it redacted: refused
        self.labels = {kind: f"[{kind.upper()}]" for kind in KINDS} | (labels or {})
        self.max_hold = max_hold

    def redact(self, text: str) -> str:
        return _replace(text, _spans(text, self.kinds), self.labels)

    def before(self, request: StageRequest) -> Continue | None:
        if self.prompts and request.edit_texts(self.redact):
            return Continue("redacted")
        return None

    def open(self, request: StageRequest) -> RedactingStream | None:
        return RedactingStream(self) if self.outputs else None


@dataclass
class RedactingStream:
    redactor: PIIRedactor
    held: str = ""

    def on_text(self, text: str) -> str:
        buffer = self.held + text
        cut = self._safe_cut(buffer)
        self.held = buffer[cut:]
        return self.redactor.redact(buffer[:cut]) if cut else ""

    def on_end(self) -> str:
        held, self.held = self.held, ""
        return self.redactor.redact(held)

    def _safe_cut(self, buffer: str) -> int:
        """Where to cut: no match, now or after more text, crosses it."""
        floor = max(0, len(buffer) - self.redactor.max_hold)
        address = _run_start(buffer, _ADDRESS_CHARS, floor)
        number = _run_start(buffer, _NUMBER_CHARS, floor)
        if not any(c.isdigit() for c in buffer[number:]):
            number = len(buffer)  # spaces and brackets alone start no number
        cut = min(address, number)
        if cut < len(buffer):  # a match already found may still run past the cut
            for start, end, _ in _spans(buffer, self.redactor.kinds):
                if start < cut < end:
                    cut = start
        return max(cut, 0)


def _run_start(text: str, chars: frozenset[str], floor: int) -> int:
    """Where the trailing run of ``chars`` starts (not before ``floor``)."""
    i = len(text)
    while i > floor and text[i - 1] in chars:
        i -= 1
    return i

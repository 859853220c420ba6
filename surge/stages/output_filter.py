"""The built-in output filter (``--stage output-filter``): when the model's output contains a
blocked word or phrase (whole words, any case), the stream stops before it with
``finish_reason`` "content_filter" (as OpenAI names it), and the engine request is aborted
so its KV blocks are freed at once.

Streaming: a phrase may be split across chunks, so the filter holds back the trailing text
that could still begin one (a prefix of a blocked phrase, or a whole one waiting for the
character that says whether the word ends there). Nothing blocked is ever sent.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from surge.stages.api import Continue, Refuse, StageRequest, Stop

__all__ = ["OutputFilter"]


class OutputFilter:
    """A post-stage (and, with ``prompts``, a pre-stage that refuses blocked prompts).
    Options: ``words`` (phrases), ``file`` (one phrase a line, ``#`` comments),
    ``finish_reason`` (default content_filter), ``prompts`` (default false)."""

    blocking = False
    rewrites_output = True  # the stopping piece's logprobs would show the blocked word

    def __init__(self, words: Sequence[str] = (), file: str | None = None,
                 finish_reason: str = "content_filter", prompts: bool = False) -> None:
        phrases = [w for w in words if isinstance(w, str)]
        if len(phrases) != len(words):
            raise ValueError("words must be a list of strings")
        if file is not None:
            lines = Path(file).expanduser().read_text().splitlines()
            phrases += [line for line in lines if line.strip() and not line.startswith("#")]
        self.phrases = sorted({" ".join(p.lower().split()) for p in phrases if p.strip()})
        if not self.phrases:
            raise ValueError("no blocked words: give words=[...] or file=PATH (one a line)")
        if not finish_reason:
            raise ValueError("finish_reason must be a non-empty string")
        self.finish_reason = finish_reason
        self.prompts = prompts
        body = "|".join(re.escape(p).replace(r"\ ", r"\s+") for p in self.phrases)
        self._pattern = re.compile(rf"(?<!\w)(?:{body})(?!\w)", re.IGNORECASE)
        # Mid-stream a match counts only once a character after it says its word ended.
        self._pattern_followed = re.compile(rf"(?<!\w)(?:{body})(?=\W)", re.IGNORECASE)
        self._prefixes = {p[:k] for p in self.phrases for k in range(1, len(p) + 1)}
        self._longest = max(len(p) for p in self.phrases) + 8  # room for repeated spaces
        # Where a phrase may begin: a word's start, on one of the phrases' first characters.
        firsts = "".join(sorted({re.escape(p[0]) for p in self.phrases}))
        self._starts = re.compile(rf"(?<!\w)[{firsts}]", re.IGNORECASE)

    def first_match(self, text: str, final: bool = True) -> int | None:
        """Where the first blocked phrase starts; mid-stream (``final`` False) only one
        that something other than a word character follows."""
        match = (self._pattern if final else self._pattern_followed).search(text)
        return match.start() if match else None

    def before(self, request: StageRequest) -> Refuse | Continue | None:
        if not self.prompts:
            return None
        text = request.last_user_text() or ""
        if self.first_match(text) is not None:
            return Refuse("the prompt contains a blocked word or phrase",
                          code="content_filter")
        return Continue("pass")

    def open(self, request: StageRequest) -> FilteringStream:
        return FilteringStream(self)

    def held_suffix(self, text: str) -> int:
        """How many trailing characters might still start a blocked phrase (or be a whole
        one waiting for the character that says whether its last word ends there)."""
        for start in self._starts.finditer(text, max(0, len(text) - self._longest)):
            tail = text[start.start():]
            norm = " ".join(tail.lower().split()) + (" " if tail[-1].isspace() else "")
            if norm in self._prefixes:
                return len(tail)
        return 0


@dataclass
class FilteringStream:
    filter: OutputFilter
    held: str = ""
    sent: str = ""  # the last character sent: whether a word starts where the buffer does

    def on_text(self, text: str) -> str | Stop:
        buffer = self.held + text
        seen = self.sent + buffer
        at = self.filter.first_match(seen, final=False)
        if at is not None:
            self.held = ""
            return Stop(self.filter.finish_reason, seen[len(self.sent):at])
        keep = min(self.filter.held_suffix(seen), len(buffer))
        self.held = buffer[len(buffer) - keep:] if keep else ""
        out = buffer[:len(buffer) - keep]
        self.sent = (self.sent + out)[-1:]
        return out

    def on_end(self) -> str | Stop:
        held, self.held = self.held, ""
        seen = self.sent + held
        at = self.filter.first_match(seen)
        if at is not None:
            return Stop(self.filter.finish_reason, seen[len(self.sent):at])
        return held

"""Per-request sampling settings, named and defaulted as vLLM names them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["SamplingParams", "StructuredOutputsParams"]

# Temperatures below this are treated as greedy: dividing logits by ~0 only produces inf/nan.
GREEDY_EPSILON = 1e-5
MAX_LOGPROBS = 20


@dataclass
class StructuredOutputsParams:
    """A constraint on the output, named as vLLM names it: exactly one field is set.

    ``json``: a JSON schema (dict or JSON text); ``json_object``: any JSON object;
    ``regex``: a regular expression (Rust ``regex`` syntax); ``choice``: one of these strings;
    ``grammar``: a Lark or GBNF (llama.cpp) grammar. The engine compiles it once per distinct
    constraint and masks every step's logits so the output always matches it.
    """

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        named = [name for name in ("json", "regex", "choice", "grammar")
                 if getattr(self, name) is not None]
        named += ["json_object"] if self.json_object else []
        _check(len(named) == 1, "structured_outputs", named or None,
               "exactly one of json, json_object, regex, choice, grammar")
        _check(self.json is None or isinstance(self.json, dict | str), "structured_outputs.json",
               self.json, "a JSON schema (an object, or its JSON text)")
        _check(self.regex is None or (isinstance(self.regex, str) and self.regex),
               "structured_outputs.regex", self.regex, "a non-empty string")
        _check(self.grammar is None or (isinstance(self.grammar, str) and self.grammar.strip()),
               "structured_outputs.grammar", self.grammar, "a non-empty Lark or GBNF grammar")
        _check(self.choice is None or (isinstance(self.choice, list) and self.choice and all(
            isinstance(c, str) and c for c in self.choice)), "structured_outputs.choice",
            self.choice, "a non-empty list of non-empty strings")


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    Every field is validated on construction; a bad value raises ``ValueError`` naming the
    field and the allowed range, before the request ever reaches the scheduler.
    """

    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Constrained decoding (JSON schema, regex, choice, grammar); None: unconstrained.
    structured_outputs: StructuredOutputsParams | None = None
    # Log-probabilities of the prompt's tokens (and the top k alternatives), computed in the
    # prefill: None: off. Such a request bypasses the prefix cache (every position is needed).
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.top_k = 0 if self.top_k in (None, -1) else self.top_k
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        self._validate()

    def _validate(self) -> None:
        _check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
               "max_tokens", self.max_tokens, "an integer >= 1 (or None for up to the context)")
        _check(_is_int(self.min_tokens) and self.min_tokens >= 0,
               "min_tokens", self.min_tokens, "an integer >= 0")
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens", self.min_tokens,
                   f"at most max_tokens ({self.max_tokens})")
        _check(_is_num(self.temperature) and self.temperature >= 0,
               "temperature", self.temperature, "a number >= 0 (0 means greedy)")
        _check(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "(0, 1]")
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k", self.top_k,
               "an integer >= 1, or 0 / -1 to disable")
        _check(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "[0, 1]")
        _check(_is_num(self.repetition_penalty) and self.repetition_penalty > 0,
               "repetition_penalty", self.repetition_penalty, "a number > 0 (1 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_num(value) and -2 <= value <= 2, name, value, "[-2, 2]")
        _check(self.seed is None or _is_int(self.seed), "seed", self.seed, "an integer or None")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop,
               "a non-empty string or a list of non-empty strings")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               self.stop_token_ids, "a list of integers >= 0")
        _check(self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs
               <= MAX_LOGPROBS), "logprobs", self.logprobs, f"an integer in [0, {MAX_LOGPROBS}]")
        _check(self.prompt_logprobs is None or (_is_int(self.prompt_logprobs) and 0 <=
               self.prompt_logprobs <= MAX_LOGPROBS), "prompt_logprobs", self.prompt_logprobs,
               f"an integer in [0, {MAX_LOGPROBS}]")
        _check(self.structured_outputs is None
               or isinstance(self.structured_outputs, StructuredOutputsParams),
               "structured_outputs", self.structured_outputs,
               "a StructuredOutputsParams (or a dict of its fields) or None")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_EPSILON

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: allowed is {allowed}")

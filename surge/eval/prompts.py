"""Prompt suites: JSONL of prompts with expected answers, answered greedily and scored.

One JSON object per line::

    {"prompt": "What is the capital of France?", "expected": "Paris", "match": "contains"}

- ``prompt`` (string, required);
- ``expected`` (string, or a list of strings any of which counts, required);
- ``match``: ``"contains"`` (default: the answer contains the expected text as whole words, so
  "7" is not found in "1.275") or ``"exact"`` (the answer is the expected text). Both compare
  case-insensitively, with runs of whitespace collapsed and surrounding spaces, quotes and final
  punctuation (``. ! ?``) ignored;
- ``chat`` (default true): the prompt is the user's message of a one-turn chat, rendered with the
  model's chat template; false sends it as plain text to complete;
- ``max_tokens`` (default 32): the longest answer generated.

Blank lines and lines starting with ``#`` are skipped. Answers are greedy (temperature 0) and end
at the model's end-of-sequence token or at ``max_tokens``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from surge.sampling_params import SamplingParams
from surge.tokenizer import ChatTokenizer

__all__ = ["DEFAULT_SUITE", "Answer", "PromptCase", "SuiteResult", "generate_answers",
           "is_correct", "load_suite", "normalize", "parse_suite", "prompt_token_ids",
           "run_suite", "score_suite"]

DEFAULT_SUITE = "default_prompts.jsonl"  # shipped inside this package
DEFAULT_MAX_TOKENS = 32
MATCHES = ("contains", "exact")
_KEYS = {"prompt", "expected", "match", "chat", "max_tokens"}


@dataclass(frozen=True)
class PromptCase:
    prompt: str
    expected: tuple[str, ...]
    match: Literal["contains", "exact"] = "contains"
    chat: bool = True
    max_tokens: int = DEFAULT_MAX_TOKENS
    line: int = 0  # line number in its file, for messages


@dataclass(frozen=True)
class Answer:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str


@dataclass
class SuiteResult:
    accuracy: float
    num_correct: int
    num_prompts: int
    suite: str
    seconds: float
    generated_tokens: int
    items: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def load_suite(path: str | Path | None) -> tuple[str, list[PromptCase]]:
    """(name, cases) of a JSONL file, or of the built-in suite when ``path`` is None."""
    if path is None:
        text = resources.files("surge.eval").joinpath(DEFAULT_SUITE).read_text("utf-8")
        return f"builtin:{DEFAULT_SUITE}", parse_suite(text, DEFAULT_SUITE)
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"prompt suite {str(file)!r} not found: give a JSONL file of "
                                '{"prompt": ..., "expected": ...} lines, or leave out --prompts '
                                "for the built-in suite")
    return str(file), parse_suite(file.read_text(encoding="utf-8"), str(file))


def parse_suite(text: str, source: str) -> list[PromptCase]:
    cases = [_parse_line(line, number, source)
             for number, line in enumerate(text.splitlines(), start=1)
             if line.strip() and not line.lstrip().startswith("#")]
    if not cases:
        raise ValueError(f"prompt suite {source!r} has no prompts: write one JSON object per "
                         'line, e.g. {"prompt": "2+2=", "expected": "4", "chat": false}')
    return cases


def _parse_line(line: str, number: int, source: str) -> PromptCase:
    where = f"{source}, line {number}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object with 'prompt' and 'expected'")
    unknown = sorted(set(item) - _KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_KEYS)}")
    return PromptCase(_prompt(item, where), _expected(item, where), _match(item, where),
                      _flag(item, "chat", True, where), _max_tokens(item, where), number)


def _prompt(item: dict, where: str) -> str:
    prompt = item.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: 'prompt' must be a non-empty string")
    return prompt


def _expected(item: dict, where: str) -> tuple[str, ...]:
    expected = item.get("expected")
    options = [expected] if isinstance(expected, str) else expected
    if (not isinstance(options, list) or not options
            or not all(isinstance(o, str) and normalize(o) for o in options)):
        raise ValueError(f"{where}: 'expected' must be a string, or a list of strings, each "
                         "with some text besides spaces, quotes and final punctuation")
    return tuple(options)


def _match(item: dict, where: str) -> Literal["contains", "exact"]:
    match = item.get("match", "contains")
    if match not in MATCHES:
        raise ValueError(f"{where}: 'match' is {match!r}; allowed: 'contains' or 'exact'")
    return match


def _flag(item: dict, key: str, default: bool, where: str) -> bool:
    value = item.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {key!r} must be true or false")
    return value


def _max_tokens(item: dict, where: str) -> int:
    value = item.get("max_tokens", DEFAULT_MAX_TOKENS)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{where}: 'max_tokens' must be an integer >= 1")
    return value


def normalize(text: str) -> str:
    return " ".join(text.casefold().split()).strip(" \"'`").rstrip(".!?").strip(" \"'`")


def is_correct(case: PromptCase, answer: str) -> bool:
    got = normalize(answer)
    if case.match == "exact":
        return any(got == normalize(option) for option in case.expected)
    return any(_contains_words(got, normalize(option)) for option in case.expected)


def _contains_words(text: str, words: str) -> bool:
    """``words`` occurs in ``text`` with no letter or digit right before or after it."""
    return re.search(rf"(?<![^\W_]){re.escape(words)}(?![^\W_])", text) is not None


def prompt_token_ids(tokenizer: ChatTokenizer, case: PromptCase) -> list[int]:
    if not case.chat:
        return tokenizer.encode(case.prompt)
    if not tokenizer.chat_template:
        raise ValueError(f"prompt on line {case.line} is a chat prompt but this model has no "
                         'chat template: add "chat": false to the line to send it as plain text')
    text = tokenizer.apply_chat_template([{"role": "user", "content": case.prompt}])
    return tokenizer.encode(text, add_special_tokens=False)


def generate_answers(llm: Any, cases: list[PromptCase], progress: bool = True) -> list[Answer]:
    """Greedy answers of an offline `LLM` to every case, batched by its engine."""
    tokenizer = llm.get_tokenizer()
    prompts = [prompt_token_ids(tokenizer, case) for case in cases]
    _check_lengths(cases, prompts, getattr(llm.engine, "max_model_len", None))
    params = [SamplingParams(temperature=0.0, max_tokens=case.max_tokens) for case in cases]
    outputs = llm.generate(prompts, params, use_tqdm=progress)
    return [Answer(out.prompt_token_ids, list(out.outputs[0].token_ids), out.outputs[0].text)
            for out in outputs]


def _check_lengths(cases: list[PromptCase], prompts: list[list[int]],
                   context: int | None) -> None:
    """Name the line of a prompt too long for the context (the engine would name an index)."""
    for case, ids in zip(cases, prompts, strict=True):
        if context is not None and len(ids) + case.max_tokens > context:
            raise ValueError(f"prompt on line {case.line} is {len(ids)} tokens; with its "
                             f"max_tokens={case.max_tokens} that exceeds the context of "
                             f"{context} tokens: shorten it or raise --context-length")


def score_suite(cases: list[PromptCase], answers: list[Answer], suite: str,
                seconds: float) -> SuiteResult:
    items = [{"line": case.line, "prompt": case.prompt, "expected": list(case.expected),
              "match": case.match, "chat": case.chat, "answer": answer.text,
              "correct": is_correct(case, answer.text)}
             for case, answer in zip(cases, answers, strict=True)]
    correct = sum(item["correct"] for item in items)
    return SuiteResult(correct / len(items), correct, len(items), suite, seconds,
                       sum(len(a.token_ids) for a in answers), items)


def run_suite(llm: Any, cases: list[PromptCase], suite: str,
              progress: bool = True) -> tuple[SuiteResult, list[Answer]]:
    start = time.perf_counter()
    answers = generate_answers(llm, cases, progress)
    return score_suite(cases, answers, suite, time.perf_counter() - start), answers

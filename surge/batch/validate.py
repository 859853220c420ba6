"""Validation of a batch input file, whole, before anything is queued.

A batch that fails on line 40,000 after hours of work helps no one: every line is checked when
the file is uploaded, against the same pydantic request models the endpoints use, and every
problem is reported with its line number. Each line is OpenAI's batch request object::

    {"custom_id": "req-1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "...", "messages": [...], "max_tokens": 32}}
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from surge.http.errors import APIError, validation_message
from surge.http.unicode import find_lone_surrogate, surrogate_problem
from surge.server.prompt_logprobs import check_prompt_logprobs_request
from surge.server.schemas import CompletionRequest

__all__ = [
    "BATCH_URLS",
    "MAX_LINES",
    "BatchFileError",
    "BatchLine",
    "LineProblem",
    "ValidatedFile",
    "parse_lines",
    "validate_batch_file",
]

BATCH_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MAX_LINES = 50_000  # as OpenAI: larger jobs are split into several batches
MAX_CUSTOM_ID_CHARS = 512
# Problems listed in one error message; a file that is wrong everywhere says so once.
MAX_REPORTED = 10


@dataclass(frozen=True)
class BatchLine:
    """One request of a batch: ``line_no`` counts from 1, as editors do."""

    line_no: int
    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass(frozen=True)
class LineProblem:
    line_no: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line_no}: {self.message}"


@dataclass
class ValidatedFile:
    lines: list[BatchLine]

    @property
    def urls(self) -> list[str]:
        return sorted({line.url for line in self.lines})


class BatchFileError(ValueError):
    """The file cannot be run; ``problems`` name each bad line."""

    def __init__(self, problems: list[LineProblem], summary: str | None = None) -> None:
        self.problems = problems
        shown = "; ".join(str(p) for p in problems[:MAX_REPORTED])
        more = len(problems) - MAX_REPORTED
        self.message = summary or (
            f"the batch input file has {len(problems)} invalid "
            f"line{'s' if len(problems) != 1 else ''}: {shown}"
            + (f"; and {more} more" if more > 0 else ""))
        super().__init__(self.message)


def parse_lines(content: bytes) -> list[BatchLine]:
    """The lines of a file that was validated before (no checks beyond the JSON shape)."""
    lines = []
    for line_no, text in _numbered_lines(content):
        data = json.loads(text)
        lines.append(BatchLine(line_no, data["custom_id"], data["url"], data["body"]))
    return lines


def validate_batch_file(content: bytes, *, schemas: Mapping[str, type[BaseModel]],
                        served_models: Collection[str]) -> ValidatedFile:
    """Every line checked; raises BatchFileError naming each bad line.

    ``schemas`` maps the URLs this server serves to their request models; ``served_models``
    are the names a body's ``model`` may take (omitted means the default model).
    """
    try:
        numbered = list(_numbered_lines(content))
    except UnicodeDecodeError as exc:
        raise BatchFileError([], f"the batch input file is not UTF-8 text: {exc}") from exc
    if not numbered:
        raise BatchFileError([], "the batch input file has no requests: give one JSON object "
                                 "per line (JSONL)")
    if len(numbered) > MAX_LINES:
        raise BatchFileError([], f"the batch input file has {len(numbered)} requests: allowed "
                                 f"is at most {MAX_LINES} per batch (split it)")
    lines, problems, seen = [], [], {}
    for line_no, text in numbered:
        try:
            line = _check_line(line_no, text, schemas, served_models)
        except _Invalid as exc:
            problems.append(LineProblem(line_no, str(exc)))
            continue
        if line.custom_id in seen:
            problems.append(LineProblem(line_no, f"custom_id {line.custom_id!r} was already "
                                                 f"used on line {seen[line.custom_id]}: "
                                                 "each must be unique within the file"))
            continue
        seen[line.custom_id] = line_no
        lines.append(line)
    if problems:
        raise BatchFileError(problems)
    return ValidatedFile(lines)


class _Invalid(Exception):
    pass


def _numbered_lines(content: bytes) -> list[tuple[int, str]]:
    text = content.decode("utf-8")
    return [(i, line) for i, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _check_line(line_no: int, text: str, schemas: Mapping[str, type[BaseModel]],
                served_models: Collection[str]) -> BatchLine:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _Invalid(f"not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(data, dict):
        raise _Invalid("must be a JSON object with custom_id, method, url and body")
    # Such text passes every schema but no store: SQLite refuses it when the batch is queued.
    bad_text = find_lone_surrogate(data)
    if bad_text is not None:
        raise _Invalid(surrogate_problem(bad_text))
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID_CHARS:
        raise _Invalid(f"'custom_id' must be a non-empty string of at most "
                       f"{MAX_CUSTOM_ID_CHARS} characters, got {_short(custom_id)}")
    if data.get("method") != "POST":
        raise _Invalid(f"'method' must be \"POST\", got {_short(data.get('method'))}")
    url = data.get("url")
    if url not in schemas:
        allowed = ", ".join(u for u in BATCH_URLS if u in schemas)
        raise _Invalid(f"'url' {_short(url)} is not served here: allowed is one of {allowed}")
    body = data.get("body")
    if not isinstance(body, dict):
        raise _Invalid(f"'body' must be a JSON object (the request to {url}), got "
                       f"{_short(body)}")
    _check_body(body, schemas[url], served_models)
    return BatchLine(line_no, custom_id, url, body)


def _check_body(body: dict[str, Any], schema: type[BaseModel],
                served_models: Collection[str]) -> None:
    try:
        request = schema.model_validate(body)
        if isinstance(request, CompletionRequest):  # the rules across fields, as the route
            check_prompt_logprobs_request(request)
    except ValidationError as exc:
        message, _param = validation_message(exc.errors())
        raise _Invalid(f"body: {message}") from exc
    except APIError as exc:
        raise _Invalid(f"body: {exc.message}") from exc
    if body.get("stream"):
        raise _Invalid("body: 'stream' must be false or absent: batch results are stored whole")
    model = body.get("model")
    if model is not None and model not in served_models:
        names = ", ".join(repr(name) for name in sorted(served_models))
        raise _Invalid(f"body: model {model!r} is not served here: allowed is {names} "
                       "(GET /v1/models)")


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

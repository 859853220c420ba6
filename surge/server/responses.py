"""``POST /v1/responses``: OpenAI's Responses API, stateless, as a view of a chat completion.

A Responses request is translated into a ``ChatCompletionRequest`` (``instructions`` and
``input`` become messages, ``max_output_tokens`` becomes ``max_tokens``, ``text.format``
becomes ``response_format``) and runs through the chat path of ``OpenAIServingCompletions``:
the same chat template, checks, rate limit, admission ticket, structured outputs, deadline
and metrics. Only the answer's shape differs: output items (an assistant ``message`` with
``output_text``), ``usage`` in input/output tokens, and, when streaming, OpenAI's typed events
(``event: response.output_text.delta`` ...) numbered by ``sequence_number``.

Errors found on the chat path name chat fields (``messages``, ``max_tokens``,
``response_format``); they are renamed to the Responses fields the client sent.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from surge.http.errors import APIError
from surge.http.openapi import error_responses, event_stream_content
from surge.http.responses import SSEResponse, json_response
from surge.server.completions import (
    OpenAIServingCompletions,
    _Accumulated,
    _Prepared,
    _refuse_unsupported_chat,
    _Run,
)
from surge.server.models import ServedModels
from surge.server.responses_schemas import (
    ResponseObject,
    ResponsesRequest,
    unsupported_fields,
)
from surge.server.schemas import ChatCompletionRequest
from surge.server.structured import check_request_fields

__all__ = ["add_responses_routes", "chat_request_of", "create_response"]

logger = logging.getLogger(__name__)

_PREFIX = "resp"
_MESSAGE_ROLES = ("user", "assistant", "system", "developer")
_TEXT_PARTS = ("input_text", "output_text", "text")
# Chat-path field names in error messages -> the Responses field the client sent, longest
# first (response_format.json_schema before response_format).
_RENAMES = (("response_format.json_schema", "text.format.schema"),
            ("response_format", "text.format"), ("max_completion_tokens", "max_output_tokens"),
            ("max_tokens", "max_output_tokens"))
_RENAME_PATTERN = re.compile("|".join(rf"\b{re.escape(old)}\b" for old, _ in _RENAMES))


# -- the request -----------------------------------------------------------------------------


def chat_request_of(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion a Responses request asks for; a 400 naming the field when the
    request uses something this server does not do."""
    unused = unsupported_fields(body)
    if unused:
        name, why = unused[0]
        raise APIError(400, f"'{name}' is not supported: {why}", param=name,
                       code="unsupported_parameter")
    _refuse_tools(body)
    chat: dict[str, Any] = {
        "messages": input_messages(body), "max_tokens": body.max_output_tokens,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p, "user": body.user}
    if body.model is not None:
        chat["model"] = body.model
    fmt = body.text.format if body.text is not None else None
    if fmt is not None and fmt.type == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise APIError(400, "'text.format.schema' is required with type 'json_schema'",
                           param="text.format.schema")
        chat["response_format"] = {"type": "json_schema", "json_schema": {
            "name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict}}
    return ChatCompletionRequest.model_validate(chat)


def _refuse_tools(body: ResponsesRequest) -> None:
    """Function tools need tool calling on the chat path, which this server lacks so far:
    refused by name rather than answered with prose that never calls them."""
    if body.tools:
        raise APIError(400, "'tools' is not supported by this server yet (no tool calling): "
                       "allowed is an empty list or null", param="tools")
    if body.tool_choice not in (None, "auto", "none"):
        raise APIError(400, "'tool_choice' names a tool but 'tools' is empty: allowed "
                       "without tools is 'auto', 'none' or null", param="tool_choice")


def input_messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """``instructions`` then ``input`` as chat messages."""
    messages: list[dict[str, Any]] = []
    if body.instructions is not None:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        return [*messages, {"role": "user", "content": body.input}]
    if not body.input:
        raise APIError(400, "'input' is an empty list: allowed is a string or a list of at "
                       "least one item", param="input")
    for index, item in enumerate(body.input):
        messages.append(_item_message(item, f"input[{index}]"))
    return messages


def _item_message(item: dict[str, Any], where: str) -> dict[str, Any]:
    kind = item.get("type", "message")
    if kind != "message":
        stateful = " (it refers to a stored item; this server stores none)" \
            if kind == "item_reference" else ""
        raise APIError(400, f"'{where}.type'={kind!r} is not supported{stateful}: allowed is "
                       "'message' (function_call items need tool calling, which this server "
                       "lacks so far)", param=f"{where}.type")
    role = item.get("role")
    if role not in _MESSAGE_ROLES:
        raise APIError(400, f"'{where}.role'={role!r} is invalid: allowed is one of "
                       f"{', '.join(_MESSAGE_ROLES)}", param=f"{where}.role")
    return {"role": role, "content": _content_text(item.get("content"), f"{where}.content")}


def _content_text(content: object, where: str) -> str:
    """A message's text: a string, or text parts joined (images and files are refused)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"'{where}' is invalid: allowed is a string or a list of "
                       "{\"type\": \"input_text\", \"text\": ...} parts", param=where)
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        text = part.get("text") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS:
            raise APIError(400, f"'{where}[{index}].type'={kind!r} is not supported: this "
                           "model reads text only; allowed is 'input_text' (or 'output_text' "
                           "in an assistant message)", param=f"{where}[{index}].type")
        if not isinstance(text, str):
            raise APIError(400, f"'{where}[{index}].text' is required: a string",
                           param=f"{where}[{index}].text")
        texts.append(text)
    return "".join(texts)


@contextlib.contextmanager
def _renamed_errors() -> Iterator[None]:
    """Errors of the chat path, said with the Responses API's field names."""
    try:
        yield
    except APIError as exc:
        raise _rename(exc) from exc


def _rename(exc: APIError) -> APIError:
    param = exc.param
    if param is not None and param.startswith("messages"):
        param = "input"  # instructions shift the message indexes: name the whole input
    elif param is not None:
        param = _RENAME_PATTERN.sub(_renamed_word, param)
    message = _RENAME_PATTERN.sub(_renamed_word, exc.message)
    message = re.sub(r"'messages(\[\d+\])?([.\w\[\]]*)'", "'input'", message)
    message = message.replace(" the messages", " the input")
    return APIError(exc.status, message, param=param, code=exc.code,
                    error_type=exc.error_type, headers=exc.headers)


def _renamed_word(match: re.Match[str]) -> str:
    return dict(_RENAMES)[match.group(0)]


# -- the answer ------------------------------------------------------------------------------


class _ResponseView:
    """The response object of one request, as it stands (in progress, then final)."""

    def __init__(self, body: ResponsesRequest, prepared: _Prepared) -> None:
        hex_id = prepared.request_id.split("-", 1)[1]
        self.id = f"resp_{hex_id}"
        self.message_id = f"msg_{hex_id}"
        self._body = body
        self._prepared = prepared

    def body(self, status: str, output: list[dict[str, Any]] | None = None,
             usage: dict[str, Any] | None = None) -> dict[str, Any]:
        body, prepared = self._body, self._prepared
        fmt = body.text.format if body.text is not None else None
        return {
            "id": self.id, "object": "response", "created_at": prepared.created,
            "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "model": prepared.model, "output": output or [],
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
            "store": False,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True)
                     if fmt is not None else {"type": "text"}},
            "tool_choice": body.tool_choice or "auto", "tools": [], "top_p": 1.0
            if body.top_p is None else body.top_p, "truncation": "disabled",
            "usage": usage, "user": body.user, "metadata": body.metadata or {}}

    def message(self, text: str, status: str) -> dict[str, Any]:
        return {"type": "message", "id": self.message_id, "status": status,
                "role": "assistant", "content": [_output_text(text)] if status != "in_progress"
                else []}

    def final(self, out: _Accumulated) -> dict[str, Any]:
        status = _status(out)
        return self.body(status, [self.message(out.text, status)], self.usage(out))

    def usage(self, out: _Accumulated) -> dict[str, Any]:
        prompt_tokens = len(self._prepared.prompts[0])
        # The engine does not report prefix-cache hits per request: cached_tokens stays 0.
        return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": out.num_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt_tokens + out.num_tokens}

    def failed(self, error: APIError) -> dict[str, Any]:
        body = self.body("failed")
        body["error"] = {"code": error.code or error.error_type, "message": error.message}
        return body


def _status(out: _Accumulated) -> str:
    return "incomplete" if out.finish_reason == "length" else "completed"


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class _Events:
    """SSE events as OpenAI frames them: ``event: <type>`` and its JSON, numbered."""

    def __init__(self) -> None:
        self.sequence_number = 0

    def __call__(self, kind: str, **fields: Any) -> bytes:
        data = msgspec.json.encode({"type": kind, "sequence_number": self.sequence_number,
                                    **fields})
        self.sequence_number += 1
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


class _MessageEvents:
    """The events of the one output message: opened at its first text, closed at the end."""

    def __init__(self, events: _Events, view: _ResponseView, output_index: int) -> None:
        self._events, self._view = events, view
        self._where = {"item_id": view.message_id, "output_index": output_index}
        self._parts: list[str] = []
        self._opened = False

    def text(self, delta: str) -> list[bytes]:
        if not delta:  # a token that only completed part of a character
            return []
        opening = [] if self._opened else self._open()
        self._parts.append(delta)
        return [*opening, self._events("response.output_text.delta", **self._where,
                                       content_index=0, delta=delta, logprobs=[])]

    def close(self, status: str) -> list[bytes]:
        """The done events (an empty message still opens and closes, as a non-streamed
        answer has one)."""
        opening = [] if self._opened else self._open()
        text = "".join(self._parts)
        part = _output_text(text)
        return [*opening,
                self._events("response.output_text.done", **self._where, content_index=0,
                             text=text, logprobs=[]),
                self._events("response.content_part.done", **self._where, content_index=0,
                             part=part),
                self._events("response.output_item.done",
                             output_index=self._where["output_index"],
                             item=self._view.message(text, status))]

    def _open(self) -> list[bytes]:
        self._opened = True
        return [self._events("response.output_item.added",
                             output_index=self._where["output_index"],
                             item=self._view.message("", "in_progress")),
                self._events("response.content_part.added", **self._where, content_index=0,
                             part=_output_text(""))]


# -- running ---------------------------------------------------------------------------------


async def create_response(serving: OpenAIServingCompletions, body: ResponsesRequest,
                          request: Request) -> Response:
    with _renamed_errors():
        chat = chat_request_of(body)
        _refuse_unsupported_chat(chat)
        await check_request_fields(chat)
        prompt = await serving._chat_prompt(chat)
        prepared = serving._prepare(chat, [prompt], [None], chat.max_tokens, None, request,
                                    _PREFIX)
    view = _ResponseView(body, prepared)
    if body.stream:
        return SSEResponse(_stream(serving, prepared, view),
                           functools.partial(serving._release, prepared))
    with _renamed_errors():
        outputs = await serving._run_to_end(prepared, request)
    return json_response(view.final(outputs[0]))


async def _stream(serving: OpenAIServingCompletions, prepared: _Prepared,
                  view: _ResponseView) -> AsyncIterator[bytes]:
    """Every event of one response; a failure after the 200 ends it with response.failed."""
    events = _Events()
    run = _Run(serving, prepared)
    try:
        yield events("response.created", response=view.body("in_progress"))
        yield events("response.in_progress", response=view.body("in_progress"))
        message = _MessageEvents(events, view, output_index=0)
        async for delta in run.deltas(serving.context.deadline()):
            for data in message.text(delta.text):
                yield data
        out = run.outputs[0]
        for data in message.close(_status(out)):
            yield data
        final = view.final(out)
        yield events(f"response.{final['status']}", response=final)
    except APIError as exc:
        yield events("response.failed", response=view.failed(_rename(exc)))
    except Exception as exc:  # a bug must still end the stream in a way clients read
        logger.exception("response stream %s failed", view.id)
        yield events("response.failed", response=view.failed(APIError(
            500, f"the stream failed: {type(exc).__name__}", code="internal_error")))
    finally:
        await run.close()
        serving._release(prepared)


# -- the route -------------------------------------------------------------------------------

_RESPONSES = {
    200: {"model": ResponseObject, "description": "a response object; with stream=true, "
          "text/event-stream of `event: <type>` / `data: {type, sequence_number, ...}` "
          "pairs: response.created, response.in_progress, response.output_item.added, "
          "response.content_part.added, response.output_text.delta..., "
          "response.output_text.done, response.content_part.done, "
          "response.output_item.done, then response.completed (response.incomplete when "
          "max_output_tokens cut it, response.failed on an error)",
          "content": event_stream_content("a JSON event: {type, sequence_number, ...}")},
    **error_responses({
        400: "invalid request (the message names the field and what is allowed)",
        401: "missing or wrong API key", 404: "unknown model", 413: "request body too large",
        429: "rate limited or server busy (Retry-After)", 500: "unexpected server error",
        503: "model loading, engine down, or server shutting down",
        504: "the request exceeded --request-timeout"})}

def add_responses_routes(app: FastAPI, models: ServedModels) -> None:
    """``POST /v1/responses`` on every server: without a text-generation model it says which
    models the server has instead."""

    @app.post("/v1/responses", response_model=None, tags=["openai"], responses=_RESPONSES)
    async def create(body: ResponsesRequest, request: Request) -> Response:
        serving: OpenAIServingCompletions = models.resolve(body.model, "generate").target
        serving.check_available()
        return await create_response(serving, body, request)

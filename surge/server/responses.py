"""``POST /v1/responses``: OpenAI's Responses API, stateless, as a view of a chat completion.

A Responses request is translated into a ``ChatCompletionRequest`` (``instructions`` and
``input`` become messages, ``function_call`` / ``function_call_output`` items an assistant's
``tool_calls`` and ``tool`` messages, ``max_output_tokens`` becomes ``max_tokens``,
``text.format`` becomes ``response_format``) and runs through the chat path of
``OpenAIServingCompletions``: the same chat template, checks, rate limit, admission ticket,
structured outputs, tool calling (``surge.server.tools``: rendering, the calls' grammar, the
parser), deadline and metrics. Only the answer's shape differs (``surge.server.
responses_output``): output items (an assistant ``message`` with ``output_text``, a
``function_call`` per call), ``usage`` in input/output tokens, and, when streaming, OpenAI's
typed events (``event: response.output_text.delta`` ...) numbered by ``sequence_number``.

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

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from surge.http.errors import APIError
from surge.http.openapi import error_responses, event_stream_content
from surge.http.responses import SSEResponse, json_response
from surge.server.completions import (
    OpenAIServingCompletions,
    _Prepared,
    _refuse_unsupported_chat,
    _Run,
)
from surge.server.models import ServedModels
from surge.server.responses_output import (
    ResponseOutput,
    ResponseView,
    SSEEvents,
    response_status,
)
from surge.server.responses_schemas import (
    ResponseObject,
    ResponsesRequest,
    unsupported_fields,
)
from surge.server.schemas import ChatCompletionRequest
from surge.server.structured import check_request_fields, structured_outputs_of
from surge.server.tools import ChatTools, chat_tools_of

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
        _add_item(messages, item, f"input[{index}]")
    return messages


def _add_item(messages: list[dict[str, Any]], item: dict[str, Any], where: str) -> None:
    """One input item as a chat message: a message, a call the assistant made (joined to
    the assistant's turn it belongs to), or a call's result (a ``tool`` message)."""
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in _MESSAGE_ROLES:
            raise APIError(400, f"'{where}.role'={role!r} is invalid: allowed is one of "
                           f"{', '.join(_MESSAGE_ROLES)}", param=f"{where}.role")
        messages.append({"role": role, "content": _content_text(item.get("content"),
                                                                f"{where}.content")})
    elif kind == "function_call":
        call = {"id": _field(item, "call_id", where), "type": "function", "function": {
            "name": _field(item, "name", where),
            "arguments": _field(item, "arguments", where, allow_empty=True)}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant":
            last.setdefault("tool_calls", []).append(call)
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        messages.append({"role": "tool", "tool_call_id": _field(item, "call_id", where),
                         "content": output if isinstance(output, str)
                         else _content_text(output, f"{where}.output")})
    else:
        stateful = " (it refers to a stored item; this server stores none)" \
            if kind == "item_reference" else ""
        raise APIError(400, f"'{where}.type'={kind!r} is not supported{stateful}: allowed is "
                       "'message', 'function_call' or 'function_call_output'",
                       param=f"{where}.type")


def _field(item: dict[str, Any], name: str, where: str, allow_empty: bool = False) -> str:
    value = item.get(name)
    if not isinstance(value, str) or not (value or allow_empty):
        raise APIError(400, f"'{where}.{name}' is required: a{'' if allow_empty else ' non-empty'}"
                       " string", param=f"{where}.{name}")
    return value


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
    if param is not None and param.startswith("tools"):  # the Responses API's tools are flat
        param = param.replace(".function.", ".").removesuffix(".function")
    if param is not None and param.startswith("messages"):
        param = "input"  # instructions shift the message indexes: name the whole input
    elif param is not None:
        param = _RENAME_PATTERN.sub(_renamed_word, param)
    message = _RENAME_PATTERN.sub(_renamed_word, exc.message)
    message = re.sub(r"'messages(\[\d+\])?([.\w\[\]]*)'", "'input'", message)
    message = message.replace(" the messages", " the input")
    message = re.sub(r"\b(tools\[\d+\])\.function\b", r"\1", message)
    return APIError(exc.status, message, param=param, code=exc.code,
                    error_type=exc.error_type, headers=exc.headers)


def _renamed_word(match: re.Match[str]) -> str:
    return dict(_RENAMES)[match.group(0)]


# -- running ---------------------------------------------------------------------------------


async def create_response(serving: OpenAIServingCompletions, body: ResponsesRequest,
                          request: Request) -> Response:
    with _renamed_errors():
        chat = chat_request_of(body)
        _refuse_unsupported_chat(chat)
        await check_request_fields(chat)
        tools = await chat_tools_of(
            serving.tokenizer, [t.model_dump(exclude_none=True) for t in body.tools or []],
            _dumped(body.tool_choice), body.parallel_tool_calls,
            [m.model_dump() for m in chat.messages], structured_outputs_of(chat) is not None)
        prompt = await serving._chat_prompt(chat, tools)
        prepared = serving._prepare(chat, [prompt], [None], chat.max_tokens, None, request,
                                    _PREFIX, structured=tools.constraint)
    view = ResponseView(body, f"resp_{prepared.request_id.split('-', 1)[1]}", prepared.created,
                        prepared.model, len(prompt))
    if body.stream:
        return SSEResponse(_stream(serving, prepared, view, tools),
                           functools.partial(serving._release, prepared))
    with _renamed_errors():
        out = (await serving._run_to_end(prepared, request))[0]
    output = ResponseOutput(SSEEvents(), tools.streamer())
    output.feed(out.text)
    status = response_status(out.finish_reason)
    output.finish(status)
    return json_response(view.body(status, output.items(status), out.num_tokens))


async def _stream(serving: OpenAIServingCompletions, prepared: _Prepared, view: ResponseView,
                  tools: ChatTools) -> AsyncIterator[bytes]:
    """Every event of one response; a failure after the 200 ends it with response.failed."""
    events = SSEEvents()
    run = _Run(serving, prepared)
    try:
        yield events("response.created", response=view.body("in_progress"))
        yield events("response.in_progress", response=view.body("in_progress"))
        output = ResponseOutput(events, tools.streamer())
        async for delta in run.deltas(serving.context.deadline()):
            for data in output.feed(delta.text):
                yield data
        out = run.outputs[0]
        status = response_status(out.finish_reason)
        for data in output.finish(status):
            yield data
        yield events(f"response.{status}",
                     response=view.body(status, output.items(status), out.num_tokens))
    except APIError as exc:
        yield events("response.failed", response=view.failed(_rename(exc)))
    except Exception as exc:  # a bug must still end the stream in a way clients read
        logger.exception("response stream %s failed", view.id)
        yield events("response.failed", response=view.failed(APIError(
            500, f"the stream failed: {type(exc).__name__}", code="internal_error")))
    finally:
        await run.close()
        serving._release(prepared)


def _dumped(value: Any) -> Any:
    return value.model_dump() if hasattr(value, "model_dump") else value


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

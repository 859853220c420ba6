"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the right
HTTP status: the one error model of the server, the router and every feature.

``APIError`` is raised anywhere a request is refused; ``error_response`` renders it for a
Starlette app, ``send_error`` for a raw ASGI app (the router), ``sse_error_event`` as the last
event of a stream whose 200 was already sent. No FastAPI here: the raw-ASGI router uses it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec
from starlette.responses import Response
from starlette.types import Message, Send

from surge.http.unicode import safe_text

__all__ = [
    "APIError",
    "error_body",
    "error_messages",
    "error_response",
    "send_error",
    "sse_error_event",
    "validation_message",
]

# OpenAI's error types by status; `code` says more precisely what happened.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class APIError(Exception):
    """A refusal to answer: raised anywhere in a handler, rendered by the app's handler."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, error_type: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        # Messages echo what the client sent: a lone surrogate in it must not make the
        # answer itself fail to encode (a 400 turned into a 500).
        message = safe_text(message)
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = None if param is None else safe_text(param)
        self.code = code
        self.error_type = error_type or _TYPE_BY_STATUS.get(
            status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)


def error_body(message: str, error_type: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": safe_text(message), "type": error_type,
                      "param": None if param is None else safe_text(param), "code": code}}


def error_response(error: APIError) -> Response:
    return Response(msgspec.json.encode(error.body()), status_code=error.status,
                    headers=error.headers, media_type="application/json")


def sse_error_event(error: APIError) -> bytes:
    """The last event of a stream that failed after its 200 was sent."""
    return b"data: " + msgspec.json.encode(error.body()) + b"\n\n"


def error_messages(error: APIError) -> tuple[Message, Message]:
    """The two ASGI messages of an error answer, for apps that speak ASGI directly."""
    body = msgspec.json.encode(error.body())
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    return ({"type": "http.response.start", "status": error.status, "headers": headers},
            {"type": "http.response.body", "body": body})


async def send_error(send: Send, error: APIError) -> None:
    start, body = error_messages(error)
    await send(start)
    await send(body)


async def send_error_preencoded(send: Send, error: APIError) -> None:
    """``send_error`` from bytes encoded once per distinct answer: overload refusals repeat
    the same few messages thousands of times a second."""
    status, headers, body = _encoded(error.status, error.message, error.error_type,
                                     error.param, error.code,
                                     tuple(sorted(error.headers.items())))
    await send({"type": "http.response.start", "status": status, "headers": list(headers)})
    await send({"type": "http.response.body", "body": body})


@functools.lru_cache(maxsize=256)
def _encoded(status: int, message: str, error_type: str, param: str | None, code: str | None,
             extra: tuple[tuple[str, str], ...]
             ) -> tuple[int, tuple[tuple[bytes, bytes], ...], bytes]:
    start, body = error_messages(APIError(status, message, param=param, code=code,
                                          error_type=error_type, headers=dict(extra)))
    return status, tuple(start["headers"]), body["body"]


# -- FastAPI's validation errors, said as a person would ------------------------------------

# Unions (prompt, stop, content) report one error per member type; say what is allowed once.
_ALLOWED = {
    "prompt": "a string, a list of strings, a list of token ids (integers) or a list of such "
              "lists",
    "stop": "a string or a list of strings",
    "content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts",
    "logit_bias": "an object mapping token ids to numbers",
}


def validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    """One clear sentence for the first problem, and the field it names (OpenAI's `param`)."""
    if not errors:
        return "the request is invalid", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('msg', '')}", None
    loc = _strip_body(first.get("loc", ()))
    field_loc, in_union = _split_union(loc)
    param = _param_path(field_loc)
    if param is None:
        return "the request body must be a JSON object with the documented fields", None
    if first.get("type") == "missing":
        return f"'{param}' is required", param
    field = field_loc[-1] if field_loc and isinstance(field_loc[-1], str) else None
    if in_union and field in _ALLOWED:
        return f"'{param}' is invalid: allowed is {_ALLOWED[field]}", param
    value = _short_repr(first.get("input"))
    return f"'{param}'={value} is invalid: {first.get('msg', 'bad value')}", param


def _strip_body(loc: Iterable[Any]) -> list[Any]:
    return [part for part in loc if part != "body"]


def _split_union(loc: list[Any]) -> tuple[list[Any], bool]:
    """The location up to the first union member tag, and whether there was one."""
    for index, part in enumerate(loc):
        if isinstance(part, str) and not _is_field_name(part):
            return loc[:index], True
    return loc, False


# Pydantic tags errors inside a union with the member's type: 'str', 'list[int]', 'Model'.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "bytes"})


def _is_field_name(part: Any) -> bool:
    return (isinstance(part, str) and part.isidentifier() and part not in _TYPE_TAGS
            and not part[0].isupper())


def _param_path(loc: Sequence[Any]) -> str | None:
    """('messages', 0, 'role') -> 'messages[0].role'; union member tags are dropped."""
    path = ""
    for part in loc:
        if isinstance(part, int) and path:
            path += f"[{part}]"
        elif _is_field_name(part):
            path += f".{part}" if path else part
    return path or None


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

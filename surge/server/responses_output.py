"""The answer of ``POST /v1/responses``: output items and, when streaming, OpenAI's events.

One ``ResponseOutput`` per request takes the generated text as it comes (all at once when not
streaming) and forms the output items: an assistant ``message`` with one ``output_text``
part, and, when the request has tools, a ``function_call`` item per call (the tool parser of
``surge.server.tools`` tells content from calls). Each change yields its events
(``response.output_item.added``, ``response.output_text.delta``,
``response.function_call_arguments.delta``, ..., numbered by ``sequence_number``), which a
non-streamed request simply drops: both answers come from the same code, so a streamed
response always adds up to the non-streamed one.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import msgspec

from surge.http.errors import APIError
from surge.server.responses_schemas import ResponsesRequest
from surge.server.tools import ToolStreamer

__all__ = ["ResponseOutput", "ResponseView", "SSEEvents", "response_status"]


def response_status(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


class ResponseView:
    """The response object of one request, as it stands (in progress, then final)."""

    def __init__(self, body: ResponsesRequest, response_id: str, created: int, model: str,
                 num_prompt_tokens: int) -> None:
        self.id = response_id
        self._body = body
        self._created = created
        self._model = model
        self._num_prompt_tokens = num_prompt_tokens

    def body(self, status: str, output: list[dict[str, Any]] | None = None,
             num_output_tokens: int | None = None) -> dict[str, Any]:
        body = self._body
        fmt = body.text.format if body.text is not None else None
        return {
            "id": self.id, "object": "response", "created_at": self._created,
            "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "model": self._model, "output": output or [],
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
            "store": False,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True)
                     if fmt is not None else {"type": "text"}},
            "tool_choice": _dumped(body.tool_choice) or "auto",
            "tools": [tool.model_dump(exclude_none=True) for tool in body.tools or []],
            "top_p": 1.0 if body.top_p is None else body.top_p, "truncation": "disabled",
            "usage": None if num_output_tokens is None else self.usage(num_output_tokens),
            "user": body.user, "metadata": body.metadata or {}}

    def usage(self, num_output_tokens: int) -> dict[str, Any]:
        # Prefix-cache hits are not reported per request on this path: cached_tokens is 0.
        return {"input_tokens": self._num_prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": num_output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self._num_prompt_tokens + num_output_tokens}

    def failed(self, error: APIError) -> dict[str, Any]:
        body = self.body("failed")
        body["error"] = {"code": error.code or error.error_type, "message": error.message}
        return body


def _dumped(value: Any) -> Any:
    return value.model_dump() if hasattr(value, "model_dump") else value


class SSEEvents:
    """SSE events as OpenAI frames them: ``event: <type>`` and its JSON, numbered from 0."""

    def __init__(self) -> None:
        self.sequence_number = 0

    def __call__(self, kind: str, **fields: Any) -> bytes:
        data = msgspec.json.encode({"type": kind, "sequence_number": self.sequence_number,
                                    **fields})
        self.sequence_number += 1
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


@dataclass
class _Message:
    id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    parts: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def item(self, status: str) -> dict[str, Any]:
        content = [] if status == "in_progress" else [_output_text(self.text)]
        return {"type": "message", "id": self.id, "status": status, "role": "assistant",
                "content": content}


@dataclass
class _Call:
    call_id: str
    name: str
    id: str = field(default_factory=lambda: f"fc_{uuid.uuid4().hex}")
    parts: list[str] = field(default_factory=list)

    @property
    def arguments(self) -> str:
        return "".join(self.parts)

    def item(self, status: str) -> dict[str, Any]:
        return {"type": "function_call", "id": self.id, "call_id": self.call_id,
                "name": self.name,
                "arguments": "" if status == "in_progress" else self.arguments,
                "status": status}


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class ResponseOutput:
    """The output items of one response as the text arrives, and the events of each change.

    ``tools``: the request's tool-call streamer (None without tools). With tools, whitespace
    around calls is not content: the separators between calls never open a message.
    """

    def __init__(self, events: SSEEvents, tools: ToolStreamer | None) -> None:
        self._events = events
        self._tools = tools
        self._items: list[_Message | _Call] = []
        self._open: _Message | _Call | None = None
        self._held = ""  # whitespace that may only separate calls

    def feed(self, text: str) -> list[bytes]:
        if self._tools is None:
            return self._content(text)
        return self._apply(self._tools.feed(text))

    def finish(self, status: str) -> list[bytes]:
        """The last events: every item closed (the last one with ``status``)."""
        data = self._apply(self._tools.finish()) if self._tools is not None else []
        if self._held and not any(isinstance(i, _Call) for i in self._items):
            data += self._content(self._held, hold=False)  # no calls: all text is content
        if not self._items:  # an empty answer is still one (empty) message
            data += self._content("", hold=False)
        return data + self._close(status)

    def items(self, status: str) -> list[dict[str, Any]]:
        """The final output; the last item carries ``status`` (incomplete if it was cut)."""
        last = len(self._items) - 1
        return [item.item(status if i == last else "completed")
                for i, item in enumerate(self._items)]

    # -- changes ---------------------------------------------------------------------------

    def _apply(self, deltas: list[dict[str, Any]]) -> list[bytes]:
        data: list[bytes] = []
        for delta in deltas:
            if "content" in delta:
                data += self._content(delta["content"])
            for call in delta.get("tool_calls", []):
                if "id" in call:
                    data += self._start_call(call["id"], call["function"]["name"])
                data += self._arguments(call["function"].get("arguments") or "")
        return data

    def _content(self, text: str, hold: bool = True) -> list[bytes]:
        if self._tools is not None and hold:
            text = self._unheld(text)
            if not text:
                return []
        data: list[bytes] = []
        if not isinstance(self._open, _Message):
            data += self._close("completed")
            data += self._start(_Message())
        message = self._open
        assert isinstance(message, _Message)
        if text:
            message.parts.append(text)
            data.append(self._events("response.output_text.delta", **self._where(message),
                                     content_index=0, delta=text, logprobs=[]))
        return data

    def _unheld(self, text: str) -> str:
        """With tools: the part of the text that is surely content. Trailing whitespace is
        held (a call may follow, which it would only separate) and leading whitespace after
        a call dropped, so where the text was cut into deltas never changes the items."""
        text = self._held + text
        if not isinstance(self._open, _Message) and self._items:
            text = text.lstrip()
        content = text.rstrip()
        self._held = text[len(content):]
        return content

    def _start_call(self, call_id: str, name: str) -> list[bytes]:
        self._held = ""  # whitespace before a call separates, it says nothing
        return self._close("completed") + self._start(_Call(call_id, name))

    def _arguments(self, fragment: str) -> list[bytes]:
        call = self._open
        if not fragment or not isinstance(call, _Call):
            return []
        call.parts.append(fragment)
        return [self._events("response.function_call_arguments.delta", **self._where(call),
                             delta=fragment)]

    def _start(self, item: _Message | _Call) -> list[bytes]:
        self._items.append(item)
        self._open = item
        data = [self._events("response.output_item.added", output_index=len(self._items) - 1,
                             item=item.item("in_progress"))]
        if isinstance(item, _Message):
            data.append(self._events("response.content_part.added", **self._where(item),
                                     content_index=0, part=_output_text("")))
        return data

    def _close(self, status: str) -> list[bytes]:
        item, self._open = self._open, None
        if item is None:
            return []
        where = self._where(item)
        if isinstance(item, _Message):
            data = [self._events("response.output_text.done", **where, content_index=0,
                                 text=item.text, logprobs=[]),
                    self._events("response.content_part.done", **where, content_index=0,
                                 part=_output_text(item.text))]
        else:
            data = [self._events("response.function_call_arguments.done", **where,
                                 name=item.name, arguments=item.arguments)]
        return [*data, self._events("response.output_item.done",
                                    output_index=where["output_index"],
                                    item=item.item(status))]

    def _where(self, item: _Message | _Call) -> dict[str, Any]:
        return {"item_id": item.id, "output_index": self._items.index(item)}

"""Reading a server-sent event stream line by line.

An SSE line ends at CR, LF or CRLF and nowhere else. ``str.splitlines()``, and so httpx's
``iter_lines()``, also break at U+2028, U+2029, U+0085 and a few control characters, which a
JSON payload may carry unescaped (a model can write any of them): the event is cut in two
and its JSON no longer parses. These readers split where the SSE grammar says only.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator

import httpx

__all__ = ["SSELines", "aiter_sse_lines", "iter_sse_lines"]

_LINE_END = re.compile(r"\r\n|\r|\n")


class SSELines:
    """Text chunks in, complete lines out (without their line ends)."""

    def __init__(self) -> None:
        self._pending = ""

    def feed(self, text: str) -> list[str]:
        text = self._pending + text
        # A final CR may be the first half of a CRLF split between two chunks.
        held = "\r" if text.endswith("\r") else ""
        parts = _LINE_END.split(text[:len(text) - len(held)])
        self._pending = parts.pop() + held
        return parts

    def close(self) -> list[str]:
        """The last line, when the stream ended without a line end."""
        rest, self._pending = self._pending.rstrip("\r"), ""
        return [rest] if rest else []


async def aiter_sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    lines = SSELines()
    async for chunk in response.aiter_text():
        for line in lines.feed(chunk):
            yield line
    for line in lines.close():
        yield line


def iter_sse_lines(response: httpx.Response) -> Iterator[str]:
    lines = SSELines()
    for chunk in response.iter_text():
        yield from lines.feed(chunk)
    yield from lines.close()

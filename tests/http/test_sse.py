"""SSE lines end at CR, LF or CRLF only, however the stream is cut into chunks."""

from __future__ import annotations

import json

import pytest

from surge.http.sse import SSELines

# A model may write any of these; JSON carries them unescaped, str.splitlines() breaks there.
UNICODE_BREAKS = "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e"


def _lines(stream: str, cut_every: int) -> list[str]:
    reader = SSELines()
    found: list[str] = []
    for start in range(0, len(stream), cut_every):
        found += reader.feed(stream[start:start + cut_every])
    return found + reader.close()


@pytest.mark.parametrize("cut_every", [1, 2, 3, 7, 1000])
@pytest.mark.parametrize("line_end", ["\n", "\r\n", "\r"])
def test_events_survive_unicode_line_breaks_and_any_chunking(cut_every: int,
                                                             line_end: str) -> None:
    payloads = [{"content": f"a{ch}b"} for ch in UNICODE_BREAKS] + [{"content": "end"}]
    stream = "".join(f"data: {json.dumps(p, ensure_ascii=False)}{line_end}{line_end}"
                     for p in payloads) + f"data: [DONE]{line_end}{line_end}"
    data = [line[len("data: "):] for line in _lines(stream, cut_every) if line]
    assert data[-1] == "[DONE]"
    assert [json.loads(d) for d in data[:-1]] == payloads


def test_a_last_line_without_its_end_is_kept() -> None:
    assert _lines("data: 1\n\ndata: 2", 3) == ["data: 1", "", "data: 2"]

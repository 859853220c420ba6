"""The output filter: blocked phrases stop the stream before them with "content_filter",
whole words only, any case, however the text is split into pieces."""

from __future__ import annotations

from pathlib import Path

import pytest

from surge.stages.api import StageRequest, Stop
from surge.stages.output_filter import OutputFilter

WORDS = ["darn it", "heck", "forbidden topic"]
# (text, what is sent, stopped?)
TABLE = [
    ("oh well darn it all", "oh well ", True),
    ("say heck", "say ", True),
    ("Heck no", "", True),
    ("a HECK.", "a ", True),
    ("the forbidden\ntopic again", "the ", True),
    ("checking heckle darn", "checking heckle darn", False),
    ("darn itself", "darn itself", False),
    ("a heck_ b", "a heck_ b", False),
    ("nothing to see", "nothing to see", False),
]


def _run(stream: object, pieces: list[str]) -> tuple[str, str | None]:
    sent = []
    for piece in pieces:
        result = stream.on_text(piece)  # type: ignore[attr-defined]
        if isinstance(result, Stop):
            return "".join(sent) + result.text, result.finish_reason
        sent.append(result)
    end = stream.on_end()  # type: ignore[attr-defined]
    if isinstance(end, Stop):
        return "".join(sent) + end.text, end.finish_reason
    return "".join(sent) + end, None


@pytest.mark.parametrize(("text", "sent", "stopped"), TABLE)
def test_split_anywhere(text: str, sent: str, stopped: bool) -> None:
    block = OutputFilter(words=WORDS)
    expected = (sent, "content_filter" if stopped else None)
    for cut in range(len(text) + 1):
        assert _run(block.open(None), [text[:cut], text[cut:]]) == expected, cut  # type: ignore[arg-type]
    assert _run(block.open(None), list(text)) == expected  # type: ignore[arg-type]


def test_nothing_blocked_is_ever_sent_mid_stream() -> None:
    stream = OutputFilter(words=["heck"]).open(None)  # type: ignore[arg-type]
    assert stream.on_text("so he") == "so "
    assert stream.on_text("c") == ""
    assert stream.on_text("k") == ""  # "heck" may be "heckle": wait for the next character
    assert stream.on_text("le ") == "heckle "


def test_words_from_a_file_and_own_reason(tmp_path: Path) -> None:
    path = tmp_path / "words.txt"
    path.write_text("# comment\nSecret Plan\n\n")
    block = OutputFilter(file=str(path), finish_reason="policy")
    assert _run(block.open(None), ["the secret  ", "plan is"]) == ("the ", "policy")  # type: ignore[arg-type]


def test_prompts_refused_when_asked() -> None:
    block = OutputFilter(words=["heck"], prompts=True)
    request = StageRequest("chat", None, [{"role": "user", "content": "what the heck"}], None,
                           {}, None, {}, "r")
    refusal = block.before(request)
    assert refusal is not None and getattr(refusal, "code", None) == "content_filter"


def test_bad_options() -> None:
    with pytest.raises(ValueError, match="no blocked words"):
        OutputFilter()
    with pytest.raises(ValueError, match="list of strings"):
        OutputFilter(words=["a", 3])  # type: ignore[list-item]

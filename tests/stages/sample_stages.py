"""Stages the tests load with ``--stage tests.stages.sample_stages:Class``; each acts only on
requests whose last user message (or prompt) carries its marker, so one server serves every
test."""

from __future__ import annotations

import threading
import time

from surge.stages import Answer, Refuse, Route, StageRequest, Stop

MARKERS = ("#answer", "#refuse", "#boom", "#route", "#badroute", "#upper", "#slow", "#stop",
           "#postboom", "#script")


class Scripted:
    """A pre-stage (async: runs on the event loop)."""

    name = "scripted"

    async def before(self, request: StageRequest) -> Answer | Refuse | Route | None:
        text = request.last_user_text() or ""
        if "#answer" in text:
            return Answer("a canned reply from the stage")
        if "#refuse" in text:
            return Refuse("no markers of refusal allowed")
        if "#boom" in text:
            raise RuntimeError("the stage blew up on purpose")
        if "#route" in text:
            return Route("tiny-small")
        if "#badroute" in text:
            return Route("no-such-model")
        if "#upper" in text:
            request.edit_texts(str.upper)
        return None


class Sleepy:
    """A blocking pre-stage (plain def): sleeps 0.5 s on '#slow', in a worker thread."""

    def __init__(self, seconds: float = 0.5) -> None:
        self.seconds = seconds
        self.threads: set[str] = set()

    def before(self, request: StageRequest) -> None:
        if "#slow" in (request.last_user_text() or ""):
            self.threads.add(threading.current_thread().name)
            time.sleep(self.seconds)


class Stopper:
    """A post-stage: '#stop' ends the stream after ``chars`` characters with its own finish
    reason; '#postboom' raises on the first text."""

    blocking = False

    def __init__(self, chars: int = 12, finish_reason: str = "stopped_by_stage") -> None:
        self.chars = chars
        self.finish_reason = finish_reason

    def open(self, request: StageRequest) -> _StopStream | None:
        text = request.last_user_text() or ""
        if "#stop" in text or "#postboom" in text:
            return _StopStream(self, "#postboom" in text)
        return None


class _StopStream:
    def __init__(self, stage: Stopper, boom: bool) -> None:
        self.stage = stage
        self.boom = boom
        self.sent = 0

    def on_text(self, text: str) -> str | Stop:
        if self.boom:
            raise ValueError("the post-stage blew up on purpose")
        room = self.stage.chars - self.sent
        if len(text) >= room:
            return Stop(self.stage.finish_reason, text[:room])
        self.sent += len(text)
        return text

    def on_end(self) -> str:
        return ""


class Script:
    """A post-stage that replaces the model's text with ``text``, one piece of ``piece``
    characters per piece the model sends (the random tiny model writes no e-mail address:
    this puts one, split across chunks, in front of the stages after it); on '#script'."""

    blocking = False

    def __init__(self, text: str, piece: int = 3) -> None:
        self.text = text
        self.piece = piece

    def open(self, request: StageRequest) -> _ScriptStream | None:
        return _ScriptStream(self) if "#script" in (request.last_user_text() or "") else None


class _ScriptStream:
    def __init__(self, stage: Script) -> None:
        self.stage = stage
        self.at = 0

    def on_text(self, text: str) -> str:
        piece = self.stage.text[self.at:self.at + self.stage.piece]
        self.at += len(piece)
        return piece

    def on_end(self) -> str:
        rest, self.at = self.stage.text[self.at:], len(self.stage.text)
        return rest


NOT_A_STAGE = object()

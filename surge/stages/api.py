"""The typed interface of a request stage: what a stage sees, what it may decide.

A **pre-stage** has ``before(request)``: it sees a ``StageRequest`` before admission, may
change its messages, prompt or sampling fields in place, and returns None (go on) or one
decision: ``Answer`` (reply without the engine), ``Route`` (send it to another served model)
or ``Refuse`` (a 4xx the client sees, naming the stage).

A **post-stage** has ``open(request)``, called once per choice: it returns a ``PostStream``
(or None to leave this choice alone) whose ``on_text(text)`` gets each piece of text as it
streams and returns what to send now (it may hold some back, for a match that could continue
in the next piece), or ``Stop`` to end the stream with its own finish reason; ``on_end()``
flushes what it held when the model finished.

A post-stage that changes or cuts the text should say ``rewrites_output = True``: the server
then refuses requests for token logprobs (they would show what the stage took out).

One class may be both. Methods may be ``async def`` (run on the event loop: they must not
block) or plain ``def``: a plain one runs in a worker thread unless the stage says
``blocking = False`` (fast, pure-Python work such as a regex), and ``blocking = True`` sends
even an ``async def`` stage's calls to a thread. An exception in a stage fails that request
only, with a 500 that names the stage.

A stage is configured by its constructor's keyword arguments (``--stage module:Class:{json}``)
and may have ``setup(host)``, called once when the server starts, to check its settings
against what the server serves and to get the ``StageHost`` (embeddings from a served model).
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "Answer",
    "Continue",
    "PostStage",
    "PostStream",
    "PreDecision",
    "PreStage",
    "Refuse",
    "Route",
    "StageHost",
    "StageRequest",
    "Stop",
]


@dataclass
class StageRequest:
    """One request as stages see it. ``messages`` (chat) or ``prompt`` (completions) and
    ``params`` (the other body fields: ``max_tokens``, ``temperature``, ...) may be changed
    in place; ``state`` is shared by every stage of this request (pre and post)."""

    endpoint: Literal["chat", "completions"]
    model: str | None
    messages: list[dict[str, Any]] | None
    prompt: Any
    params: dict[str, Any]
    user: str | None
    headers: Mapping[str, str]
    request_id: str
    state: dict[str, Any] = field(default_factory=dict)

    def last_user_text(self) -> str | None:
        """The text of the last user message (chat), or the prompt when it is one string."""
        if self.messages is None:
            return self.prompt if isinstance(self.prompt, str) else None
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return message_text(message)
        return None

    def edit_texts(self, change: Any) -> bool:
        """Apply ``change(text) -> text`` to every text of the request (each message's
        content and text parts, or each string prompt); True if any changed."""
        changed = False
        if self.messages is not None:
            for message in self.messages:
                content = message.get("content")
                if isinstance(content, str):
                    new = change(content)
                    changed |= new != content
                    message["content"] = new
                elif isinstance(content, list):
                    for part in content:
                        if isinstance(part, dict) and isinstance(part.get("text"), str):
                            new = change(part["text"])
                            changed |= new != part["text"]
                            part["text"] = new
            return changed
        if isinstance(self.prompt, str):
            new = change(self.prompt)
            changed, self.prompt = new != self.prompt, new
        elif isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            new_list = [change(p) for p in self.prompt]
            changed, self.prompt = new_list != self.prompt, new_list
        return changed  # token-id prompts have no text to change


def message_text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


@dataclass(frozen=True)
class Answer:
    """Reply with ``text`` as the model's answer; the engine never sees the request."""

    text: str
    finish_reason: str = "stop"


@dataclass(frozen=True)
class Route:
    """Send the request to the served text-generation model ``model``."""

    model: str


@dataclass(frozen=True)
class Refuse:
    """Refuse the request: the client gets ``status`` (a 4xx) with ``message``."""

    message: str
    status: int = 400
    code: str = "refused_by_stage"

    def __post_init__(self) -> None:
        if not 400 <= self.status < 500:
            raise ValueError(f"Refuse(status={self.status}) is invalid: allowed is a 4xx "
                             "status (a stage that fails should raise instead)")


@dataclass(frozen=True)
class Continue:
    """Go on (as returning None does), counting the decision under ``label`` (for example
    ``redacted``) in ``surge:stage_decisions_total``. Keep labels few and fixed."""

    label: str = "continue"


PreDecision = Answer | Route | Refuse | Continue | None


@dataclass(frozen=True)
class Stop:
    """End the stream now: ``text`` (what may still be sent) goes out, then the stream ends
    with ``finish_reason``, and the engine request is aborted (its KV freed)."""

    finish_reason: str
    text: str = ""


@runtime_checkable
class PreStage(Protocol):
    def before(self, request: StageRequest) -> PreDecision | Awaitable[PreDecision]: ...


@runtime_checkable
class PostStream(Protocol):
    def on_text(self, text: str) -> str | Stop | Awaitable[str | Stop]: ...

    def on_end(self) -> str | Stop | Awaitable[str | Stop]: ...


@runtime_checkable
class PostStage(Protocol):
    def open(self, request: StageRequest) -> PostStream | None: ...


class StageHost(Protocol):
    """What a stage may use of the server it runs in (given to ``setup``)."""

    def served_models(self, task: str) -> list[str]:
        """Names of the served models of ``task`` (``generate``, ``embed``, ``classify``)."""
        ...

    async def embed(self, model: str, texts: Sequence[str]) -> list[np.ndarray]:
        """Vectors of ``texts`` by the served embedding model ``model``, through the same
        dynamic batcher as /v1/embeddings; raises while that model cannot answer."""
        ...

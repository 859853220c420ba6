"""The support chat's moving parts: the prompt sent for each new message, and ``ChatTurn``, one
answer being generated.

A turn reads the model server's stream on its own task and hands deltas to the HTTP response
through a queue. Why a separate task: when the user presses stop (the browser aborts its fetch,
or an API client calls the stop endpoint), Starlette cancels the response; doing the cleanup
there would run inside a cancelled scope where every await fails. The turn instead is
cancelled once, closes its upstream connection (so the model server aborts the generation in
its engine and frees its KV blocks) and stores the partial answer marked ``stopped``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from surge.apps.llm_backend import ChatStream, UpstreamStreamError
from surge.apps.storage import OrderRecord

__all__ = ["ORDER_TOOL_NAME", "ChatTurn", "TurnRegistry", "TurnResult", "build_messages",
           "order_lookup_tool", "order_result", "tool_messages"]

logger = logging.getLogger(__name__)

# -- the order-status tool ---------------------------------------------------------------------
# When a message names an order (SRG-1234), the chat first asks the model for a call of this
# tool (tool_choice names it, so the server's constrained decoding makes the arguments valid:
# the id is one of those in the message), runs it against the apps' database, and sends the
# result back with the conversation, so the answer comes from the order's data.

ORDER_TOOL_NAME = "lookup_order"
ORDER_ID = re.compile(r"\bSRG-\d{4}\b", re.IGNORECASE)


def order_lookup_tool(user_content: str) -> dict[str, Any] | None:
    """The tool offered for this message (its ids as the only allowed arguments), or None
    when the message names no order."""
    ids = list(dict.fromkeys(m.upper() for m in ORDER_ID.findall(user_content)))
    if not ids:
        return None
    return {"type": "function", "function": {
        "name": ORDER_TOOL_NAME,
        "description": "Look up an order of our shop: its item, status, carrier, tracking "
                       "number and estimated delivery date.",
        "parameters": {"type": "object", "properties": {"order_id": {
            "type": "string", "enum": ids, "description": "the order number, like SRG-1001"}},
            "required": ["order_id"], "additionalProperties": False}}}


def order_result(order_id: str, record: OrderRecord | None) -> dict[str, Any]:
    """What the tool returns to the model (and the page shows)."""
    if record is None:
        return {"order_id": order_id, "found": False,
                "message": "There is no order with this number."}
    fields = ("item", "status", "carrier", "tracking_number", "estimated_delivery", "note")
    return {"order_id": record.id, "found": True,
            **{name: getattr(record, name) for name in fields
               if getattr(record, name) is not None}}


def tool_messages(lookup: dict[str, Any], answer_to: str | None = None
                  ) -> list[dict[str, Any]]:
    """A stored lookup ({call_id, name, arguments, result}) as the assistant's call and the
    tool's answer, in OpenAI's message shapes. ``answer_to``: the question the next answer is
    for, asked again after the data (SmolLM2-135M otherwise tends to echo the data back)."""
    messages: list[dict[str, Any]] = [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": lookup["call_id"], "type": "function", "function": {
                "name": lookup["name"], "arguments": json.dumps(lookup["arguments"])}}]},
        {"role": "tool", "tool_call_id": lookup["call_id"],
         "content": json.dumps(lookup["result"])}]
    if answer_to is not None:
        messages.append({"role": "user", "content": f"Using this result, answer: {answer_to}"})
    return messages


def build_messages(system_prompt: str, history: Sequence[tuple[str, str]], user_content: str,
                   max_history: int) -> list[dict[str, Any]]:
    """System prompt, then the last ``max_history`` earlier messages, then the new one.
    Assistant messages that stopped before any text are left out (nothing was said); a stored
    tool lookup becomes the assistant's call and the tool's answer."""
    earlier = [(role, text) for role, text in history
               if role in ("user", "assistant", "tool") and text][-max_history:]
    messages: list[dict[str, Any]] = (
        [{"role": "system", "content": system_prompt}] if system_prompt else [])
    for role, text in earlier:
        if role != "tool":
            messages.append({"role": role, "content": text})
            continue
        with contextlib.suppress(ValueError, KeyError, TypeError):
            messages += tool_messages(json.loads(text))
    messages.append({"role": "user", "content": user_content})
    return messages


@dataclass
class TurnResult:
    text: str
    status: str  # "complete", "stopped" or "error"
    finish_reason: str | None
    error: dict[str, Any] | None = None


# Stores a finished (or stopped) answer; returns the stored message's id, or None.
Persist = Callable[[TurnResult], Awaitable[int | None]]


class ChatTurn:
    """One assistant answer streaming from the model server."""

    def __init__(self, stream: ChatStream, persist: Persist) -> None:
        self._stream = stream
        self._persist = persist
        self._events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def stop(self) -> bool:
        """Stop generating; True if the turn was still running."""
        if self._task is None or self._task.done():
            return False
        return self._task.cancel()

    async def wait(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """``{"type": "delta", "text"}`` events, then one ``{"type": "done", ...}``."""
        while (event := await self._events.get()) is not None:
            yield event

    async def _run(self) -> None:
        result = await self._read()
        try:
            message_id = await self._persist(result)
        except Exception:
            logger.exception("could not store the assistant's answer")
            message_id = None
            result.error = result.error or {"message": "the answer could not be stored",
                                            "type": "server_error", "code": "storage_error"}
        self._events.put_nowait({"type": "done", "status": result.status,
                                 "finish_reason": result.finish_reason,
                                 "message_id": message_id, "error": result.error})
        self._events.put_nowait(None)

    async def _read(self) -> TurnResult:
        parts: list[str] = []
        finish_reason: str | None = None
        status, error = "complete", None
        try:
            async for delta in self._stream.deltas():
                if delta.text:
                    parts.append(delta.text)
                    self._events.put_nowait({"type": "delta", "text": delta.text})
                finish_reason = delta.finish_reason or finish_reason
        except asyncio.CancelledError:
            status = "stopped"  # we are the only ones who cancel this task
        except UpstreamStreamError as exc:
            status, error = "error", exc.error
        except (httpx.HTTPError, ValueError) as exc:
            status = "error"
            error = {"message": f"the model server's stream broke: {exc!r}",
                     "type": "server_error", "code": "upstream_stream_broken"}
        finally:
            # Hanging up is what makes the model server abort the generation in its engine.
            with contextlib.suppress(Exception):
                await self._stream.aclose()
        return TurnResult("".join(parts), status, finish_reason, error)


class TurnRegistry:
    """The answers streaming right now, by session id: at most one per conversation, so two
    answers never interleave in one history, and the stop endpoint can find it."""

    def __init__(self) -> None:
        # None: a message was accepted and its answer is being requested.
        self._turns: dict[str, ChatTurn | None] = {}

    def reserve(self, session_id: str) -> bool:
        """Claim the conversation for a new answer; False if one is already running."""
        if session_id in self._turns:
            return False
        self._turns[session_id] = None
        return True

    def attach(self, session_id: str, turn: ChatTurn) -> None:
        self._turns[session_id] = turn

    def release(self, session_id: str) -> None:
        self._turns.pop(session_id, None)

    def stop(self, session_id: str) -> bool:
        turn = self._turns.get(session_id)
        return turn.stop() if turn is not None else False

    def stop_all(self) -> None:
        for turn in list(self._turns.values()):
            if turn is not None:
                turn.stop()

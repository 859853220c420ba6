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
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from surge.apps.llm_backend import ChatStream, UpstreamStreamError

__all__ = ["ChatTurn", "TurnRegistry", "TurnResult", "build_messages"]

logger = logging.getLogger(__name__)


def build_messages(system_prompt: str, history: Sequence[tuple[str, str]], user_content: str,
                   max_history: int) -> list[dict[str, str]]:
    """System prompt, then the last ``max_history`` earlier messages, then the new one.
    Assistant messages that stopped before any text are left out (nothing was said)."""
    earlier = [(role, text) for role, text in history
               if role in ("user", "assistant") and text][-max_history:]
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages += [{"role": role, "content": text} for role, text in earlier]
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

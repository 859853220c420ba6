"""The HTTP endpoints behind the pages, under ``/api/apps``: chat sessions and their streamed
messages, history list/export/delete, writing-assistant generations, and the status numbers.

Every page works through these endpoints only, so the applications can be driven without the
UI. Errors use OpenAI's shape (``surge.http.errors.APIError``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Path, Request
from starlette.responses import Response

from surge.apps import schemas
from surge.apps.chat import (
    ORDER_TOOL_NAME,
    ChatTurn,
    TurnRegistry,
    TurnResult,
    build_messages,
    order_lookup_tool,
    order_result,
    tool_messages,
)
from surge.apps.config import AppsSettings
from surge.apps.identity import ApiKeyGuard, user_id
from surge.apps.llm_backend import LLMBackend
from surge.apps.status import StatusWindow, parse_metrics
from surge.apps.storage import GenerationRecord, Store, new_id
from surge.apps.writing import LENGTHS, TEMPLATES, TONES, build_prompt, check_request
from surge.http.errors import APIError
from surge.http.openapi import error_responses, event_stream_content
from surge.http.responses import SSEResponse, sse_event

__all__ = ["API_PREFIX", "AppsRuntime", "build_router"]

API_PREFIX = "/api/apps"
_T = TypeVar("_T")

SessionId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
UserId = Annotated[str, Depends(user_id)]


@dataclass
class AppsRuntime:
    """The apps' state while the server runs: settings, the store (None with --no-history),
    the model server client, the answers streaming now, and recent metrics scrapes."""

    settings: AppsSettings
    backend: LLMBackend
    store: Store | None = None
    turns: TurnRegistry = field(default_factory=TurnRegistry)
    status_window: StatusWindow = field(default_factory=StatusWindow)
    # Database calls are short but blocking: they run here, never on the event loop.
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(4, thread_name_prefix="surge-apps-db"))

    async def db(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self.executor,
                                                                partial(fn, *args))

    def require_store(self) -> Store:
        if self.store is None:
            raise APIError(404, "history is disabled on this server (--no-history): nothing "
                           "is stored, so there is nothing to list, export or delete",
                           code="history_disabled")
        return self.store


# The statuses each route can answer, by cause; a route documents the groups that apply.
_ANY = {400: "invalid request or X-User-ID header (the message names the field)",
        500: "unexpected server error"}
_KEY = {401: "this server needs an API key (--api-key): send 'Authorization: Bearer KEY'"}
_BODY = {413: "request body too large (--max-body-bytes)"}
_HISTORY = {404: "history is disabled on this server (--no-history)"}
_OWNED = {404: "not found, or not this user's"}
# A request the apps forward to the model server gets its refusal as it is.
_MODEL = {400: "the model server refused the request (e.g. the prompt is too long)",
          404: "unknown model", 429: "rate limited or server busy (Retry-After)",
          502: "the model server cannot be reached or failed",
          503: "the model is not ready (Retry-After)",
          504: "the model server's --request-timeout ran out"}


def _errors(*groups: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: the union of the groups, in OpenAI's error shape."""
    merged: dict[int, list[str]] = {}
    for group in groups:
        for status, text in group.items():
            merged.setdefault(status, []).append(text)
    return error_responses({status: "; ".join(texts) for status, texts in merged.items()})


def build_router(runtime: AppsRuntime) -> APIRouter:
    guard = ApiKeyGuard(runtime.settings.api_keys)
    router = APIRouter(prefix=API_PREFIX, tags=["apps"])
    _add_config_route(router, runtime, guard)
    secured = APIRouter(dependencies=[Depends(guard)])
    _add_session_routes(secured, runtime)
    _add_message_routes(secured, runtime)
    _add_history_routes(secured, runtime)
    _add_writing_routes(secured, runtime)
    _add_status_route(secured, runtime)
    router.include_router(secured)
    return router


def _add_config_route(router: APIRouter, rt: AppsRuntime, guard: ApiKeyGuard) -> None:
    @router.get("/config", response_model=schemas.AppsConfig, responses=_errors(_ANY))
    async def get_config() -> dict[str, Any]:
        """What the pages need before their first request (no API key needed)."""
        return {"history": rt.store is not None, "api_key_required": guard.enabled,
                "chat_max_tokens": rt.settings.chat_max_tokens,
                "writing": _writing_options()}


# -- chat sessions -----------------------------------------------------------------------------


def _add_session_routes(router: APIRouter, rt: AppsRuntime) -> None:
    @router.post("/chat/sessions", response_model=schemas.Session, status_code=201,
                 responses=_errors(_ANY, _KEY, _BODY))
    async def create_session(body: schemas.SessionCreate, user: UserId) -> dict[str, Any]:
        """A new conversation. With --no-history the id is not stored: send earlier messages
        in each message's `history`."""
        if rt.store is None:
            now = time.time()
            return {"id": new_id(), "title": body.title, "created_at": now, "updated_at": now}
        return (await rt.db(rt.store.create_session, user, body.title)).to_dict()

    @router.get("/chat/sessions", response_model=schemas.SessionList,
                responses=_errors(_ANY, _KEY, _HISTORY))
    async def list_sessions(user: UserId) -> dict[str, Any]:
        """The user's conversations, most recently active first."""
        sessions = await rt.db(rt.require_store().list_sessions, user)
        return {"object": "list", "data": [s.to_dict() for s in sessions]}

    @router.get("/chat/sessions/{session_id}", response_model=schemas.SessionDetail,
                responses=_errors(_ANY, _KEY, _OWNED, _HISTORY))
    async def get_session(session_id: SessionId, user: UserId) -> dict[str, Any]:
        store = rt.require_store()
        session = await rt.db(store.get_session, user, session_id)
        messages = await rt.db(store.messages, user, session_id)
        if session is None or messages is None:
            raise _session_not_found(session_id)
        return {**session.to_dict(), "messages": [m.to_dict() for m in messages]}

    @router.delete("/chat/sessions/{session_id}", status_code=204, response_class=Response,
                   responses=_errors(_ANY, _KEY, _OWNED, _HISTORY))
    async def delete_session(session_id: SessionId, user: UserId) -> Response:
        rt.turns.stop(session_id)  # an answer still streaming would be stored nowhere
        if not await rt.db(rt.require_store().delete_session, user, session_id):
            raise _session_not_found(session_id)
        return Response(status_code=204)


def _session_not_found(session_id: str) -> APIError:
    return APIError(404, f"chat session {session_id!r} not found (it does not exist or belongs "
                    "to another user)", param="session_id", code="session_not_found")


# -- messages: the streamed answer ---------------------------------------------------------------


_STREAM_DOC = {200: {"description": "text/event-stream of JSON events: `start` (with "
                     "`tool_calls`: the order-status lookups made for this message, each "
                     "{call_id, name, arguments, result}), `delta` ({text}), then one `done` "
                     "({status: complete|stopped|error, finish_reason, message_id, error})",
                     "content": event_stream_content("a JSON event: start, delta or done")},
               **_errors(_ANY, _KEY, _BODY, _OWNED, _MODEL,
                         {409: "an answer is already being generated in this conversation"})}


def _add_message_routes(router: APIRouter, rt: AppsRuntime) -> None:
    @router.post("/chat/sessions/{session_id}/messages", response_class=Response,
                 responses=_STREAM_DOC)
    async def send_message(session_id: SessionId, body: schemas.MessageCreate,
                           request: Request, user: UserId) -> Response:
        """Store the user's message, stream the assistant's answer as it is generated, and
        store the answer when it ends (marked `stopped`, with the partial text, if the client
        hangs up or calls the stop endpoint)."""
        history = await _history(rt, user, session_id, body)
        if not rt.turns.reserve(session_id):
            raise APIError(409, "an answer is still being generated in this conversation: wait "
                           f"for it or stop it (POST {API_PREFIX}/chat/sessions/{session_id}"
                           "/stop)", code="answer_in_progress")
        try:
            return await _start_turn(rt, user, session_id, body, history, request)
        except BaseException:
            rt.turns.release(session_id)
            raise

    @router.post("/chat/sessions/{session_id}/stop", response_model=schemas.StopResult,
                 responses=_errors(_ANY, _KEY, _BODY, _OWNED))
    async def stop_answer(session_id: SessionId, user: UserId) -> dict[str, bool]:
        """Stop the answer being generated: the engine aborts it at once."""
        if rt.store is not None and await rt.db(rt.store.get_session, user, session_id) is None:
            raise _session_not_found(session_id)
        return {"stopped": rt.turns.stop(session_id)}


async def _history(rt: AppsRuntime, user: str, session_id: str,
                   body: schemas.MessageCreate) -> list[tuple[str, str]]:
    if rt.store is None:
        return [(item.role, item.content) for item in body.history]
    messages = await rt.db(rt.store.messages, user, session_id)
    if messages is None:
        raise _session_not_found(session_id)
    return [(m.role, m.content) for m in messages]


async def _start_turn(rt: AppsRuntime, user: str, session_id: str, body: schemas.MessageCreate,
                      history: list[tuple[str, str]], request: Request) -> Response:
    limit = rt.settings.chat_max_tokens
    if body.max_tokens is not None and body.max_tokens > limit:
        raise APIError(400, f"'max_tokens'={body.max_tokens} is invalid: allowed is at most "
                       f"{limit} (--chat-max-tokens)", param="max_tokens")
    messages = build_messages(rt.settings.chat_system_prompt, history, body.content,
                              rt.settings.chat_history_messages)
    # A message naming an order: the model calls the order-status tool first (surge.apps.chat).
    lookup = await _lookup_order(rt, messages, body, user, session_id, request)
    if lookup is not None:
        messages += tool_messages(lookup, answer_to=body.content)
    # ``user`` scopes the model server's response cache (and its fair scheduling) to this
    # user: nobody gets, or learns by an instant answer, another user's conversation.
    payload: dict[str, Any] = {"messages": messages, "max_tokens": body.max_tokens or limit,
                               "temperature": body.temperature, "user": user}
    if body.seed is not None:
        payload["seed"] = body.seed
    if body.model:
        payload["model"] = body.model
    stream = await rt.backend.open_chat_stream(payload, session_id,
                                               request.headers.get("authorization"))
    try:
        stored = (await rt.db(rt.store.add_message, user, session_id, "user", body.content)
                  if rt.store is not None else None)
        if lookup is not None and rt.store is not None:
            await rt.db(rt.store.add_message, user, session_id, "tool", json.dumps(lookup))
    except BaseException:
        await stream.aclose()
        raise
    turn = ChatTurn(stream, partial(_persist_answer, rt, user, session_id))
    rt.turns.attach(session_id, turn)
    turn.start()
    start = {"type": "start", "session_id": session_id,
             "user_message_id": stored.id if stored else None,
             "tool_calls": [lookup] if lookup is not None else []}
    return _turn_response(turn, start, partial(rt.turns.release, session_id))


async def _lookup_order(rt: AppsRuntime, messages: list[dict[str, Any]],
                        body: schemas.MessageCreate, user: str, session_id: str,
                        request: Request) -> dict[str, Any] | None:
    """The order-status tool's call and result, when the message names an order and the apps
    have their database (the orders live there); the model writes the call (its arguments
    constrained to the function's schema by the server), the database answers it."""
    tool = order_lookup_tool(body.content)
    if tool is None or rt.store is None:
        return None
    payload: dict[str, Any] = {
        "messages": messages, "tools": [tool], "parallel_tool_calls": False,
        "tool_choice": {"type": "function", "function": {"name": ORDER_TOOL_NAME}},
        "max_tokens": 64, "temperature": 0, "user": user}
    if body.model:
        payload["model"] = body.model
    answer = await rt.backend.create_chat(payload, session_id,
                                          request.headers.get("authorization"))
    calls = (answer.get("choices") or [{}])[0].get("message", {}).get("tool_calls") or []
    try:
        arguments = json.loads(calls[0]["function"]["arguments"])
        order_id = str(arguments["order_id"])
    except (IndexError, KeyError, TypeError, ValueError):  # cut off (max_tokens): no lookup
        return None
    record = await rt.db(rt.store.get_order, order_id)
    return {"call_id": calls[0]["id"], "name": ORDER_TOOL_NAME, "arguments": arguments,
            "result": order_result(order_id, record)}


async def _persist_answer(rt: AppsRuntime, user: str, session_id: str,
                          result: TurnResult) -> int | None:
    if rt.store is None:
        return None
    stored = await rt.db(rt.store.add_message, user, session_id, "assistant", result.text,
                         result.status, result.finish_reason)
    return stored.id if stored else None


def _turn_response(turn: ChatTurn, start: dict[str, Any],
                   release: Callable[[], None]) -> SSEResponse:
    """SSE of one turn. When the client goes away, Starlette cancels the streaming; then (out
    of the cancelled scope) the turn is stopped and its partial answer stored before the
    conversation is released for its next message."""

    async def events() -> AsyncIterator[bytes]:
        yield sse_event(start)
        async for event in turn.events():
            yield sse_event(event)

    async def close() -> None:
        turn.stop()
        await turn.wait()
        release()

    return SSEResponse(events(), on_close=close)


# -- a user's whole history ------------------------------------------------------------------


def _add_history_routes(router: APIRouter, rt: AppsRuntime) -> None:
    @router.get("/history/export", response_model=schemas.HistoryExport,
                responses=_errors(_ANY, _KEY, _HISTORY))
    async def export_history(user: UserId) -> Response:
        """Everything stored for the user (conversations with messages, generations), as a
        JSON file download."""
        data = await rt.db(rt.require_store().export_user, user)
        return Response(json.dumps(data, indent=1), media_type="application/json", headers={
            "Content-Disposition": 'attachment; filename="surge-history.json"'})

    @router.delete("/history", response_model=schemas.DeleteResult,
                   responses=_errors(_ANY, _KEY, _HISTORY))
    async def delete_history(user: UserId) -> dict[str, int]:
        """Delete every conversation and generation of the user."""
        return await rt.db(rt.require_store().delete_user, user)


# -- writing assistant ---------------------------------------------------------------------------


def _writing_options() -> dict[str, Any]:
    return {"templates": [{"name": t.name, "title": t.title, "fields": list(t.fields)}
                          for t in TEMPLATES.values()],
            "tones": list(TONES), "lengths": list(LENGTHS)}


def _add_writing_routes(router: APIRouter, rt: AppsRuntime) -> None:
    @router.get("/writing/options", response_model=schemas.WritingOptions,
                responses=_errors(_ANY, _KEY))
    async def writing_options() -> dict[str, Any]:
        return _writing_options()

    @router.post("/writing/generations", response_model=schemas.Generation, status_code=201,
                 responses=_errors(_ANY, _KEY, _BODY, _MODEL))
    async def create_generation(body: schemas.GenerationCreate, request: Request,
                                user: UserId) -> dict[str, Any]:
        """Write with a template, tone and length. A deterministic request (temperature 0 or
        a seed) that this user sent before is answered from the model server's response
        cache (`surge serve --response-cache`), `cached: true`."""
        problem = check_request(body.template, body.inputs, body.tone, body.length)
        if problem:
            raise APIError(400, problem, param="inputs" if "inputs" in problem else None)
        inputs = {k: v.strip() for k, v in body.inputs.items() if v.strip()}
        started = time.perf_counter()
        text, finish, cached = await _generate(rt, body, inputs, user, request)
        record = GenerationRecord(
            new_id(), user, body.template, body.tone, body.length, inputs, body.model,
            body.temperature, body.seed, None, text, finish, time.time())
        if rt.store is not None:
            await rt.db(rt.store.add_generation, record)
        latency_ms = (time.perf_counter() - started) * 1000
        return {**record.to_dict(), "cached": cached, "latency_ms": round(latency_ms, 2)}

    @router.get("/writing/generations", response_model=schemas.GenerationList,
                responses=_errors(_ANY, _KEY, _HISTORY))
    async def list_generations(user: UserId) -> dict[str, Any]:
        records = await rt.db(rt.require_store().list_generations, user)
        return {"object": "list", "data": [r.to_dict() for r in records]}

    @router.delete("/writing/generations/{generation_id}", status_code=204,
                   response_class=Response, responses=_errors(_ANY, _KEY, _OWNED, _HISTORY))
    async def delete_generation(generation_id: SessionId, user: UserId) -> Response:
        if not await rt.db(rt.require_store().delete_generation, user, generation_id):
            raise APIError(404, f"generation {generation_id!r} not found (it does not exist or "
                           "belongs to another user)", param="generation_id",
                           code="generation_not_found")
        return Response(status_code=204)


async def _generate(rt: AppsRuntime, body: schemas.GenerationCreate, inputs: dict[str, str],
                    user: str, request: Request) -> tuple[str, str | None, bool]:
    """The text, its finish reason, and whether the model server answered from its response
    cache. ``user`` is the cache's tenant there: nobody learns, by an instant answer, that
    another user sent the same (private) request."""
    messages, max_tokens = build_prompt(body.template, inputs, body.tone, body.length)
    payload: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens,
                               "temperature": body.temperature, "user": user}
    if body.seed is not None:
        payload["seed"] = body.seed
    if body.model:
        payload["model"] = body.model
    stream = await rt.backend.open_chat_stream(payload, f"writing-{user}",
                                               request.headers.get("authorization"))
    turn = ChatTurn(stream, _no_persist)
    turn.start()
    parts, done = [], {}
    async for event in turn.events():
        if event["type"] == "delta":
            parts.append(event["text"])
        else:
            done = event
    if done.get("status") != "complete":
        error = done.get("error") or {}
        raise APIError(502, f"the model server failed while writing: "
                       f"{error.get('message', 'unknown error')}", code="upstream_failed")
    return "".join(parts), done.get("finish_reason"), stream.answered_from_cache


async def _no_persist(result: TurnResult) -> None:
    return None


# -- status ---------------------------------------------------------------------------------------


def _add_status_route(router: APIRouter, rt: AppsRuntime) -> None:
    @router.get("/status", response_model=schemas.StatusReport, responses=_errors(
        _ANY, _KEY, {502: "the model server's /metrics cannot be read",
                     503: "the model server's address is not known yet (Retry-After)"}))
    async def status(request: Request) -> dict[str, Any]:
        """Requests/s, latency percentiles, queue depth, KV-cache usage and replicas, from the
        model server's /metrics (rates over the last ~30 s)."""
        auth = request.headers.get("authorization")
        response = await rt.backend.get("/metrics", auth)
        if response.status_code != 200:
            raise APIError(502, f"the model server's /metrics answered {response.status_code}",
                           code="metrics_unavailable")
        rt.status_window.add(parse_metrics(response.text))
        return {**rt.status_window.summary(), "replicas": await _replicas(rt, auth),
                "upstream": rt.backend.base_url}


async def _replicas(rt: AppsRuntime, auth: str | None) -> list[dict[str, Any]]:
    """The router's replicas when the upstream is a router, else the one server itself."""
    response = await rt.backend.get("/router/replicas", auth)
    if response.status_code == 200:
        data = response.json()
        if isinstance(data, dict):
            data = data.get("data", data.get("replicas", []))
        if isinstance(data, list):
            return [item if isinstance(item, dict) else {"url": str(item)} for item in data]
    health = await rt.backend.get("/health", auth)
    healthy = health.status_code == 200
    return [{"url": rt.backend.base_url, "healthy": healthy,
             "status": "ok" if healthy else f"HTTP {health.status_code}"}]

"""`--apps-upstream`: the chat reaches the model through another OpenAI-compatible server (the
router, in a replicated deployment) and always names its conversation in `X-Session-ID`, which is
what keeps a conversation on one replica behind the router's consistent-hash policy."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from tests.apps._client import create_session, new_user, send_message
from tests.server._helpers import ServerProcess, start_server

pytestmark = pytest.mark.timeout(120)

ANSWER_PIECES = ["Your order ", "ships ", "tomorrow."]


class RecordingUpstream:
    """A minimal OpenAI-compatible chat server on a thread that records each request's
    `X-Session-ID` and streams a fixed answer."""

    def __init__(self) -> None:
        self.session_ids: list[str | None] = []
        self.bodies: list[dict] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    def __enter__(self) -> RecordingUpstream:
        self._thread.start()
        assert self._ready.wait(10), "the recording upstream did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        import asyncio

        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        import asyncio

        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.session_ids.append(request.headers.get("X-Session-ID"))
        self.bodies.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in ANSWER_PIECES:
            chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0,
                     "model": "tiny", "choices": [{"index": 0, "delta": {"content": piece},
                                                   "finish_reason": None}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        done = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0,
                "model": "tiny", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        await response.write(f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode())
        return response


@pytest.fixture(scope="module")
def upstream() -> Iterator[RecordingUpstream]:
    with RecordingUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def server_with_upstream(upstream: RecordingUpstream, tiny_checkpoint: Callable[[str], Path],
                         tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("apps_upstream")
    proc = start_server(tiny_checkpoint("tiny-llama"), root, "--served-model-name", "tiny",
                        "--database-url", f"sqlite:///{root / 'apps.db'}",
                        "--apps-upstream", f"http://127.0.0.1:{upstream.port}/v1")
    yield proc
    proc.stop()


def test_chat_goes_to_the_upstream_naming_its_conversation(
        upstream: RecordingUpstream, server_with_upstream: ServerProcess) -> None:
    user = new_user()
    with httpx.Client(base_url=server_with_upstream.url, timeout=30.0) as http:
        first, second = create_session(http, user), create_session(http, user)
        for session in (first, second, first):
            turn = send_message(http, session, {"content": "Where is my order?"}, user)
            assert turn.status_code == 200, turn.error
            assert turn.text == "".join(ANSWER_PIECES)
        stored = http.get(f"/api/apps/chat/sessions/{first}", headers=user).json()
    assert upstream.session_ids[-3:] == [first, second, first]
    assert all(body.get("stream") is True for body in upstream.bodies[-3:])
    # The second turn of a conversation carries its history to the upstream.
    assert len(upstream.bodies[-1]["messages"]) > len(upstream.bodies[-3]["messages"])
    contents = [m["content"] for m in stored["messages"]]
    assert contents.count("".join(ANSWER_PIECES)) == 2

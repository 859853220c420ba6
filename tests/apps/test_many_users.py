"""50 simulated users chatting at once through the apps' HTTP endpoints: every answer lands in
its own conversation, none is lost or mixed."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from surge.http.sse import aiter_sse_lines
from tests.apps._client import API
from tests.server._helpers import ServerProcess

NUM_USERS = 50
TURNS = 2


async def _stream(http: httpx.AsyncClient, session: str, content: str,
                  headers: dict[str, str]) -> str:
    text = ""
    async with http.stream("POST", f"{API}/chat/sessions/{session}/messages", headers=headers,
                           json={"content": content, "max_tokens": 12}) as response:
        assert response.status_code == 200, await response.aread()
        async for line in aiter_sse_lines(response):
            if line.startswith("data:"):
                event = json.loads(line[5:])
                text += event.get("text", "")
                if event["type"] == "done":
                    assert event["status"] == "complete", event
    return text


async def _user(http: httpx.AsyncClient, index: int) -> tuple[dict, str, list[tuple[str, str]]]:
    headers = {"X-User-ID": f"load-user-{index:04d}"}
    created = await http.post(f"{API}/chat/sessions", json={}, headers=headers)
    session = created.json()["id"]
    said: list[tuple[str, str]] = []
    for turn in range(TURNS):
        prompt = f"user {index} question {turn}: order #{index * 100 + turn}"
        said.append((prompt, await _stream(http, session, prompt, headers)))
    return headers, session, said


async def _chat_all(url: str) -> list[tuple[dict, str, list[tuple[str, str]]]]:
    limits = httpx.Limits(max_connections=NUM_USERS * 2)
    async with httpx.AsyncClient(base_url=url, timeout=120.0, limits=limits) as http:
        return await asyncio.gather(*(_user(http, i) for i in range(NUM_USERS)))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_fifty_users_at_once_each_answer_in_its_own_conversation(
        apps_server: ServerProcess) -> None:
    results = asyncio.run(_chat_all(apps_server.url))
    with httpx.Client(base_url=apps_server.url, timeout=30.0) as http:
        for headers, session, said in results:
            sessions = http.get(f"{API}/chat/sessions", headers=headers).json()["data"]
            assert [s["id"] for s in sessions] == [session]
            messages = http.get(f"{API}/chat/sessions/{session}", headers=headers).json()
            stored = [(m["role"], m["content"]) for m in messages["messages"]]
            expected = [pair for prompt, answer in said
                        for pair in (("user", prompt), ("assistant", answer))]
            assert stored == expected
    assert len({session for _, session, _ in results}) == NUM_USERS

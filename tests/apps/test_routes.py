"""The apps' HTTP endpoints on a real `surge serve` (tiny checkpoint, SQLite history)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from surge.http.sse import iter_sse_lines
from tests.apps._client import (
    API,
    LONG_ANSWER,
    aborts,
    create_session,
    new_user,
    send_message,
    wait_engine_idle,
)
from tests.server._helpers import ServerProcess, metric_value

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def http(apps_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=apps_server.url, timeout=60.0) as client:
        yield client


def test_pages_are_served_and_give_an_anonymous_user_cookie(http: httpx.Client) -> None:
    landing = http.get("/")
    assert landing.status_code == 200 and "Support chat" in landing.text
    cookie = landing.headers["set-cookie"]
    assert cookie.startswith("surge_uid=") and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    for page in ("chat.html", "writing.html", "images.html", "status.html", "js/chat.js",
                 "app.css"):
        assert http.get(f"/ui/{page}").status_code == 200, page
    # The cookie is the user: a second request with it gets no new one.
    again = http.get("/ui/chat.html")
    assert "set-cookie" not in again.headers


def test_endpoints_are_in_the_openapi_schema(http: httpx.Client) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    for path, method in [(f"{API}/chat/sessions", "post"), (f"{API}/chat/sessions", "get"),
                         (f"{API}/chat/sessions/{{session_id}}", "delete"),
                         (f"{API}/chat/sessions/{{session_id}}/messages", "post"),
                         (f"{API}/chat/sessions/{{session_id}}/stop", "post"),
                         (f"{API}/history/export", "get"), (f"{API}/history", "delete"),
                         (f"{API}/writing/generations", "post"), (f"{API}/status", "get")]:
        assert method in paths[path], (path, method)


def test_chat_streams_the_answer_and_stores_both_messages(http: httpx.Client) -> None:
    user = new_user()
    session = create_session(http, user)
    first = send_message(http, session, {"content": "Where is my parcel?", "max_tokens": 24,
                                         "temperature": 0}, user)
    assert first.status_code == 200, first.error
    assert first.events[0]["type"] == "start" and first.done["status"] == "complete"
    assert first.done["finish_reason"] in ("stop", "length")
    second = send_message(http, session, {"content": "And the refund?", "max_tokens": 8}, user)
    stored = http.get(f"{API}/chat/sessions/{session}", headers=user).json()
    assert [(m["role"], m["status"]) for m in stored["messages"]] == [
        ("user", "complete"), ("assistant", "complete")] * 2
    contents = [m["content"] for m in stored["messages"]]
    assert contents == ["Where is my parcel?", first.text, "And the refund?", second.text]
    assert stored["title"] == "Where is my parcel?"
    assert stored["messages"][1]["id"] == first.done["message_id"]


def test_users_see_only_their_own_conversations(http: httpx.Client) -> None:
    alice, bob = new_user(), new_user()
    session = create_session(http, alice)
    assert send_message(http, session, {"content": "mine", "max_tokens": 4}, alice).error is None
    assert http.get(f"{API}/chat/sessions", headers=bob).json()["data"] == []
    assert http.get(f"{API}/chat/sessions/{session}", headers=bob).status_code == 404
    intruder = send_message(http, session, {"content": "hi", "max_tokens": 4}, bob)
    assert intruder.status_code == 404 and intruder.error["code"] == "session_not_found"
    assert http.delete(f"{API}/chat/sessions/{session}", headers=bob).status_code == 404
    assert [s["id"] for s in http.get(f"{API}/chat/sessions", headers=alice).json()["data"]] \
        == [session]


def test_export_and_delete_own_history(http: httpx.Client) -> None:
    user, other = new_user(), new_user()
    session = create_session(http, user)
    send_message(http, session, {"content": "export me", "max_tokens": 4}, user)
    kept = create_session(http, other)
    exported = http.get(f"{API}/history/export", headers=user)
    assert "attachment" in exported.headers["content-disposition"]
    body = json.loads(exported.text)
    assert body["sessions"][0]["messages"][0]["content"] == "export me"
    deleted = http.delete(f"{API}/history", headers=user).json()
    assert deleted == {"sessions": 1, "messages": 2, "generations": 0}
    assert http.get(f"{API}/chat/sessions", headers=user).json()["data"] == []
    assert http.get(f"{API}/chat/sessions/{kept}", headers=other).status_code == 200


def test_hanging_up_stops_the_engine_and_keeps_the_partial_answer(http: httpx.Client) -> None:
    user = new_user()
    session = create_session(http, user)
    before = aborts(http.get("/metrics").text)
    received = ""
    with http.stream("POST", f"{API}/chat/sessions/{session}/messages", json=LONG_ANSWER,
                     headers=user) as response:
        for line in iter_sse_lines(response):
            event = json.loads(line[5:]) if line.startswith("data:") else {}
            received += event.get("text", "")
            if len(received) > 20:
                break  # the user presses stop: the browser drops the connection
    text = wait_engine_idle(http, before)
    assert metric_value(text, "surge:num_requests_running") == 0
    messages = _wait_for_messages(http, session, user, 2)
    answer = messages[1]
    assert answer["status"] == "stopped"
    assert answer["content"].startswith(received) and len(answer["content"]) < 2000


def test_stop_endpoint_and_one_answer_at_a_time(http: httpx.Client) -> None:
    user = new_user()
    session = create_session(http, user)
    with http.stream("POST", f"{API}/chat/sessions/{session}/messages", json=LONG_ANSWER,
                     headers=user) as response:
        lines = iter_sse_lines(response)
        assert json.loads(next(lines)[5:])["type"] == "start"
        busy = send_message(http, session, {"content": "again", "max_tokens": 4}, user)
        assert busy.status_code == 409 and busy.error["code"] == "answer_in_progress"
        stopped = http.post(f"{API}/chat/sessions/{session}/stop", headers=user)
        assert stopped.json() == {"stopped": True}
        events = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
    assert events[-1]["type"] == "done" and events[-1]["status"] == "stopped"
    assert _wait_for_messages(http, session, user, 2)[1]["status"] == "stopped"
    # The conversation is free again.
    again = send_message(http, session, {"content": "again", "max_tokens": 4}, user)
    assert again.status_code == 200 and again.done["status"] == "complete"


def test_bad_requests_say_what_is_wrong(http: httpx.Client) -> None:
    user = new_user()
    session = create_session(http, user)
    too_long = send_message(http, session, {"content": "x", "max_tokens": 5000}, user)
    assert too_long.status_code == 400 and "--chat-max-tokens" in too_long.error["message"]
    empty = send_message(http, session, {"content": ""}, user)
    assert empty.status_code == 400 and empty.error["param"] == "content"
    bad_user = http.get(f"{API}/chat/sessions", headers={"X-User-ID": "no spaces"})
    assert bad_user.status_code == 400 and bad_user.json()["error"]["param"] == "X-User-ID"
    unknown_model = send_message(http, session, {"content": "x", "model": "nope"}, user)
    assert unknown_model.status_code == 404 and unknown_model.error["code"] == "model_not_found"
    # None of these left a message behind.
    assert http.get(f"{API}/chat/sessions/{session}", headers=user).json()["messages"] == []


def test_writing_assistant_caches_deterministic_requests(http: httpx.Client) -> None:
    user, other = new_user(), new_user()
    request = {"template": "email", "inputs": {"points": "the meeting moves to 3pm",
                                               "recipient": "the team"},
               "tone": "formal", "length": "short", "temperature": 0}
    first = http.post(f"{API}/writing/generations", json=request, headers=user).json()
    assert first["cached"] is False and first["output"]
    again = http.post(f"{API}/writing/generations", json=request, headers=user).json()
    assert again["cached"] is True and again["output"] == first["output"]
    assert again["latency_ms"] < first["latency_ms"]
    # Another user's same request is not answered from the first user's: an instant
    # `cached: true` would tell them someone sent that very (private) request before.
    theirs = http.post(f"{API}/writing/generations", json=request, headers=other).json()
    assert theirs["cached"] is False and theirs["output"] == first["output"]
    sampled = {**request, "temperature": 0.9}
    for _ in range(2):
        assert http.post(f"{API}/writing/generations", json=sampled,
                         headers=user).json()["cached"] is False
    seeded = {**sampled, "seed": 7}
    assert http.post(f"{API}/writing/generations", json=seeded, headers=user).json()["cached"] \
        is False
    assert http.post(f"{API}/writing/generations", json=seeded, headers=user).json()["cached"] \
        is True
    mine = http.get(f"{API}/writing/generations", headers=user).json()["data"]
    assert len(mine) == 6
    assert len(http.get(f"{API}/writing/generations", headers=other).json()["data"]) == 1
    assert http.delete(f"{API}/writing/generations/{mine[0]['id']}",
                       headers=other).status_code == 404
    assert http.delete(f"{API}/writing/generations/{mine[0]['id']}",
                       headers=user).status_code == 204


@pytest.mark.parametrize("change, message", [
    ({"template": "poem"}, "allowed are email, story, outline, summary"),
    ({"tone": "angry"}, "allowed are neutral"), ({"length": "epic"}, "allowed are short"),
    ({"inputs": {"points": " "}}, "inputs.points is required"),
    ({"inputs": {"points": "x", "colour": "red"}}, "do not belong to template")])
def test_writing_assistant_refuses_bad_requests(http: httpx.Client, change: dict,
                                                message: str) -> None:
    request = {"template": "email", "inputs": {"points": "x"}, **change}
    response = http.post(f"{API}/writing/generations", json=request, headers=new_user())
    assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_status_reports_the_servers_own_metrics(http: httpx.Client) -> None:
    user = new_user()
    send_message(http, create_session(http, user), {"content": "hi", "max_tokens": 8}, user)
    status = http.get(f"{API}/status", headers=user).json()
    assert status["requests_total"] >= 1
    assert status["latency_seconds"]["e2e"]["p50"] > 0
    assert status["queue_depth"] == 0 and 0 <= status["kv_cache_usage"] <= 1
    assert status["replicas"] == [{"url": status["upstream"], "healthy": True, "status": "ok"}]
    later = http.get(f"{API}/status", headers=user).json()
    assert later["window_seconds"] > 0 and later["requests_per_second"] is not None


def _wait_for_messages(http: httpx.Client, session: str, user: dict[str, str],
                       count: int) -> list[dict]:
    """The answer is stored right after the stream ends; poll briefly for it."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        messages = http.get(f"{API}/chat/sessions/{session}", headers=user).json()["messages"]
        if len(messages) >= count:
            return messages
        time.sleep(0.05)  # polling interval
    raise AssertionError(f"only {len(messages)} messages stored, expected {count}")


def test_one_users_chat_is_never_answered_from_anothers_cached_answer(
        http: httpx.Client) -> None:
    # The apps' server caches reproducible answers; a chat's entries belong to its user.
    message = {"content": f"What are your opening hours? {time.time_ns()}", "temperature": 0,
               "max_tokens": 8}

    def hits() -> float:
        return metric_value(http.get("/metrics").text, "surge:response_cache_hits_total",
                            endpoint="chat", tier="local")

    alice, bob = new_user(), new_user()
    assert send_message(http, create_session(http, alice), message, alice).status_code == 200
    before = hits()
    assert send_message(http, create_session(http, bob), message, bob).status_code == 200
    assert hits() == before  # Bob's answer was generated, not Alice's replayed
    assert send_message(http, create_session(http, alice), message, alice).status_code == 200
    assert hits() == before + 1  # Alice's own repeat is answered from her entry

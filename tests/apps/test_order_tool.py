"""The support chat's order-status tool: a message naming an order makes the model call
``lookup_order`` (its arguments constrained by the server to the ids in the message), the apps'
database answers, and the answer is generated with that data in the conversation. Against a real
`surge serve` with the apps (tiny checkpoint; one test on the real SmolLM2)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from surge.apps.chat import build_messages, order_lookup_tool, order_result, tool_messages
from surge.apps.migrations import DEMO_ORDERS
from surge.server.tools import render_tool_chat
from surge.tokenizer import load_tokenizer
from tests.apps._client import API, create_session, new_user, send_message
from tests.server._helpers import ServerProcess, start_server

pytestmark = pytest.mark.timeout(180)
SEEDED = {str(o["id"]): o for o in DEMO_ORDERS}


@pytest.fixture
def http(apps_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=apps_server.url, timeout=120.0) as client:
        yield client


def _lookup(turn_events: list[dict]) -> list[dict]:
    start = turn_events[0]
    assert start["type"] == "start"
    return start["tool_calls"]


def test_a_message_naming_an_order_is_answered_with_its_data(http: httpx.Client) -> None:
    user = new_user()
    session = create_session(http, user)
    turn = send_message(http, session, {"content": "Hi, where is my order srg-1001?",
                                        "max_tokens": 16, "temperature": 0}, user)
    assert turn.status_code == 200, turn.error
    [lookup] = _lookup(turn.events)
    assert lookup["name"] == "lookup_order" and lookup["call_id"].startswith("call_")
    assert lookup["arguments"] == {"order_id": "SRG-1001"}  # as the model called it
    seeded = SEEDED["SRG-1001"]
    assert lookup["result"]["found"] is True
    assert {k: lookup["result"][k] for k in ("item", "status", "tracking_number")} == {
        k: seeded[k] for k in ("item", "status", "tracking_number")}
    assert turn.done["status"] == "complete"
    # Stored in order: the question, the lookup, the answer; a follow-up renders them all.
    stored = http.get(f"{API}/chat/sessions/{session}", headers=user).json()["messages"]
    assert [m["role"] for m in stored] == ["user", "tool", "assistant"]
    assert json.loads(stored[1]["content"]) == lookup
    follow = send_message(http, session, {"content": "Thanks! And when will it arrive?",
                                          "max_tokens": 8}, user)
    assert follow.status_code == 200 and _lookup(follow.events) == [], follow.error


def test_unknown_orders_and_plain_questions(http: httpx.Client) -> None:
    user = new_user()
    missing = send_message(http, create_session(http, user), {
        "content": "What about SRG-9999?", "max_tokens": 8, "temperature": 0}, user)
    [lookup] = _lookup(missing.events)
    assert lookup["result"] == {"order_id": "SRG-9999", "found": False,
                                "message": "There is no order with this number."}
    plain = send_message(http, create_session(http, user), {
        "content": "Do you ship abroad?", "max_tokens": 8}, user)
    assert _lookup(plain.events) == []


def test_the_lookup_reaches_the_models_prompt(apps_model_dir: Path) -> None:
    """The conversation the answer is generated from holds the call and the database's row."""
    tool = order_lookup_tool("is SRG-1004 or srg-1002 on its way?")
    assert tool is not None
    assert tool["function"]["parameters"]["properties"]["order_id"]["enum"] == [
        "SRG-1004", "SRG-1002"]
    assert order_lookup_tool("where is my parcel?") is None
    lookup = {"call_id": "call_1", "name": "lookup_order", "arguments": {"order_id": "SRG-1004"},
              "result": order_result("SRG-1004", None)}
    history = [("user", "is SRG-1004 on its way?"), ("tool", json.dumps(lookup)),
               ("assistant", "No such order.")]
    messages = build_messages("Be brief.", history, "ok", 20)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant",
                                             "user"]
    messages = build_messages("Be brief.", [], "is SRG-1004 on its way?", 20)
    messages += tool_messages(lookup, answer_to="is SRG-1004 on its way?")
    prompt = render_tool_chat(load_tokenizer(apps_model_dir), messages, None, True)
    assert ('<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "SRG-1004"}}\n'
            '</tool_call>') in prompt
    assert ('<|im_start|>user\n<tool_response>\n{"order_id": "SRG-1004", "found": false, '
            '"message": "There is no order with this number."}\n</tool_response>\n\n'
            'Using this result, answer: is SRG-1004 on its way?<|im_end|>\n'
            '<|im_start|>assistant\n') in prompt


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_smollm2_answers_from_the_order_data(smollm2_gguf: Path, tmp_path: Path) -> None:
    """The real default model: the lookup is right, and its greedy answer states the stored
    status (SmolLM2-135M is small: the card the page shows is the exact data)."""
    server = start_server(smollm2_gguf, tmp_path, "--database-url",
                          f"sqlite:///{tmp_path / 'apps.db'}",
                          env={"SURGE_DATA_DIR": str(tmp_path / "data")})
    try:
        with httpx.Client(base_url=server.url, timeout=120.0) as http:
            user = new_user()
            turn = send_message(http, create_session(http, user), {
                "content": "What is the status of order srg-1004?", "temperature": 0,
                "max_tokens": 60}, user)
            [lookup] = _lookup(turn.events)
            assert lookup["result"]["status"] == "cancelled"
            assert "cancelled" in turn.text.lower(), turn.text
    finally:
        server.stop()

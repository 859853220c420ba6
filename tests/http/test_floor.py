"""The shared HTTP floor on its own, as raw ASGI: the request gate (401, 413 declared and while
reading, the body replayed to the app), the services stack's order, the lifespan protocol, the
disconnect race, and SQLite write transactions."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from surge.http import sqlite
from surge.http.auth import ApiKeyAuth
from surge.http.control import ServerControl
from surge.http.errors import APIError
from surge.http.gate import RequestGate, key_id
from surge.http.responses import unless_disconnected
from surge.http.services import Services, run_lifespan


class _Echo:
    """An app that answers with the body it read and the key id the gate found."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        message = await receive()
        payload = {"body": message["body"].decode(), "key": key_id(scope)}
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": msgspec.json.encode(payload)})


def _call(app: Any, chunks: list[bytes], headers: dict[str, str] | None = None,
          path: str = "/v1/x") -> tuple[int, dict[str, Any]]:
    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    inbox = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
             for i, c in enumerate(chunks)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return inbox.pop(0) if inbox else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], msgspec.json.decode(sent[1]["body"])


def _gate(keys: list[str], rejected: list[str]) -> RequestGate:
    return RequestGate(_Echo(), auth=ApiKeyAuth(keys), max_body_bytes=10,
                       auth_prefixes=("/v1/",), on_reject=rejected.append)


def test_the_gate_replays_the_body_and_names_the_key() -> None:
    status, answer = _call(_gate(["k1", "k2"], []), [b"ab", b"cd"],
                           {"Authorization": "Bearer k2"})
    assert status == 200 and answer == {"body": "abcd", "key": "key1"}


def test_the_gate_refuses_a_wrong_key_with_401_and_counts_it() -> None:
    rejected: list[str] = []
    status, answer = _call(_gate(["k1"], rejected), [b"x"], {"Authorization": "Bearer no"})
    assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    assert rejected == ["unauthorized"]
    status, _ = _call(_gate(["k1"], rejected), [b"x"], path="/health")
    assert status == 200  # only the auth prefixes need a key


@pytest.mark.parametrize(("chunks", "headers", "fragment"), [
    ([b"x"], {"Content-Length": "11"}, "has 11 bytes"),  # declared: refused before reading
    ([b"123456", b"78901"], {}, "has at least 11 bytes"),  # chunked: refused while reading
])
def test_the_gate_refuses_a_large_body_with_413(chunks: list[bytes], headers: dict[str, str],
                                                fragment: str) -> None:
    rejected: list[str] = []
    status, answer = _call(_gate([], rejected), chunks, headers)
    assert status == 413 and answer["error"]["code"] == "request_too_large"
    assert fragment in answer["error"]["message"] and "at most 10" in answer["error"]["message"]
    assert rejected == ["body_too_large"]


def test_services_start_in_order_and_stop_in_reverse_even_when_one_fails() -> None:
    events: list[str] = []

    def service(name: str, fail: bool = False) -> Any:
        @contextlib.asynccontextmanager
        async def run() -> AsyncIterator[None]:
            events.append(f"start {name}")
            if fail:
                raise RuntimeError(name)
            try:
                yield
            finally:
                events.append(f"stop {name}")
        return run

    services = Services()
    for name in ("a", "b"):
        services.add(service(name))

    async def main() -> None:
        async with services.running():
            events.append("serving")

    asyncio.run(main())
    assert events == ["start a", "start b", "serving", "stop b", "stop a"]
    with pytest.raises(RuntimeError, match="before the app starts"):
        services.add(service("late"))

    events.clear()
    failing = Services()
    failing.add(service("a"))
    failing.add(service("b", fail=True))
    with pytest.raises(RuntimeError, match="b"):
        asyncio.run(main_of(failing))
    assert events == ["start a", "start b", "stop a"]


async def main_of(services: Services) -> None:
    async with services.running():
        pass


def test_run_lifespan_reports_a_failed_startup() -> None:
    @contextlib.asynccontextmanager
    async def broken() -> AsyncIterator[None]:
        raise OSError("port in use")
        yield

    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(run_lifespan(receive, send, "test app", broken()))
    assert sent[0]["type"] == "lifespan.startup.failed" and "port in use" in sent[0]["message"]


def test_a_client_that_hangs_up_cancels_the_work_with_499() -> None:
    cancelled = asyncio.Event()

    async def work() -> str:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def main() -> None:
        with pytest.raises(APIError) as caught:
            await unless_disconnected(receive, work())
        assert caught.value.status == 499 and cancelled.is_set()

    asyncio.run(main())


def test_server_control_before_and_after_binding() -> None:
    control = ServerControl()
    control.request_exit(1)  # no server yet: logged, not raised
    codes: list[int] = []
    drained: list[bool] = []
    control.bind(codes.append)
    control.on_drain(lambda: drained.append(True))
    control.request_exit(3)
    control.begin_drain()
    assert codes == [3] and drained == [True]


def test_sqlite_write_transaction_commits_or_rolls_back(tmp_path: Path) -> None:
    conn = sqlite.connect(tmp_path / "t.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == sqlite.BUSY_TIMEOUT_MS
    conn.execute("CREATE TABLE t (x INTEGER)")
    with sqlite.write_transaction(conn):
        conn.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(sqlite3.IntegrityError), sqlite.write_transaction(conn):
        conn.execute("INSERT INTO t VALUES (2)")
        raise sqlite3.IntegrityError("refused")
    assert [row[0] for row in conn.execute("SELECT x FROM t")] == [1]

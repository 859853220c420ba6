"""`surge serve --replicas 2 --api-key KEY`: the web apps (the router's fallback app) refuse a
request without the key with 401, as the /v1 routes do (they answered 500, with a traceback per
call, so the UI never asked for the key); and the key reaches the replicas by environment,
never on a command line that `ps` shows to every user of the machine."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.router.test_replicated import STARTUP_SECONDS, Router, start_router

pytestmark = pytest.mark.slow  # two replicas start

KEY = f"sk-test-{secrets.token_hex(8)}"


@pytest.fixture(scope="module")
def router(tiny_checkpoint: Callable[[str], Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Router]:
    proc = start_router(tiny_checkpoint("tiny-llama"), tmp_path_factory.mktemp("keyed"),
                        "--replicas", "2", "--api-key", KEY, "--no-history",
                        "--kv-cache-memory-bytes", str(32 << 20))
    try:
        proc.wait_for(lambda: _healthy(proc) == 2, "2 healthy replicas", STARTUP_SECONDS)
        yield proc
    finally:
        if proc.process.poll() is None:
            proc.process.terminate()
            proc.process.wait(60)


def _healthy(router: Router) -> int:
    try:
        return sum(r["state"] == "healthy" and not r["starting"] for r in router.replicas())
    except httpx.TransportError:
        return 0


@pytest.mark.timeout(60)
def test_the_web_apps_answer_401_without_the_key(router: Router) -> None:
    with httpx.Client(base_url=router.url, timeout=30.0) as http:
        for path in ("/api/apps/chat/sessions", "/api/apps/writing/options"):
            refused = http.get(path)
            assert refused.status_code == 401, (path, refused.text)
            assert refused.json()["error"]["code"] == "invalid_api_key"
            assert refused.headers["www-authenticate"] == "Bearer"
        allowed = http.get("/api/apps/writing/options",
                           headers={"Authorization": f"Bearer {KEY}"})
        assert allowed.status_code == 200, allowed.text
    assert "Traceback" not in router.log()


@pytest.mark.timeout(60)
def test_the_key_is_on_no_replicas_command_line_yet_the_replicas_check_it(
        router: Router) -> None:
    with httpx.Client(base_url=router.url, timeout=30.0) as http:
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}
                        ).status_code == 200
    holders = [pid for pid, cmdline in _command_lines().items() if KEY.encode() in cmdline]
    # Only the command the user typed (the router's) names the key.
    assert holders == [router.process.pid]


def _command_lines() -> dict[int, bytes]:
    lines = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                lines[int(entry.name)] = (entry / "cmdline").read_bytes()
            except OSError:
                continue  # the process ended, or is not ours to read
    return lines

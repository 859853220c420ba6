"""Slowloris: clients that send a request's headers a byte at a time cannot take the server's
connections. With 1,024 file descriptors, 1,100 such connections used to leave uvicorn unable
to accept (EMFILE) and /health unanswered. Now, at the issue's scale (2,000 slow connections
under a 1,024 limit), the oldest slow connection makes room for a new one, and each is closed
once its headers are --header-timeout late."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

FD_LIMIT = 1024
SLOW_CONNECTIONS = 2000
HEADER_TIMEOUT = 3.0

_SERVER = textwrap.dedent(f"""
    import resource, uvicorn
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from surge.http.connections import ConnectionGuard
    from surge.http.server import DrainingServer

    resource.setrlimit(resource.RLIMIT_NOFILE, ({FD_LIMIT}, {FD_LIMIT}))

    async def health(request):
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/health", health)])
    server = DrainingServer(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="info", lifespan="off"),
        on_started=lambda host, port: print(f"listening on {{port}}", flush=True),
        guard=ConnectionGuard(header_timeout={HEADER_TIMEOUT}))
    print(f"cap {{server.guard.max_connections}}", flush=True)
    server.run()
""")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-c", _SERVER], stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (match := re.search(rb"listening on (\d+)", log.read_bytes())):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)  # polling the log for the port
        yield int(match.group(1)), log
    finally:
        process.kill()
        process.wait(10)


def _slow_connection(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: a\r\n")  # and never the blank line
    sock.setblocking(False)
    return sock


def _trickle(socks: list[socket.socket]) -> int:
    """One more header byte on each connection; returns how many the server has closed."""
    closed = 0
    for sock in socks:
        try:
            if sock.recv(1, socket.MSG_PEEK) == b"":
                closed += 1
                continue
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
            continue
        try:
            sock.send(b"X")
        except OSError:
            closed += 1
    return closed


@pytest.mark.timeout(90)
def test_health_answers_during_many_slow_connections(server: tuple[int, Path]) -> None:
    port, log = server
    socks = [_slow_connection(port) for _ in range(SLOW_CONNECTIONS)]
    try:
        health_times = []
        for _ in range(10):
            _trickle(socks)
            started = time.monotonic()
            response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
            health_times.append(time.monotonic() - started)
            assert response.status_code == 200
            time.sleep(0.1)  # between probes, the slow clients send more
        assert max(health_times) < 2.0, health_times

        # Trickling resets nothing: each is closed once its headers are HEADER_TIMEOUT late.
        deadline = time.monotonic() + HEADER_TIMEOUT + 5
        while (closed := _trickle(socks)) < len(socks):
            assert time.monotonic() < deadline, f"{len(socks) - closed} slow connections open"
            time.sleep(0.5)  # the slow client's pace
    finally:
        for sock in socks:
            sock.close()
    text = log.read_text()
    assert "Too many open files" not in text and "Traceback" not in text, text[-2000:]
    cap = int(re.search(r"cap (\d+)", text).group(1))
    assert cap < FD_LIMIT


def test_a_bad_guard_setting_is_refused() -> None:
    from surge.http.connections import ConnectionGuard

    with pytest.raises(ValueError, match="header_timeout=0 is invalid"):
        ConnectionGuard(header_timeout=0)
    with pytest.raises(ValueError, match="max_connections=0 is invalid"):
        ConnectionGuard(max_connections=0)

"""Tenants against a real `surge serve`: one tenant's flood gets its own 429s while another
tenant is still served; the tenant comes from the API key's id, the tenant header or the
body's user; the tenants file is validated at start and reloaded on SIGHUP."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server._helpers import ServerProcess, metric_value, start_server

LONG = {"prompt": "tenant test prompt", "max_tokens": 48, "ignore_eos": True, "temperature": 0}
SHORT = {"prompt": "tenant test prompt", "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def tenant_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[ServerProcess]:
    server = start_server(model_dir, tmp_path_factory.mktemp("tenants"),
                          "--engine-mode", "thread", "--max-queued-requests", "6",
                          "--max-num-seqs", "2", "--tenant-header", "X-Tenant",
                          "--scheduling-policy", "fair")
    yield server
    server.stop()


def metrics(server: ServerProcess) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=10).text


@pytest.mark.timeout(240)
def test_one_tenants_flood_does_not_make_another_tenant_get_429(
        tenant_server: ServerProcess) -> None:
    url = tenant_server.url
    flood_codes: list[int] = []
    retry_after: list[str] = []
    light: list[httpx.Response] = []

    async def flood(http: httpx.AsyncClient, stop: asyncio.Event) -> None:
        while not stop.is_set():  # a client that ignores Retry-After
            response = await http.post("/v1/completions", json=LONG,
                                       headers={"X-Tenant": "heavy"})
            flood_codes.append(response.status_code)
            if response.status_code == 429:
                retry_after.append(response.headers["Retry-After"])
                await asyncio.sleep(0.02)

    async def light_tenant(http: httpx.AsyncClient) -> None:
        while not any(code == 429 for code in flood_codes):  # the queue is full of "heavy"
            await asyncio.sleep(0.05)
        for _ in range(3):
            pair = await asyncio.gather(*(http.post("/v1/completions", json=SHORT,
                                                    headers={"X-Tenant": "light"})
                                          for _ in range(2)))
            light.extend(pair)

    async def main() -> None:
        stop = asyncio.Event()
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(base_url=url, timeout=180, limits=limits) as http:
            floods = [asyncio.create_task(flood(http, stop)) for _ in range(16)]
            try:
                await asyncio.wait_for(light_tenant(http), 150)
            finally:
                stop.set()
                await asyncio.gather(*floods)

    asyncio.run(main())
    assert [r.status_code for r in light] == [200] * 6, [r.text for r in light]
    assert flood_codes.count(429) >= 5 and 200 in flood_codes
    assert all(int(value) >= 1 for value in retry_after)
    text = metrics(tenant_server)
    name = "surge:tenant_request_rejected_total"
    assert metric_value(text, name, tenant="heavy", reason="queue_full_requests") >= 5
    assert 'tenant="light",reason=' not in text  # never refused
    assert metric_value(text, "surge:tenant_requests_total", tenant="light") == 6
    assert metric_value(text, "surge:tenant_served_tokens_total", tenant="light",
                        kind="output") == 12


@pytest.mark.timeout(60)
def test_tenant_from_header_else_user_else_anonymous(tenant_server: ServerProcess) -> None:
    with httpx.Client(base_url=tenant_server.url, timeout=60) as http:
        assert http.post("/v1/completions", json={**SHORT, "user": "alice"}).status_code == 200
        assert http.post("/v1/completions", json={**SHORT, "user": "alice"},
                         headers={"X-Tenant": "gateway-co"}).status_code == 200
        assert http.post("/v1/completions", json=SHORT).status_code == 200
        bad = http.post("/v1/completions", json=SHORT, headers={"X-Tenant": "x" * 300})
    assert bad.status_code == 400 and "X-Tenant" in bad.json()["error"]["message"]
    text = metrics(tenant_server)
    for tenant in ("alice", "gateway-co", "anonymous"):
        assert metric_value(text, "surge:tenant_requests_total", tenant=tenant) >= 1, tenant
    # The engine served them under those names too (its scheduler's per-tenant stats).
    assert metric_value(text, "surge:tenant_weight", tenant="gateway-co") == 1.0


@pytest.mark.timeout(120)
def test_tenant_is_the_api_keys_id_never_the_key(model_dir: Path, tmp_path: Path) -> None:
    server = start_server(model_dir, tmp_path, "--engine-mode", "thread",
                          "--api-key", "secret-one", "--api-key", "secret-two",
                          "--tenant-header", "X-Tenant")
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for key in ("secret-one", "secret-two"):
                response = http.post("/v1/completions", json={**SHORT, "user": "bob"},
                                     headers={"Authorization": f"Bearer {key}",
                                              "X-Tenant": "claimed"})
                assert response.status_code == 200, response.text
        text = metrics(server)
    finally:
        server.stop()
    assert metric_value(text, "surge:tenant_requests_total", tenant="key0") == 1
    assert metric_value(text, "surge:tenant_requests_total", tenant="key1") == 1
    # A key holder cannot claim another tenant by header or user; keys never reach metrics.
    assert 'tenant="claimed"' not in text and 'tenant="bob"' not in text
    assert "secret-" not in text


TENANTS_V1 = """
[tenants.acme]
weight = 2
max_in_flight = 1
"""


@pytest.mark.timeout(180)
def test_tenants_file_reloads_on_sighup_and_a_bad_file_keeps_the_old(
        model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "tenants.toml"
    path.write_text(TENANTS_V1)
    # The engine in its own process (the default): the new weights travel as a message.
    server = start_server(model_dir, tmp_path, "--tenants", str(path),
                          "--scheduling-policy", "fair")
    try:
        assert _two_at_once(server, "acme") == [200, 429]
        assert metric_value(metrics(server), "surge:tenant_weight", tenant="acme") == 2.0

        path.write_text(TENANTS_V1.replace("max_in_flight = 1", "max_in_flight = 4")
                        .replace("weight = 2", "weight = 3"))
        server.process.send_signal(signal.SIGHUP)
        _wait_for_log(server, "tenants reloaded from")
        assert "tenant 'acme': weight=2 max_in_flight=1 -> weight=3 max_in_flight=4" in (
            server.log())
        assert _two_at_once(server, "acme") == [200, 200]
        assert metric_value(metrics(server), "surge:tenant_weight", tenant="acme") == 3.0

        path.write_text("[tenants.acme]\nweight = -1\n")
        server.process.send_signal(signal.SIGHUP)
        _wait_for_log(server, "keeping the previous configuration")
        assert "tenants.acme.weight=-1 is invalid" in server.log()
        assert _two_at_once(server, "acme") == [200, 200]  # still the old file's limits
        assert server.process.poll() is None
    finally:
        server.stop()


def test_bad_tenants_file_at_start_exits_2_naming_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "tenants.json"
    path.write_text('{"tenants": {"acme": {"max_in_flight": 0}}}')
    done = subprocess.run([sys.executable, "-m", "surge.cli", "serve", "--tenants", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "tenants.acme.max_in_flight=0 is invalid: allowed is a whole number >= 1" in (
        done.stderr + done.stdout)


def _two_at_once(server: ServerProcess, user: str) -> list[int]:
    async def both() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            responses = await asyncio.gather(*(
                http.post("/v1/completions", json={**LONG, "user": user}) for _ in range(2)))
        return sorted(r.status_code for r in responses)

    return asyncio.run(both())


def _wait_for_log(server: ServerProcess, text: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.log():
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.05)  # polling the log file

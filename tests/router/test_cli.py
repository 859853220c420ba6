"""The router's command lines: what each replica of `surge serve --replicas N` is started with,
flag validation with clear messages, and `surge route` as a process (serves, drains on
SIGTERM, exits 0)."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from surge.cli import main
from surge.entrypoints.replicated import replica_serve_args, replica_threads
from surge.entrypoints.serve import add_serve_args
from surge.router.cli import autoscale_config, wants_router
from tests.router._helpers import FakeReplica, json_handler


def _serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    return parser.parse_args(list(argv))


def test_replicas_get_the_users_flags_but_not_the_routers() -> None:
    args = _serve_args("--replicas", "3", "--api-key", "k1", "--api-key", "k2",
                       "--max-num-seqs", "8", "--no-prefix-caching", "--dtype", "bfloat16",
                       "--policy", "latency", "--port", "9000", "--host", "0.0.0.0",
                       "--max-replicas", "4")
    argv = replica_serve_args(args, "/models/m", ["m"], num_threads=1)
    assert argv[:7] == ["--model", "/models/m", "--served-model-name", "m", "--num-threads",
                        "1", "--no-apps"]
    for expected in (["--max-num-seqs", "8"], ["--no-prefix-caching"],
                     ["--dtype", "bfloat16"]):
        assert " ".join(expected) in " ".join(argv)
    # The keys go by environment ($SURGE_API_KEY): `ps` shows command lines to every user.
    assert "--api-key" not in argv and "k1" not in argv
    for router_only in ("--replicas", "--policy", "--port", "--host", "--max-replicas"):
        assert router_only not in argv


def test_replicas_share_the_cores_unless_told_otherwise() -> None:
    cores = len(os.sched_getaffinity(0))
    assert replica_threads(_serve_args("--replicas", "2"), 2) == max(1, cores // 2)
    assert replica_threads(_serve_args("--replicas", "2"), 64) == 1
    assert replica_threads(_serve_args("--replicas", "2", "--num-threads", "3"), 2) == 3


@pytest.mark.parametrize(("argv", "wanted"), [
    (["--replicas", "1"], False), (["--replicas", "2"], True),
    (["--max-replicas", "3"], True)])
def test_when_serve_starts_a_router(argv: list[str], wanted: bool) -> None:
    assert wants_router(_serve_args(*argv)) is wanted


def test_autoscaling_bounds_default_to_the_replica_count() -> None:
    fixed = autoscale_config(_serve_args("--replicas", "3"))
    assert (fixed.min_replicas, fixed.max_replicas, fixed.enabled) == (3, 3, False)
    scaling = autoscale_config(_serve_args("--replicas", "2", "--min-replicas", "1",
                                           "--max-replicas", "4"))
    assert (scaling.min_replicas, scaling.max_replicas, scaling.enabled) == (1, 4, True)


@pytest.mark.parametrize(("argv", "message"), [
    (["serve", "--replicas", "3", "--max-replicas", "2"],
     "--replicas 3 is invalid: allowed is between --min-replicas (3, at least 0) and "
     "--max-replicas (2, at least 1)"),
    (["serve", "--replicas", "0"], "--replicas 0 is invalid: allowed is an integer >= 1 "
     "(0 only with --min-replicas 0)"),
    (["serve", "--min-replicas", "0", "--idle-timeout", "0"],
     "--idle-timeout 0.0 is invalid: allowed is seconds > 0"),
    (["serve", "--min-replicas", "0", "--hold-timeout", "-1"],
     "--hold-timeout -1.0 is invalid: allowed is seconds > 0"),
    (["serve", "--min-replicas", "0", "--max-held-requests", "0"],
     "--max-held-requests 0 is invalid: allowed is an integer >= 1"),
    (["serve", "--backend", "ray", "--replica-resources", "gpu_box"],
     "--replica-resources 'gpu_box' is invalid: allowed is NAME=AMOUNT"),
    (["serve", "--backend", "ray", "--replica-resources", "CPU=2"],
     "CPUs and GPUs have --replica-cpus and --replica-gpus"),
    (["serve", "--backend", "ray", "--replica-cpus", "-1"],
     "--replica-cpus -1.0 / --replica-gpus 0.0 is invalid"),
    (["serve", "--backend", "ray", "--ray-address", "127.0.0.1:1"],
     "--ray-address 127.0.0.1:1: no Ray head node answers there (Connection refused); start "
     "one with `ray start --head --port 1`"),
    (["serve", "--backend", "ray", "--ray-address", "nowhere"],
     "--ray-address 'nowhere' is invalid: allowed is host:port"),
    (["route", "--backend", "ray", "--backend", "http://a:1"],
     "--backend ray is invalid with other --backend URLs or --weights"),
    (["route", "--backend", "localhost:8000"], "--backend 'localhost:8000' is invalid"),
    (["route", "--backend", "http://a:1/v1"], "has a path: give the server's base URL"),
    (["route", "--backend", "http://a:1", "--backend", "http://b:1", "--policy", "weighted",
      "--weights", "3"], "allowed is 2 positive numbers separated by commas"),
    (["route", "--backend", "http://a:1", "--weights", "3"],
     "--weights only applies to --policy weighted"),
    (["route", "--backend", "http://a:1", "--max-attempts", "0"], "max_attempts=0 is invalid"),
    (["route", "--backend", "http://a:1", "--backend", "http://b:1", "--tiers", "full"],
     "--tiers 'full' is invalid: allowed is 2 of full or fast separated by commas"),
    (["route", "--backend", "http://a:1", "--tiers", "precise"],
     "--tiers 'precise' is invalid: allowed is 1 of full or fast"),
    (["route", "--backend", "http://a:1", "--critical-priority-below", "0"],
     "--critical-priority-below only applies with --tiers"),
])
def test_bad_flags_exit_2_saying_what_is_allowed(argv: list[str], message: str,
                                                 tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    if argv[0] == "serve":
        argv = [*argv, "--model", str(model)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.fixture
def backends() -> Iterator[list[FakeReplica]]:
    fakes = [FakeReplica(json_handler({"served": i})).start() for i in range(2)]
    yield fakes
    for fake in fakes:
        fake.stop()


@pytest.mark.timeout(60)
def test_surge_route_serves_and_exits_0_on_sigterm(backends: list[FakeReplica],
                                                   tmp_path: Path) -> None:
    log_path = tmp_path / "route.log"
    command = [sys.executable, "-m", "surge.cli", "route", "--port", "0", "--policy",
               "weighted", "--weights", "3,1",
               *[item for fake in backends for item in ("--backend", fake.url)]]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        port = _wait_for_port(process, log_path)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            served = [client.post("/v1/completions", json={}).json()["served"]
                      for _ in range(8)]
            assert client.get("/health").json()["replicas_routable"] == 2
        assert served.count(0) == 6 and served.count(1) == 2  # weights 3:1
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _wait_for_port(process: subprocess.Popen[bytes], log_path: Path) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        match = re.search(rb"router listening on http://127\.0\.0\.1:(\d+)",
                          log_path.read_bytes())
        if match:
            return int(match.group(1))
        assert process.poll() is None, log_path.read_text()
        time.sleep(0.05)  # polling the log for the port line
    raise AssertionError(log_path.read_text())

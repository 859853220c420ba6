"""Fixtures: the real Redis of this machine (127.0.0.1:6379) under a key prefix of each test's
own, deleted afterwards; `surge serve` processes with the response cache on."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.server._helpers import ServerProcess, start_server

REDIS_URL = "redis://127.0.0.1:6379/0"
KEYS = ("key-a", "key-b")


def delete_prefix(prefix: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    prefix = f"surge-test:{uuid.uuid4().hex}:"
    yield prefix
    delete_prefix(prefix)


@pytest.fixture(scope="session")
def sync_redis() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()  # the project's machines all run one; fail loudly if this one does not
    yield client
    client.close()


def dead_redis_url() -> str:
    """A Redis URL where nothing listens (a port just freed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


@pytest.fixture(scope="module")
def shared_prefix() -> Iterator[str]:
    """The prefix two servers of a module share."""
    prefix = f"surge-test:{uuid.uuid4().hex}:"
    yield prefix
    delete_prefix(prefix)


@pytest.fixture(scope="module")
def cache_args(tiny_checkpoint: Callable[[str], Path], shared_prefix: str) -> list[str]:
    """Two API keys (two tenants), an embedding model beside the LLM, the cache in Redis."""
    return ["--served-model-name", "tiny", "--api-key", KEYS[0], "--api-key", KEYS[1],
            "--extra-model", f"bert={tiny_checkpoint('tiny-bert')}",
            "--response-cache", "--cache-url", REDIS_URL, "--cache-key-prefix", shared_prefix]


@pytest.fixture(scope="module")
def cached_server(tiny_checkpoint: Callable[[str], Path], cache_args: list[str],
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(tiny_checkpoint("tiny-llama"), tmp_path_factory.mktemp("cached"),
                        *cache_args)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def replica_server(tiny_checkpoint: Callable[[str], Path], cache_args: list[str],
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A second replica on the same Redis and prefix."""
    proc = start_server(tiny_checkpoint("tiny-llama"), tmp_path_factory.mktemp("replica"),
                        *cache_args)
    yield proc
    proc.stop()

"""Fixtures: one shared `surge serve` for the tests that leave it as they found it; tests that
break or stop a server start their own with ``start_server``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.server._helpers import ServerProcess, start_server


@pytest.fixture(scope="session")
def model_dir(tiny_checkpoint: Callable[[str], Path]) -> Path:
    return tiny_checkpoint("tiny-llama")


@pytest.fixture(scope="session")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    """The shared server: default engine mode (its own process), 1 MiB body limit."""
    proc = start_server(model_dir, tmp_path_factory.mktemp("server"),
                        "--max-body-bytes", str(1 << 20), "--served-model-name", "tiny")
    yield proc
    proc.stop()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60.0) as http:
        yield http

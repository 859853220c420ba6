"""`--num-threads`: the engine's torch thread count, so replicas sharing a machine do not
oversubscribe its cores (`surge serve --replicas N` gives each cores/N)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from surge.config import EngineConfig

_PROBE = """
import sys, torch
from surge.config import EngineConfig
from surge.engine.core import EngineCore
EngineCore(EngineConfig(num_threads=int(sys.argv[2]), kv_cache_memory_bytes=1 << 20), sys.argv[1])
print("threads", torch.get_num_threads())
"""


@pytest.mark.timeout(120)
def test_the_engine_uses_the_thread_count_it_is_given(
        tiny_checkpoint: Callable[[str], Path]) -> None:
    # A child process: torch's thread count is global, the test process keeps its own.
    result = subprocess.run([sys.executable, "-c", _PROBE, str(tiny_checkpoint("tiny-llama")),
                             "1"], capture_output=True, text=True, timeout=100, check=True)
    assert "threads 1" in result.stdout


def test_a_bad_thread_count_says_what_is_allowed() -> None:
    with pytest.raises(ValueError, match="num_threads=0 is invalid: allowed is an integer >= 1"):
        EngineConfig(num_threads=0)

"""Compiled CPU decode steps (--compile-max-batch): same tokens as eager, every bucket used,
bad values refused by name."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest

from surge import LLM, SamplingParams
from surge.config import EngineConfig, add_engine_args
from surge.engine.compiled_decode import batch_buckets

ENGINE_ARGS = {"device": "cpu", "dtype": "float32", "enable_prefix_caching": False,
               "kv_cache_memory_bytes": 8 << 20}


def test_batch_buckets_are_powers_of_two_then_the_limit() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(2) == [1, 2]
    assert batch_buckets(4) == [1, 2, 4]
    assert batch_buckets(6) == [1, 2, 4, 6]


def test_compile_max_batch_is_validated_by_name() -> None:
    with pytest.raises(ValueError, match=r"compile_max_batch=-1 is invalid: allowed is an "
                                         r"integer >= 0"):
        EngineConfig(compile_max_batch=-1)
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert EngineConfig.from_args(parser.parse_args([])).compile_max_batch == 0
    args = parser.parse_args(["--compile-max-batch", "3"])
    assert EngineConfig.from_args(args).compile_max_batch == 3


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_tokens(tiny_checkpoint: Callable[[str], Path]
                                                ) -> None:
    """Batches of 1, 2, 3 (padded to 4) and 4 decode compiled, 5 eagerly; the greedy tokens
    match the eager engine's token for token."""
    model = tiny_checkpoint("tiny-llama")
    prompts = [[5, 9, 33, 2, 17], [40, 41, 42], list(range(3, 40)), [7] * 20, [8, 1, 3]]
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    eager = LLM(model, **ENGINE_ARGS)
    compiled = LLM(model, compile_max_batch=4, **ENGINE_ARGS)
    decode = compiled.engine.core.runner.compiled
    assert decode is not None and decode.buckets == [1, 2, 4]
    batches: list[int] = []
    run = decode.run

    def counted(*args: list) -> object:
        batches.append(len(args[0]))
        return run(*args)

    decode.run = counted  # type: ignore[method-assign]
    for size in range(1, 6):
        want = eager.generate(prompts[:size], greedy, use_tqdm=False)
        got = compiled.generate(prompts[:size], greedy, use_tqdm=False)
        assert ([o.outputs[0].token_ids for o in got]
                == [o.outputs[0].token_ids for o in want]), f"batch of {size}"
    assert sorted(set(batches)) == [1, 2, 3, 4]  # 5 ran eagerly

"""Compiled CPU decode steps (--compile-max-batch): same tokens as eager, every bucket used,
bad values refused by name."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest

from surge import LLM, SamplingParams
from surge.config import EngineConfig, add_engine_args
from surge.engine.compiled_decode import _reuse_inductor_templates, batch_buckets, cpp_compiler
from surge.models.quantization import WeightOnlyLinearMethod
from surge.testing.make_model import write_checkpoint

needs_compiler = pytest.mark.skipif(cpp_compiler() is None,
                                    reason="torch.compile needs a C++ compiler (g++)")
ENGINE_ARGS = {"device": "cpu", "dtype": "float32", "enable_prefix_caching": False,
               "kv_cache_memory_bytes": 8 << 20}


def test_batch_buckets_are_powers_of_two_then_the_limit() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(2) == [1, 2]
    assert batch_buckets(4) == [1, 2, 4]
    assert batch_buckets(6) == [1, 2, 4, 6]


def test_inductor_templates_are_parsed_once_and_render_any_arguments() -> None:
    from torch._inductor.codegen.common import KernelTemplate

    _reuse_inductor_templates()
    _reuse_inductor_templates()  # idempotent: one cache, not a cache of a cache
    source = "void {{name}}() { return {{value}}; }"
    parsed = KernelTemplate._template_from_string(source)
    assert KernelTemplate._template_from_string(source) is parsed
    assert parsed.render(name="f", value=1) == "void f() { return 1; }"
    assert parsed.render(name="g", value=2) == "void g() { return 2; }"
    assert KernelTemplate._template_from_string.cache_info().currsize >= 1


def test_compile_max_batch_is_validated_by_name() -> None:
    for bad in (-1, 65):
        with pytest.raises(ValueError, match=rf"compile_max_batch={bad} is invalid: allowed "
                                             r"is an integer from 0 \(off\) to 64"):
            EngineConfig(compile_max_batch=bad)
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert EngineConfig.from_args(parser.parse_args([])).compile_max_batch == 0
    args = parser.parse_args(["--compile-max-batch", "3"])
    assert EngineConfig.from_args(args).compile_max_batch == 3


@pytest.mark.slow
@needs_compiler
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


@pytest.mark.slow
@needs_compiler
def test_engines_in_one_process_each_run_their_own_weights(
        tiny_checkpoint: Callable[[str], Path], tmp_path: Path) -> None:
    """A compiled graph holds its model's weights as constants: a second engine of the same
    shape (other weights, the same checkpoint quantized, an int8 KV cache) must run its own
    graph, not the first one's."""
    first = tiny_checkpoint("tiny-llama")
    other = write_checkpoint("tiny-llama", tmp_path / "other", seed=1)
    prompts = [[5, 9, 33, 2, 17]]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    engines = [(first, {}), (other, {}), (first, {"quantization": "int8"}),
               (first, {"kv_cache_dtype": "int8"})]
    for model, extra in engines:
        args = ENGINE_ARGS | extra
        compiled = LLM(model, compile_max_batch=1, **args)
        got = compiled.generate(prompts, greedy, use_tqdm=False)[0].outputs[0].token_ids
        want = LLM(model, **args).generate(prompts, greedy, use_tqdm=False)[0].outputs[0]
        assert got == want.token_ids, (model, extra)


def test_without_a_cpp_compiler_compiling_is_refused_by_name(
        tiny_checkpoint: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(ValueError, match=r"compile_max_batch=2 is invalid here: torch.compile "
                                         r"builds CPU code with a C\+\+ compiler"):
        LLM(tiny_checkpoint("tiny-llama"), compile_max_batch=2, **ENGINE_ARGS)


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_compiled_quantized_layers_give_the_eager_dequantized_tokens(
        tiny_checkpoint: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch,
        quantization: str) -> None:
    """Eagerly, from 2 tokens on a quantized layer dequantizes into the shared scratch buffer
    and runs the dense GEMM; compiled, it runs inductor's weight-only GEMM template at every
    batch size. Both compute the same products: the greedy tokens match. (float32: this random
    model's next-token distribution is nearly flat, and bfloat16 rounding breaks its ties.)"""
    monkeypatch.setattr(WeightOnlyLinearMethod, "choose_threshold",
                        lambda self, layer: setattr(layer, "kernel_threshold", 2))
    model = tiny_checkpoint("tiny-llama")
    args = ENGINE_ARGS | {"quantization": quantization}
    prompts = [[5, 9, 33, 2, 17], [40, 41, 42], list(range(3, 40))]
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    want = LLM(model, **args).generate(prompts, greedy, use_tqdm=False)
    got = LLM(model, compile_max_batch=4, **args).generate(prompts, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]

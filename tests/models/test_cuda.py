"""The same engine on a CUDA GPU: fp32 greedy equals the CPU, bf16 runs. Skipped without one."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from surge import LLM, SamplingParams, StructuredOutputsParams

HAS_CUDA = torch.cuda.is_available()
skip_without_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

PROMPTS = ["Hello world, the", "The quick brown fox jumps over the lazy dog. " * 4, [7] * 3]
ENGINE_ARGS = dict(max_num_seqs=8, max_model_len=256)


def greedy(max_tokens: int = 32) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=5)


@pytest.fixture(scope="module")
def cpu_outputs(tiny_checkpoint: Callable[[str], Path]) -> list:
    llm = LLM(tiny_checkpoint("tiny-llama"), device="cpu", dtype="float32", **ENGINE_ARGS)
    return [o.outputs[0] for o in llm.generate(PROMPTS, greedy(), use_tqdm=False)]


@pytest.mark.cuda
@skip_without_cuda
@pytest.mark.parametrize("max_num_batched_tokens", [2048, 8])  # whole prompts, and chunks
def test_cuda_float32_greedy_equals_cpu(tiny_checkpoint: Callable[[str], Path],
                                        cpu_outputs: list, max_num_batched_tokens: int) -> None:
    llm = LLM(tiny_checkpoint("tiny-llama"), device="cuda", dtype="float32",
              max_num_batched_tokens=max_num_batched_tokens, **ENGINE_ARGS)
    assert llm.engine.core.loaded.device.type == "cuda"
    outputs = [o.outputs[0] for o in llm.generate(PROMPTS, greedy(), use_tqdm=False)]
    for gpu, cpu in zip(outputs, cpu_outputs, strict=True):
        assert gpu.token_ids == cpu.token_ids
        assert gpu.text == cpu.text
        for g, c in zip(gpu.logprobs, cpu.logprobs, strict=True):
            assert g.logprob == pytest.approx(c.logprob, abs=1e-3)


@pytest.mark.cuda
@skip_without_cuda
def test_cuda_bfloat16_runs(tiny_checkpoint: Callable[[str], Path], cpu_outputs: list) -> None:
    llm = LLM(tiny_checkpoint("tiny-llama"), device="cuda", dtype="bfloat16", **ENGINE_ARGS)
    outputs = [o.outputs[0] for o in llm.generate(PROMPTS, greedy(), use_tqdm=False)]
    for gpu, cpu in zip(outputs, cpu_outputs, strict=True):
        assert len(gpu.token_ids) == 32 and gpu.finish_reason == "length"
        assert all(0 <= t < 2048 for t in gpu.token_ids)
        assert all(math.isfinite(e.logprob) and e.logprob <= 0 for e in gpu.logprobs)
        # The first token comes from the prompt alone: bf16 keeps it among fp32's top 5.
        assert gpu.token_ids[0] in cpu.logprobs[0].top
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=5, max_tokens=16)
    first = llm.generate(PROMPTS[0], seeded, use_tqdm=False)[0].outputs[0].token_ids
    assert llm.generate(PROMPTS[0], seeded, use_tqdm=False)[0].outputs[0].token_ids == first


GRAPH_PROMPTS = [*PROMPTS, [5] * 7, "another prompt, a bit longer than the first", [9] * 40]


@pytest.mark.cuda
@skip_without_cuda
def test_cuda_graph_decode_equals_eager(tiny_checkpoint: Callable[[str], Path]) -> None:
    """Decode steps replayed from CUDA graphs (batches padded to 1, 4 and 8 rows, block tables
    to power-of-two lengths, padding rows writing to the trash block) give the eager tokens
    and logprobs: no real sequence's cache is touched by padding."""
    model = tiny_checkpoint("tiny-llama")
    args = dict(device="cuda", dtype="float32", **ENGINE_ARGS)
    eager = LLM(model, enforce_eager=True, **args)
    graphed = LLM(model, **args)
    assert eager.engine.core.runner.graphs is None
    for batch in (GRAPH_PROMPTS[:1], GRAPH_PROMPTS[:3], GRAPH_PROMPTS):
        expected = [o.outputs[0] for o in eager.generate(batch, greedy(48), use_tqdm=False)]
        got = [o.outputs[0] for o in graphed.generate(batch, greedy(48), use_tqdm=False)]
        for g, e in zip(got, expected, strict=True):
            assert g.token_ids == e.token_ids
            for gl, el in zip(g.logprobs, e.logprobs, strict=True):
                assert gl.logprob == pytest.approx(el.logprob, abs=1e-3)
    # Batches of 1, 3 and 6 (buckets 1, 4, 8) over contexts of 1 to 8 blocks.
    assert graphed.engine.core.runner.graphs.num_captured >= 3


@pytest.mark.cuda
@skip_without_cuda
def test_cuda_graphs_in_bfloat16_with_a_quantized_cache(tiny_checkpoint: Callable[[str], Path]
                                                        ) -> None:
    model = tiny_checkpoint("tiny-llama")
    for kv in ("auto", "int8", "fp8"):
        args = dict(device="cuda", dtype="bfloat16", kv_cache_dtype=kv, **ENGINE_ARGS)
        eager = LLM(model, enforce_eager=True, **args).generate(GRAPH_PROMPTS, greedy(24),
                                                                use_tqdm=False)
        graphed = LLM(model, **args).generate(GRAPH_PROMPTS, greedy(24), use_tqdm=False)
        for g, e in zip(graphed, eager, strict=True):
            g, e = g.outputs[0], e.outputs[0]
            assert len(g.token_ids) == 24 and g.token_ids[0] == e.token_ids[0], kv
            # Padded shapes may pick other GEMM kernels: bf16 rounding can flip a near tie
            # later on, never the first token (computed eagerly from the prompt).
            assert all(math.isfinite(x.logprob) for x in g.logprobs), kv


def test_enforce_eager_reaches_the_engine_and_the_cpu_has_no_graphs(
        tiny_checkpoint: Callable[[str], Path]) -> None:
    import argparse

    from surge.config import EngineConfig, add_engine_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert EngineConfig.from_args(parser.parse_args(["--enforce-eager"])).enforce_eager
    assert not EngineConfig.from_args(parser.parse_args([])).enforce_eager
    llm = LLM(tiny_checkpoint("tiny-llama"), device="cpu", **ENGINE_ARGS)
    assert llm.engine.core.runner.graphs is None


@pytest.mark.cuda
@skip_without_cuda
def test_cuda_structured_outputs_follow_their_grammars(
        tiny_checkpoint: Callable[[str], Path]) -> None:
    """On a GPU the grammar masks are computed on their own thread while the model runs (the
    overlap path) and applied to logits on the device; every output is bounded by its grammar,
    so each must finish and match whatever the random weights prefer."""
    llm = LLM(tiny_checkpoint("tiny-llama"), device="cuda", dtype="float32", **ENGINE_ARGS)
    assert llm.engine.core.loaded.device.type == "cuda"
    constraints = [dict(regex=r"[0-9]{3}-[a-z]{2}"), dict(choice=["alpha", "beta", "gamma"]),
                   dict(grammar='root ::= "cat" | "dog" " " [0-9]'),
                   dict(json={"type": "object", "properties": {"n": {"type": "integer",
                        "minimum": 0, "maximum": 99}}, "required": ["n"],
                        "additionalProperties": False})]
    params = [SamplingParams(temperature=t, seed=1, max_tokens=32,
                             structured_outputs=StructuredOutputsParams(**c))
              for c in constraints for t in (0.0, 1.0)]
    outputs = [o.outputs[0] for o in llm.generate(["Hi"] * len(params), params,
                                                  use_tqdm=False)]
    assert all(o.finish_reason == "stop" for o in outputs), [o.text for o in outputs]
    texts = [o.text for o in outputs]
    assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2}", t) for t in texts[0:2])
    assert all(t in ("alpha", "beta", "gamma") for t in texts[2:4])
    assert all(re.fullmatch(r"cat|dog [0-9]", t) for t in texts[4:6])
    assert all(0 <= json.loads(t)["n"] <= 99 for t in texts[6:8])


@pytest.mark.skipif(HAS_CUDA, reason="checks the error raised when there is no GPU")
def test_cuda_device_without_a_gpu_says_how_to_fix(tiny_checkpoint: Callable[[str], Path]
                                                   ) -> None:
    with pytest.raises(ValueError, match="no CUDA GPU is available; use --device cpu"):
        LLM(tiny_checkpoint("tiny-llama"), device="cuda")

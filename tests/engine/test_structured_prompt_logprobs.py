"""Prompt logprobs (issue 16 item 4), computed in the prefill: each prompt token's logprob
equals what the model assigns it after the tokens before it, whatever the chunking, prefix
cache or batch; the first token has none."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from surge import LLM, SamplingParams


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint: Callable[[str], Path]) -> Path:
    return tiny_checkpoint("tiny-llama")


def _prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 2000) for _ in range(length)]


def _next_token_logprobs(llm: LLM, prefix: list[int]) -> dict[int, float]:
    """Reference: the top-20 logprobs of the token after ``prefix``, as the sampler reports
    them for a one-token generation (a separate request per prefix)."""
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=20, ignore_eos=True)
    entry = llm.generate([prefix], params, use_tqdm=False)[0].outputs[0].logprobs[0]
    return {entry.token_id: entry.logprob, **entry.top}


def test_prompt_logprobs_match_one_request_per_prefix(model_dir: Path) -> None:
    # A small token budget chunks the 40-token prompt; the shared prefix would hit the cache.
    llm = LLM(model_dir, dtype="float32", max_model_len=256, max_num_batched_tokens=16)
    prompt = _prompt(40, 1)
    llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)  # fills the cache
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=3)
    outputs = llm.generate([prompt, _prompt(7, 2)], params, use_tqdm=False)
    entries = outputs[0].prompt_logprobs
    assert entries is not None and len(entries) == len(prompt) and entries[0] is None
    assert len(outputs[1].prompt_logprobs) == 7
    assert outputs[0].num_cached_tokens == 0  # such a request bypasses the prefix cache
    for position in (1, 2, 15, 16, 17, 39):
        entry = entries[position]
        assert entry.token_id == prompt[position] and len(entry.top) == 3
        top_reference = _next_token_logprobs(llm, prompt[:position])
        best = max(top_reference, key=top_reference.get)
        assert entry.top[best] == pytest.approx(top_reference[best], abs=1e-4)
        if prompt[position] in top_reference:
            assert entry.logprob == pytest.approx(top_reference[prompt[position]], abs=1e-4)
        assert entry.logprob <= max(entry.top.values()) + 1e-6


def test_prompt_logprobs_are_a_distribution(model_dir: Path) -> None:
    llm = LLM(model_dir, dtype="float32", max_model_len=256)
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=20)
    out = llm.generate([_prompt(5, 3)], params, use_tqdm=False)[0]
    for entry in out.prompt_logprobs[1:]:
        probs = torch.tensor(list(entry.top.values())).exp()
        assert 0 < probs.sum() <= 1 + 1e-5
    assert llm.generate([_prompt(5, 3)], SamplingParams(max_tokens=1),
                        use_tqdm=False)[0].prompt_logprobs is None

"""Bad input raises ValueError naming the field and what is allowed, and harms no other request."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from surge import LLM, SamplingParams

CONTEXT = 64  # max_model_len of the engine under test
VOCAB = 2048  # tiny-llama
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
GOOD_PROMPT = "The quick brown fox jumps over the lazy dog."

# name -> (prompt, params, regex the message must match: the field, then the allowed range)
BAD_PROMPTS = {
    "too_long": ([5] * (CONTEXT + 10), "prompt has 74 tokens.*at most 63 prompt tokens"),
    "at_context": ([5] * CONTEXT, "prompt has 64 tokens.*at most 63 prompt tokens"),
    "empty_text": ("", r"prompt is empty.*at least 1 token"),
    "empty_ids": ([], r"prompt is empty.*at least 1 token"),
    "id_too_large": ([5, VOCAB, 7], rf"token ids \[{VOCAB}\] are unknown.*\[0, {VOCAB - 1}\]"),
    "id_negative": ([-1, 5], rf"token ids \[-1\] are unknown.*\[0, {VOCAB - 1}\]"),
    "not_ids": ([1, "a"], "prompt must be a string or a list of token ids"),
}
BAD_PARAMS = {
    "max_tokens_0": (dict(max_tokens=0), r"max_tokens=0 is invalid.*>= 1"),
    "top_p_0": (dict(top_p=0), r"top_p=0 is invalid.*\(0, 1\]"),
    "top_p_1.5": (dict(top_p=1.5), r"top_p=1.5 is invalid.*\(0, 1\]"),
    "temperature_-1": (dict(temperature=-1), r"temperature=-1 is invalid.*>= 0"),
    "temperature_nan": (dict(temperature=float("nan")), r"temperature=nan is invalid.*>= 0"),
    "logprobs_21": (dict(logprobs=21), r"logprobs=21 is invalid.*\[0, 20\]"),
    "min_over_max": (dict(min_tokens=5, max_tokens=2), r"min_tokens=5 is invalid.*max_tokens"),
}


@pytest.fixture(scope="module")
def llm(tiny_checkpoint: Callable[[str], Path]) -> LLM:
    return LLM(tiny_checkpoint("tiny-llama"), dtype="float32", max_num_seqs=8,
               max_model_len=CONTEXT)


@pytest.fixture(scope="module")
def good_solo(llm: LLM) -> list[int]:
    return llm.generate(GOOD_PROMPT, GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def assert_idle(llm: LLM) -> None:
    kv = llm.engine.core.block_manager
    assert not llm.engine.has_unfinished_requests()
    assert kv.num_free_blocks == kv.num_blocks


@pytest.mark.parametrize("case", list(BAD_PARAMS))
def test_bad_sampling_params_name_the_field_and_range(case: str) -> None:
    kwargs, message = BAD_PARAMS[case]
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("case", list(BAD_PROMPTS))
def test_bad_prompt_beside_a_good_request(llm: LLM, good_solo: list[int], case: str) -> None:
    prompt, message = BAD_PROMPTS[case]
    engine = llm.engine
    good_id = engine.add_request(GOOD_PROMPT, GREEDY)
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, GREEDY)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert list(finished) == [good_id]
    assert finished[good_id].outputs[0].token_ids == good_solo
    assert_idle(llm)


@pytest.mark.parametrize("case", ["too_long", "empty_text", "id_too_large"])
def test_generate_with_one_bad_prompt_queues_nothing(llm: LLM, good_solo: list[int],
                                                     case: str) -> None:
    prompt, message = BAD_PROMPTS[case]
    with pytest.raises(ValueError, match=rf"prompts\[1\]: .*{message}"):
        llm.generate([GOOD_PROMPT, prompt], GREEDY, use_tqdm=False)
    assert_idle(llm)
    assert llm.engine._tracked == {}
    out = llm.generate([GOOD_PROMPT], GREEDY, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == good_solo


@pytest.mark.parametrize(("kwargs", "message"), [
    pytest.param(dict(prompts=[]), "prompts must be a non-empty", id="no_prompts"),
    pytest.param(dict(prompts=[[]]), r"prompts\[0\]: prompt is empty", id="empty_ids"),
    pytest.param(dict(prompts=["a", "b"], sampling_params=[GREEDY] * 3),
                 "got 3 sampling_params for 2 prompts", id="params_count"),
    pytest.param(dict(prompts=["a", "b"], priority=[0]), "got 1 priorities for 2 prompts",
                 id="priority_count"),
    pytest.param(dict(prompts=["a", "b"], priority=[0, 1.5]),
                 r"prompts\[1\]: priority=1.5 is invalid", id="priority_float"),
])
def test_bad_generate_arguments(llm: LLM, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        llm.generate(use_tqdm=False, **kwargs)
    assert_idle(llm)


def test_prompt_at_the_limit_gets_exactly_one_token(llm: LLM) -> None:
    out = llm.generate([[5] * (CONTEXT - 1)], SamplingParams(max_tokens=16, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 1 and out.finish_reason == "length"
    unbounded = llm.generate([[5] * (CONTEXT - 4)], SamplingParams(max_tokens=None,
                                                                   ignore_eos=True),
                             use_tqdm=False)[0].outputs[0]
    assert len(unbounded.token_ids) == 4 and unbounded.finish_reason == "length"


@pytest.mark.timeout(60)
def test_request_that_cannot_fit_the_kv_cache_is_refused_not_hung(
        tiny_checkpoint: Callable[[str], Path]) -> None:
    block_bytes = 16 * 2 * 4 * 2 * 32 * 4  # tiny-llama fp32, block_size 16
    small = LLM(tiny_checkpoint("tiny-llama"), dtype="float32",
                kv_cache_memory_bytes=2 * block_bytes)
    with pytest.raises(ValueError, match=r"cannot fit the KV cache.*max_tokens"):
        small.generate([[5] * 10], SamplingParams(max_tokens=40), use_tqdm=False)
    assert_idle(small)
    out = small.generate([[5] * 10], SamplingParams(max_tokens=20, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 20


@pytest.mark.parametrize(("kwargs", "message"), [
    pytest.param(dict(dtype="float64"),
                 "dtype='float64' is invalid: allowed is one of auto, float32", id="dtype"),
    pytest.param(dict(block_size=0), "block_size=0 is invalid: allowed is an integer >= 1",
                 id="block_size"),
    pytest.param(dict(max_num_seqs=0), "max_num_seqs=0 is invalid", id="max_num_seqs"),
    pytest.param(dict(kv_cache_memory_bytes=-1), "kv_cache_memory_bytes=-1 is invalid",
                 id="kv_cache_memory_bytes"),
])
def test_bad_engine_args_name_the_field(tiny_checkpoint: Callable[[str], Path],
                                        kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LLM(tiny_checkpoint("tiny-llama"), **kwargs)

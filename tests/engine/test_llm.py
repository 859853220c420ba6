"""The offline `LLM` API end to end on tiny-llama (fp32): batching, chunking, prefix caching,
preemption, sampling, stop conditions, abort, chat, logprobs and streaming.

The reference for every greedy output is the same prompt run alone on an engine with prefix
caching off: whatever the scheduler does (batch, chunk, share, preempt) must not change it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from surge import LLM, SamplingParams
from surge.outputs import CompletionOutput

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
SAMPLED = dict(temperature=1.0, top_p=0.9, top_k=50, max_tokens=16, ignore_eos=True)
ENGINE_ARGS = dict(dtype="float32", max_num_seqs=16, max_model_len=512)


def _token_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 2048) for _ in range(length)]  # ids 0-2 are special tokens


TEXT_PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog.",
    "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole, filled with "
    "the ends of worms and an oozy smell, nor yet a dry, bare, sandy hole.",
]
PROMPTS: list[str | list[int]] = [*TEXT_PROMPTS, _token_prompt(1, 1), _token_prompt(16, 2),
                                  _token_prompt(37, 3), _token_prompt(70, 4),
                                  _token_prompt(9, 5)]


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint: Callable[[str], Path]) -> Path:
    return tiny_checkpoint("tiny-llama")


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return LLM(model_dir, **ENGINE_ARGS)


@pytest.fixture(scope="module")
def plain_llm(model_dir: Path) -> LLM:
    return LLM(model_dir, enable_prefix_caching=False, **ENGINE_ARGS)


@pytest.fixture(scope="module")
def solo(plain_llm: LLM) -> Callable[[str | list[int]], CompletionOutput]:
    """Greedy output of one prompt run alone on the prefix-cache-off engine (memoized)."""
    memo: dict[str, CompletionOutput] = {}

    def run(prompt: str | list[int]) -> CompletionOutput:
        key = repr(prompt)
        if key not in memo:
            memo[key] = plain_llm.generate(prompt, GREEDY, use_tqdm=False)[0].outputs[0]
        return memo[key]

    return run


def completions(llm: LLM, prompts: list, params: SamplingParams | list[SamplingParams] = GREEDY
                ) -> list[CompletionOutput]:
    return [out.outputs[0] for out in llm.generate(prompts, params, use_tqdm=False)]


def assert_idle(llm: LLM) -> None:
    core = llm.engine.core
    assert not llm.engine.has_unfinished_requests()
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks
    assert llm.engine._tracked == {}


def test_batched_mixed_lengths_equal_one_at_a_time(llm: LLM, solo: Callable) -> None:
    outputs = completions(llm, PROMPTS)
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        reference = solo(prompt)
        assert out.token_ids == reference.token_ids, prompt
        assert out.text == reference.text
        assert out.finish_reason == "length" and len(out.token_ids) == GREEDY.max_tokens
    assert_idle(llm)


def test_chunked_prefill_equals_unchunked(model_dir: Path, solo: Callable) -> None:
    chunked = LLM(model_dir, max_num_batched_tokens=16, **ENGINE_ARGS)
    prompts = [p for p in PROMPTS if len(chunked.get_tokenizer().encode(p) if isinstance(
        p, str) else p) > 16]
    assert len(prompts) >= 2
    for prompt, out in zip(prompts, completions(chunked, prompts), strict=True):
        assert out.token_ids == solo(prompt).token_ids


@pytest.mark.parametrize(("block_size", "budget"), [(1, 2048), (7, 5), (64, 2048), (16, 1)])
def test_odd_block_sizes_and_budgets_equal_one_at_a_time(model_dir: Path, solo: Callable,
                                                        block_size: int, budget: int) -> None:
    odd = LLM(model_dir, block_size=block_size, max_num_batched_tokens=budget, **ENGINE_ARGS)
    for prompt, out in zip(PROMPTS, completions(odd, PROMPTS), strict=True):
        assert out.token_ids == solo(prompt).token_ids


def test_prefix_cache_hit_gives_identical_output(llm: LLM, solo: Callable) -> None:
    prefix = _token_prompt(50, 10)  # 3 full blocks of 16
    first, second = [*prefix, 11, 12, 13], [*prefix, 21, 22]
    kv = llm.engine.core.block_manager
    completions(llm, [first])
    hits_before = kv.prefix_cache_hits
    out = llm.generate(second, GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == 48
    assert kv.prefix_cache_hits >= hits_before + 48
    assert out.outputs[0].token_ids == solo(second).token_ids

    # The very same prompt again: every full block but the one holding its last token hits.
    again = llm.generate(second, GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == 48
    assert again.outputs[0].token_ids == solo(second).token_ids
    assert_idle(llm)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_under_a_tiny_kv_budget_keeps_outputs(model_dir: Path, solo: Callable,
                                                         plain_llm: LLM,
                                                         prefix_caching: bool) -> None:
    block_bytes = 16 * 2 * 4 * 2 * 32 * 4  # block_size * K,V * layers * kv_heads * dim * fp32
    tight = LLM(model_dir, kv_cache_memory_bytes=10 * block_bytes,
                enable_prefix_caching=prefix_caching, **ENGINE_ARGS)
    kv = tight.engine.core.block_manager
    assert kv.num_blocks == 10
    prompts = [_token_prompt(length, 100 + length) for length in (5, 12, 20, 28, 33, 40, 9, 17)]
    outputs = completions(tight, prompts)  # needs ~30 blocks if all ran at once
    assert tight.engine.core.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outputs, strict=True):
        assert out.token_ids == solo(prompt).token_ids
    # Seeded sampling too: a preempted request keeps its random stream.
    preemptions = tight.engine.core.scheduler.num_preemptions
    seeded = [SamplingParams(seed=i, **SAMPLED) for i in range(len(prompts))]
    roomy = completions(plain_llm, prompts, seeded)
    assert [o.token_ids for o in completions(tight, prompts, seeded)] == [
        o.token_ids for o in roomy]
    assert tight.engine.core.scheduler.num_preemptions > preemptions
    assert_idle(tight)


@pytest.mark.parametrize(("block_size", "num_blocks", "max_num_seqs", "budget", "caching"), [
    (16, 12, 8, 16, True), (4, 40, 8, 7, True), (4, 36, 4, 5, False), (16, 40, 16, 3, True)])
def test_random_mix_matches_solo(model_dir: Path, solo: Callable, block_size: int,
                                 num_blocks: int, max_num_seqs: int, budget: int,
                                 caching: bool) -> None:
    """Shared prefixes, mixed lengths and priorities, tight cache and budget: chunking,
    prefix hits and preemption all at once, and every output still equals the solo run."""
    rng = random.Random(block_size * 1000 + num_blocks + budget)
    base = _token_prompt(80, 20)
    prompts, params = [], []
    for _ in range(24):
        shared = rng.choice([0, 5, 16, 17, 33, 48, 64])
        prompts.append(base[:shared] + _token_prompt(rng.randrange(1, 30), rng.random()))
        params.append(SamplingParams(temperature=0.0, ignore_eos=True,
                                     max_tokens=rng.randrange(1, GREEDY.max_tokens + 1)))
    block_bytes = block_size * 2 * 4 * 2 * 32 * 4  # K,V * layers * kv_heads * dim * fp32
    llm = LLM(model_dir, dtype="float32", max_model_len=512, block_size=block_size,
              kv_cache_memory_bytes=num_blocks * block_bytes, max_num_seqs=max_num_seqs,
              max_num_batched_tokens=budget, enable_prefix_caching=caching)
    priorities = [rng.randrange(3) for _ in prompts]
    outputs = llm.generate(prompts, params, use_tqdm=False, priority=priorities)
    for prompt, p, out in zip(prompts, params, outputs, strict=True):
        assert out.outputs[0].token_ids == solo(prompt).token_ids[:p.max_tokens]
    assert (llm.engine.core.block_manager.prefix_cache_hits > 0) == caching
    assert_idle(llm)


def test_seeded_sampling_is_reproducible_and_batch_independent(llm: LLM,
                                                               plain_llm: LLM) -> None:
    prompt = TEXT_PROMPTS[1]
    seeded = SamplingParams(seed=1234, **SAMPLED)
    alone = completions(llm, [prompt], seeded)[0].token_ids
    assert completions(llm, [prompt], seeded)[0].token_ids == alone
    assert completions(plain_llm, [prompt], seeded)[0].token_ids == alone  # another engine
    # Same request among others (seeded and not), at another position in the batch.
    batch = [PROMPTS[5], prompt, PROMPTS[0], prompt]
    params = [SamplingParams(seed=7, **SAMPLED), seeded, SamplingParams(**SAMPLED),
              SamplingParams(seed=99, **SAMPLED)]
    outs = completions(llm, batch, params)
    assert outs[1].token_ids == alone
    assert outs[3].token_ids != alone
    other_seed = completions(llm, [prompt], SamplingParams(seed=4321, **SAMPLED))[0].token_ids
    assert other_seed != alone
    greedy = completions(llm, [prompt], GREEDY)[0].token_ids
    assert alone != greedy[:len(alone)]  # it really sampled


def test_stop_string_cuts_the_text_exactly(llm: LLM, solo: Callable) -> None:
    prompt = TEXT_PROMPTS[2]
    reference = solo(prompt)
    text = reference.text
    middle = len(text) // 2
    stop = text[middle:middle + 3]
    assert "\ufffd" not in stop and stop.strip()
    cut = text.find(stop)
    out = completions(llm, [prompt], SamplingParams(
        temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop]))[0]
    assert out.text == text[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == reference.token_ids[:len(out.token_ids)]
    assert len(out.token_ids) < len(reference.token_ids)

    kept = completions(llm, [prompt], SamplingParams(
        temperature=0.0, max_tokens=24, ignore_eos=True, stop=stop,
        include_stop_str_in_output=True))[0]
    assert kept.text == text[:cut + len(stop)]

    # The stop string completes on the last token max_tokens allows: still a "stop".
    last = completions(llm, [prompt], SamplingParams(
        temperature=0.0, max_tokens=len(out.token_ids), ignore_eos=True, stop=[stop]))[0]
    assert (last.text, last.finish_reason, last.stop_reason) == (out.text, "stop", stop)
    assert_idle(llm)


def _first_new_token(token_ids: list[int], at_least: int) -> int:
    """Index of the first token at or after `at_least` that did not occur before it."""
    return next(i for i in range(at_least, len(token_ids))
                if token_ids[i] not in token_ids[:i])


def test_stop_token_ids(llm: LLM, solo: Callable) -> None:
    prompt = PROMPTS[6]
    reference = solo(prompt).token_ids
    index = _first_new_token(reference, 2)
    params = dict(temperature=0.0, max_tokens=24, stop_token_ids=[reference[index]])
    out = completions(llm, [prompt], SamplingParams(**params))[0]
    assert out.token_ids == reference[:index + 1]
    assert out.finish_reason == "stop" and out.stop_reason == reference[index]
    # As in vLLM, the stop token ends the text without being part of it, unless asked for.
    decode = llm.get_tokenizer().decode
    assert out.text == decode(reference[:index])
    kept = completions(llm, [prompt], SamplingParams(include_stop_str_in_output=True,
                                                     **params))[0]
    assert kept.text == decode(reference[:index + 1]) != out.text


def test_min_tokens_defers_stop_tokens(llm: LLM, solo: Callable) -> None:
    prompt = PROMPTS[6]
    first = solo(prompt).token_ids[0]
    params = dict(temperature=0.0, max_tokens=24, stop_token_ids=[first])
    assert completions(llm, [prompt], SamplingParams(**params))[0].token_ids == [first]
    out = completions(llm, [prompt], SamplingParams(min_tokens=5, **params))[0]
    assert len(out.token_ids) >= 5
    assert first not in out.token_ids[:5]
    if out.finish_reason == "stop":
        assert out.token_ids[-1] == first and first not in out.token_ids[:-1]
    else:
        assert out.finish_reason == "length" and len(out.token_ids) == 24


def test_min_tokens_defers_stop_strings(llm: LLM, solo: Callable) -> None:
    prompt = TEXT_PROMPTS[2]
    text = solo(prompt).text
    stop = text[:3]
    assert stop.strip() and "\ufffd" not in stop
    params = dict(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop])
    early = completions(llm, [prompt], SamplingParams(**params))[0]
    assert early.text == "" and early.finish_reason == "stop"
    # Before min_tokens ids exist, a stop string does not end the request (as in vLLM).
    late = completions(llm, [prompt], SamplingParams(min_tokens=6, **params))[0]
    assert len(late.token_ids) >= 6
    assert late.text.startswith(stop)


def test_engine_seed_makes_unseeded_sampling_repeatable(model_dir: Path) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    runs = [[o.outputs[0].token_ids for o in LLM(model_dir, seed=seed, **ENGINE_ARGS).generate(
        PROMPTS[:3], params, use_tqdm=False)] for seed in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.parametrize("keep_one", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_filters_that_keep_one_token_sample_greedily(llm: LLM, solo: Callable,
                                                     keep_one: dict) -> None:
    prompt = PROMPTS[5]
    params = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True, seed=3,
                            **keep_one)
    assert completions(llm, [prompt], params)[0].token_ids == solo(prompt).token_ids


@pytest.mark.parametrize("penalty", ["frequency_penalty", "presence_penalty"])
def test_penalties_follow_openai_semantics(llm: LLM, solo: Callable, penalty: str) -> None:
    """logit[t] -= frequency * count(t in output) or presence * (t in output); the returned
    logprobs are the model's own, so each greedy pick must win after that adjustment."""
    prompt = PROMPTS[2]
    strength = 1.5
    out = completions(llm, [prompt], SamplingParams(
        temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=20,
        **{penalty: strength}))[0]
    assert out.token_ids != solo(prompt).token_ids  # the repetitive output changed
    for step, entry in enumerate(out.logprobs):
        before = out.token_ids[:step]

        def adjusted(token: int, logprob: float, before: list[int] = before) -> float:
            count = before.count(token)
            return logprob - strength * (count if penalty == "frequency_penalty"
                                         else min(count, 1))

        chosen = adjusted(entry.token_id, entry.logprob)
        assert all(chosen >= adjusted(t, lp) - 1e-5 for t, lp in entry.top.items()), step


def test_max_tokens_finishes_with_length(llm: LLM, solo: Callable) -> None:
    prompt = PROMPTS[1]
    out = completions(llm, [prompt], SamplingParams(temperature=0.0, max_tokens=5,
                                                   ignore_eos=True))[0]
    assert out.token_ids == solo(prompt).token_ids[:5]
    assert out.finish_reason == "length" and out.stop_reason is None


def test_closing_a_stream_early_aborts_and_frees_blocks(llm: LLM, solo: Callable) -> None:
    stream = llm.stream(PROMPTS[5], SamplingParams(temperature=0.0, max_tokens=200,
                                                   ignore_eos=True))
    partial = [next(stream), next(stream)]
    assert not partial[-1].finished
    assert llm.engine.has_unfinished_requests()
    kv = llm.engine.core.block_manager
    assert kv.num_free_blocks < kv.num_blocks
    stream.close()
    assert_idle(llm)
    # The engine keeps serving.
    assert completions(llm, [PROMPTS[1]])[0].token_ids == solo(PROMPTS[1]).token_ids


@pytest.mark.timeout(60)
def test_interleaved_streams_and_generate_lose_no_output(llm: LLM, solo: Callable) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    streams = {1: llm.stream(PROMPTS[1], params), 2: llm.stream(PROMPTS[2], params)}
    updates = {key: [next(stream)] for key, stream in streams.items()}
    # generate() steps the engine 24 times: both streams finish meanwhile.
    middle = llm.generate(PROMPTS[5], GREEDY, use_tqdm=False)[0].outputs[0]
    assert middle.token_ids == solo(PROMPTS[5]).token_ids
    for key, stream in streams.items():
        updates[key].extend(stream)
        final = updates[key][-1].outputs[0]
        assert updates[key][-1].finished
        assert [t for u in updates[key] for t in u.outputs[0].delta_token_ids] == \
            final.token_ids == solo(PROMPTS[key]).token_ids[:12]
        assert "".join(u.outputs[0].delta_text for u in updates[key]) == final.text
    assert_idle(llm)


def test_chat_renders_the_template(llm: LLM, model_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")

    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name three colours."}]
    rendered = ("<|im_start|>system\nYou are terse.<|im_end|>\n"
                "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n")
    hf = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    assert hf.apply_chat_template(messages, add_generation_prompt=True,
                                  tokenize=False) == rendered
    expected_ids = hf(rendered, add_special_tokens=False)["input_ids"]

    chat = llm.chat(messages, GREEDY, use_tqdm=False)[0]
    assert chat.prompt_token_ids == expected_ids
    direct = llm.generate([expected_ids], GREEDY, use_tqdm=False)[0]
    assert chat.outputs[0].token_ids == direct.outputs[0].token_ids
    assert chat.outputs[0].text == direct.outputs[0].text


def test_logprobs_shape(llm: LLM) -> None:
    out = completions(llm, [PROMPTS[1]], SamplingParams(
        temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=5))[0]
    assert out.logprobs is not None and len(out.logprobs) == 6
    for token_id, entry in zip(out.token_ids, out.logprobs, strict=True):
        assert entry.token_id == token_id
        assert entry.logprob <= 0
        assert len(entry.top) == 5
        values = list(entry.top.values())
        assert values == sorted(values, reverse=True)
        assert entry.top.get(token_id) == pytest.approx(entry.logprob)  # greedy: the top one
        assert entry.logprob == pytest.approx(values[0])
    assert out.cumulative_logprob == pytest.approx(sum(e.logprob for e in out.logprobs))

    sampled = completions(llm, [PROMPTS[1]], SamplingParams(logprobs=0, seed=3, **SAMPLED))[0]
    assert len(sampled.logprobs) == len(sampled.token_ids)
    assert all(e.top == {} and e.logprob <= 0 for e in sampled.logprobs)
    assert completions(llm, [PROMPTS[1]])[0].logprobs is None


@pytest.mark.parametrize("with_stop", [False, True])
def test_stream_deltas_concatenate_to_the_final_text(llm: LLM, solo: Callable,
                                                     with_stop: bool) -> None:
    stop = None
    if with_stop:  # a 4-char stop string first seen a few tokens in: text is held back
        text = solo(TEXT_PROMPTS[2]).text
        stop = next(text[i:i + 4] for i in range(12, len(text) - 4)
                    if text.find(text[i:i + 4]) == i and "\ufffd" not in text[i:i + 4])
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=stop)
    final = completions(llm, [TEXT_PROMPTS[2]], params)[0]
    assert final.finish_reason == ("stop" if with_stop else "length")
    updates = list(llm.stream(TEXT_PROMPTS[2], params))
    assert len(updates) > 2
    assert updates[-1].finished and not any(u.finished for u in updates[:-1])
    last = updates[-1].outputs[0]
    assert "".join(u.outputs[0].delta_text for u in updates) == last.text == final.text
    assert last.text
    streamed_ids = [t for u in updates for t in u.outputs[0].delta_token_ids]
    assert streamed_ids == last.token_ids == final.token_ids
    assert last.finish_reason == final.finish_reason
    assert_idle(llm)

"""Token-budget scheduler driven with fake sampled tokens (no model)."""

from __future__ import annotations

import random
from collections.abc import Iterable

import pytest

from surge.engine.kv_cache import BlockManager
from surge.engine.request import FinishReason, Request, RequestStatus
from surge.engine.scheduler import (
    LOWER_PROMPT_GRACE_SECONDS,
    LOWER_PROMPT_SHARE,
    Scheduler,
    SchedulerOutput,
)
from surge.sampling_params import SamplingParams

EOS = 2
FILLER = 7  # a sampled token that never stops anything


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8,
                   max_num_batched_tokens: int = 64, prefix_caching: bool = False,
                   clock: FakeClock | None = None) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    return Scheduler(bm, max_num_seqs, max_num_batched_tokens, clock=clock or FakeClock())


def make_request(request_id: str, num_prompt: int, priority: int = 0,
                 max_model_len: int = 2**31, first_token: int = 100,
                 **params: object) -> Request:
    prompt = list(range(first_token, first_token + num_prompt))
    return Request(request_id, prompt, SamplingParams(**params), frozenset({EOS}),
                   max_model_len=max_model_len, priority=priority)


def check_invariants(s: Scheduler, out: SchedulerOutput) -> None:
    assert out.num_tokens <= s.max_num_batched_tokens
    assert len(out.chunks) <= s.max_num_seqs
    ids = [c.request.request_id for c in out.chunks]
    assert len(ids) == len(set(ids)), "a request was scheduled twice in one step"
    owners: dict[int, str] = {}
    for chunk in out.chunks:
        request = chunk.request
        assert request.status is RequestStatus.RUNNING
        assert chunk.num_tokens >= 1
        assert chunk.start == request.num_computed_tokens
        assert chunk.start + chunk.num_tokens <= request.num_tokens
        assert len(request.block_ids) * s.kv.block_size >= chunk.start + chunk.num_tokens
        for block_id in request.block_ids:  # prefix caching is off: no block is shared
            assert owners.setdefault(block_id, request.request_id) == request.request_id
    for request in out.preempted:
        assert request not in [c.request for c in out.chunks]
        assert request.block_ids == [] and request.num_computed_tokens == 0


def step(s: Scheduler, tokens: dict[str, int] | None = None,
         check: bool = True) -> tuple[SchedulerOutput, list[Request]]:
    """One schedule + fake model step: every sampling chunk gets tokens[id] or FILLER."""
    out = s.schedule()
    if check:
        check_invariants(s, out)
    sampled = {c.request.request_id: (tokens or {}).get(c.request.request_id, FILLER)
               for c in out.chunks if c.samples}
    return out, s.update_from_output(out, sampled)


def run_all(s: Scheduler, max_steps: int = 500) -> list[str]:
    """Step until nothing is left; return request ids in the order they finished."""
    order: list[str] = []
    for _ in range(max_steps):
        if not s.has_unfinished():
            return order
        _, finished = step(s)
        order.extend(r.request_id for r in finished)
    raise AssertionError("scheduler made no progress")


def add(s: Scheduler, requests: Iterable[Request]) -> None:
    for request in requests:
        s.add_request(request)


def test_long_prompt_is_chunked_within_the_token_budget() -> None:
    s = make_scheduler(max_num_batched_tokens=8)
    request = make_request("a", 20, max_tokens=2)
    s.add_request(request)
    spans = []
    for _ in range(3):
        out = s.schedule()
        check_invariants(s, out)
        spans.append([(c.start, c.num_tokens, c.samples) for c in out.chunks])
        s.update_from_output(out, {"a": FILLER} if out.chunks[-1].samples else {})
    assert spans == [[(0, 8, False)], [(8, 8, False)], [(16, 4, True)]]
    assert request.num_output_tokens == 1
    out, finished = step(s)
    assert [(c.start, c.num_tokens) for c in out.chunks] == [(20, 1)]
    assert finished == [request] and request.finish_reason is FinishReason.LENGTH
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_decode_and_prefill_share_a_step() -> None:
    s = make_scheduler(max_num_batched_tokens=10)
    a = make_request("a", 4, max_tokens=10)
    s.add_request(a)
    step(s)
    b = make_request("b", 20, max_tokens=10, first_token=500)
    s.add_request(b)
    out, _ = step(s)
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [
        ("a", 4, 1), ("b", 0, 9)]
    out, _ = step(s)
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [
        ("a", 5, 1), ("b", 9, 9)]
    assert run_all(s) == ["a", "b"]


def test_max_num_seqs_is_respected() -> None:
    s = make_scheduler(max_num_seqs=2)
    requests = [make_request(name, 4, max_tokens=3, first_token=100 * i)
                for i, name in enumerate("abc", start=1)]
    add(s, requests)
    out, _ = step(s)
    assert [c.request.request_id for c in out.chunks] == ["a", "b"]
    assert (s.num_running, s.num_waiting) == (2, 1)
    assert requests[2].status is RequestStatus.WAITING
    assert run_all(s) == ["a", "b", "c"]
    assert all(r.num_output_tokens == 3 for r in requests)


def test_priority_first_then_arrival_order() -> None:
    s = make_scheduler(max_num_seqs=1)
    add(s, [make_request("late-low", 4, priority=5, max_tokens=1),
            make_request("first", 4, priority=0, max_tokens=1),
            make_request("second", 4, priority=0, max_tokens=1),
            make_request("urgent", 4, priority=-1, max_tokens=1)])
    assert run_all(s) == ["urgent", "first", "second", "late-low"]


@pytest.mark.parametrize(("priorities", "victim"), [((0, 0, 0), "c"), ((0, 1, 0), "b")])
def test_preemption_picks_lowest_priority_latest_and_it_resumes(
        priorities: tuple[int, int, int], victim: str) -> None:
    # 4 blocks of 4 tokens; three 4-token prompts take 3, and each needs a 2nd at token 5.
    s = make_scheduler(num_blocks=4, block_size=4)
    requests = {name: make_request(name, 4, priority=p, max_tokens=8, first_token=100 * i)
                for i, (name, p) in enumerate(zip("abc", priorities, strict=True), start=1)}
    add(s, requests.values())
    out, _ = step(s)
    assert len(out.chunks) == 3 and s.kv.num_free_blocks == 1
    out, _ = step(s)
    assert [r.request_id for r in out.preempted] == [victim]
    preempted = requests[victim]
    assert preempted.status is RequestStatus.PREEMPTED
    assert preempted.block_ids == [] and preempted.num_computed_tokens == 0
    assert preempted.num_output_tokens == 1  # what it generated is kept and recomputed
    assert victim not in [c.request.request_id for c in out.chunks]
    assert s.num_preemptions == 1

    run_all(s)
    for request in requests.values():
        assert request.finish_reason is FinishReason.LENGTH
        assert request.num_output_tokens == 8
    assert preempted.num_preemptions >= 1
    assert s.kv.num_free_blocks == s.kv.num_blocks


@pytest.mark.parametrize("short_of", ["seats", "blocks"])
def test_higher_priority_waiting_request_displaces_last_running(short_of: str) -> None:
    if short_of == "seats":
        s = make_scheduler(max_num_seqs=1)
    else:  # 16 token slots: low alone fills them by its 2nd step
        s = make_scheduler(num_blocks=4, block_size=4)
    low = make_request("low", 12, priority=1, max_tokens=4)
    s.add_request(low)
    step(s)
    peer = make_request("peer", 8, priority=1, max_tokens=4, first_token=300)
    s.add_request(peer)
    out, _ = step(s)  # equal priority: waits, displaces nobody
    assert out.preempted == [] and [c.request for c in out.chunks] == [low]

    high = make_request("high", 4, priority=0, max_tokens=3, first_token=500)
    s.add_request(high)
    out, _ = step(s)
    assert out.preempted == [low]
    assert [c.request for c in out.chunks] == [high]
    assert low.block_ids == [] and low.status is RequestStatus.PREEMPTED
    assert run_all(s) == ["high", "low", "peer"]
    assert low.num_output_tokens == 4 and peer.num_output_tokens == 4


def chunk_spans(out: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks]


def chat_finished(s: Scheduler) -> bool:
    return "chat" not in s.requests


def test_waiting_urgent_prompt_goes_before_a_running_low_priority_prompt() -> None:
    # "batch" reads a 40-token prompt 8 tokens a step; "chat" must not wait for all of it.
    clock = FakeClock()
    s = make_scheduler(max_num_batched_tokens=8, clock=clock)
    batch = make_request("batch", 40, priority=100, max_tokens=2)
    s.add_request(batch)
    step(s)
    chat = make_request("chat", 5, priority=0, max_tokens=3, first_token=500)
    s.add_request(chat)
    out, _ = step(s)
    assert chunk_spans(out) == [("chat", 0, 5), ("batch", 8, 1)]  # batch: its small share
    assert chat.num_output_tokens == 1  # its first token, in the step after it arrived
    out, _ = step(s)  # while chat runs, batch's prompt keeps its small share
    assert chunk_spans(out) == [("chat", 5, 1), ("batch", 9, 1)]
    out, _ = step(s)
    assert chat.is_finished
    out, _ = step(s)  # within the grace period: chat's user may send the next request now
    assert chunk_spans(out) == [("batch", 11, 1)]
    clock.now += LOWER_PROMPT_GRACE_SECONDS + 0.1
    out, _ = step(s)  # nothing urgent for a while: batch's prompt takes the whole budget
    assert chunk_spans(out) == [("batch", 12, 8)]
    assert run_all(s) == ["batch"]
    assert batch.num_output_tokens == 2 and batch.num_preemptions == 0


def test_lower_prompts_get_a_small_share_while_an_urgent_request_runs() -> None:
    clock = FakeClock()
    s = make_scheduler(max_num_batched_tokens=64, clock=clock)  # lower share: 64 // 16 = 4
    assert s.max_lower_prompt_tokens == 64 // LOWER_PROMPT_SHARE == 4
    add(s, [make_request("batch-1", 3, priority=5, max_tokens=2),
            make_request("batch-2", 40, priority=5, max_tokens=2, first_token=300),
            make_request("chat", 10, priority=0, max_tokens=2, first_token=500)])
    out, _ = step(s)  # the two batch prompts share 4 tokens
    assert chunk_spans(out) == [("chat", 0, 10), ("batch-1", 0, 3), ("batch-2", 0, 1)]
    out, _ = step(s)  # chat decodes: still urgent work in the engine, so steps stay small
    assert chunk_spans(out) == [("chat", 10, 1), ("batch-1", 3, 1), ("batch-2", 1, 4)]
    assert chat_finished(s)
    clock.now += LOWER_PROMPT_GRACE_SECONDS + 0.1
    out, _ = step(s)  # chat is long done: batch-2's prompt has the whole budget again
    assert chunk_spans(out) == [("batch-2", 5, 35)]


def test_a_stream_of_urgent_prompts_does_not_starve_a_lower_prompt() -> None:
    s = make_scheduler(max_num_seqs=16, max_num_batched_tokens=64)
    batch = make_request("batch", 20, priority=5, max_tokens=1)
    s.add_request(batch)
    for i in range(5):  # a new urgent prompt in every step
        s.add_request(make_request(f"chat-{i}", 8, priority=0, max_tokens=1,
                                   first_token=1000 + 10 * i))
        step(s)
    assert batch.num_output_tokens == 1  # 4 prompt tokens a step: done in the 5th
    assert batch.finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("seed", range(20))
def test_mixed_priorities_under_pressure_keep_invariants_and_finish(seed: int) -> None:
    # Few blocks, few seats, a small budget: preemption, chunking, deferral and the lower
    # share all happen; every request must still finish with all its tokens.
    rng = random.Random(seed)
    clock = FakeClock()
    s = make_scheduler(num_blocks=12, block_size=4, max_num_seqs=3, max_num_batched_tokens=16,
                       clock=clock)
    pending = [make_request(f"r{i}", rng.randint(1, 20), priority=rng.choice([0, 1, 5]),
                            max_tokens=rng.randint(1, 6), first_token=1000 * (i + 1))
               for i in range(12)]
    requests = list(pending)
    for _ in range(400):
        if pending and rng.random() < 0.5:
            s.add_request(pending.pop())
        if not pending and not s.has_unfinished():
            break
        clock.now += rng.choice([0.01, 0.5, LOWER_PROMPT_GRACE_SECONDS])
        step(s)
    assert not pending and not s.has_unfinished()
    for request in requests:
        assert request.finish_reason is FinishReason.LENGTH
        assert request.num_output_tokens == request.sampling_params.max_tokens
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_equal_priority_keeps_running_prompts_first() -> None:
    s = make_scheduler(max_num_batched_tokens=8)
    first = make_request("first", 20, max_tokens=1)
    s.add_request(first)
    step(s)
    s.add_request(make_request("second", 4, max_tokens=1, first_token=500))
    out, _ = step(s)
    assert chunk_spans(out) == [("first", 8, 8)]
    assert run_all(s) == ["first", "second"]


def test_outranked_decodes_are_not_deferred() -> None:
    s = make_scheduler(max_num_batched_tokens=8)
    low = make_request("low", 4, priority=5, max_tokens=4)
    s.add_request(low)
    step(s)  # low's prompt is read: from now on it decodes one token a step
    s.add_request(make_request("high", 20, priority=0, max_tokens=1, first_token=500))
    out, _ = step(s)
    assert chunk_spans(out) == [("low", 4, 1), ("high", 0, 7)]


def test_deferred_prompt_preempted_for_a_seat_is_not_scheduled() -> None:
    s = make_scheduler(max_num_seqs=1, max_num_batched_tokens=8)
    low = make_request("low", 20, priority=5, max_tokens=1)
    s.add_request(low)
    step(s)
    high = make_request("high", 4, priority=0, max_tokens=2, first_token=500)
    s.add_request(high)
    out, _ = step(s)
    assert out.preempted == [low] and chunk_spans(out) == [("high", 0, 4)]
    assert low.status is RequestStatus.PREEMPTED and low.block_ids == []
    assert run_all(s) == ["high", "low"]


def test_abort_waiting_and_running_frees_blocks() -> None:
    s = make_scheduler(max_num_seqs=1)
    running = make_request("run", 6, max_tokens=10)
    waiting = make_request("wait", 6, max_tokens=10, first_token=300)
    add(s, [running, waiting])
    step(s)
    assert running.status is RequestStatus.RUNNING and waiting.status is RequestStatus.WAITING
    assert s.kv.num_free_blocks < s.kv.num_blocks
    aborted = s.finish_requests(["run", "wait", "unknown"], FinishReason.ABORT)
    assert aborted == [running, waiting]
    for request in aborted:
        assert request.status is RequestStatus.FINISHED
        assert request.finish_reason is FinishReason.ABORT
        assert request.block_ids == []
    assert s.kv.num_free_blocks == s.kv.num_blocks
    assert not s.has_unfinished() and s.num_running == 0 and s.num_waiting == 0
    assert s.schedule().is_empty


def test_abort_between_schedule_and_update_is_ignored() -> None:
    s = make_scheduler()
    request = make_request("a", 4, max_tokens=5)
    s.add_request(request)
    out = s.schedule()
    s.finish_requests(["a"], FinishReason.ABORT)
    assert s.update_from_output(out, {"a": FILLER}) == []
    assert request.num_output_tokens == 0
    assert request.finish_reason is FinishReason.ABORT
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_prefix_hit_starts_the_chunk_after_the_cached_tokens() -> None:
    s = make_scheduler(prefix_caching=True)
    first = make_request("first", 13, max_tokens=1)
    s.add_request(first)
    step(s, check=False)
    second = make_request("second", 14, max_tokens=1)  # same first 13 tokens
    s.add_request(second)
    out, _ = step(s, check=False)
    (chunk,) = out.chunks
    assert (chunk.start, chunk.num_tokens) == (12, 2)
    assert second.num_cached_tokens == 12
    assert second.finish_reason is FinishReason.LENGTH


def test_request_that_could_never_fit_the_cache_is_refused() -> None:
    s = make_scheduler(num_blocks=2, block_size=4)  # 8 token slots
    with pytest.raises(ValueError, match="cannot fit the KV cache"):
        s.add_request(make_request("long-prompt", 9, max_tokens=1))
    with pytest.raises(ValueError, match="max_tokens"):
        s.add_request(make_request("long-output", 4, max_tokens=6))
    with pytest.raises(ValueError, match="max_tokens"):
        s.add_request(make_request("up-to-context", 4, max_tokens=None))
    assert not s.has_unfinished()
    # Exactly full: the last sampled token needs no slot. It must finish, not livelock.
    exact = make_request("exact", 4, max_tokens=5)
    s.add_request(exact)
    with pytest.raises(ValueError, match="already in use"):
        s.add_request(make_request("exact", 3, max_tokens=1))
    assert run_all(s) == ["exact"]
    assert exact.num_output_tokens == 5 and exact.finish_reason is FinishReason.LENGTH


# (sampling params, request kwargs, tokens the fake model samples, expected outputs, reason,
# stop_reason)
STOP_CASES = {
    "eos": ({}, {}, [5, EOS, 5], 2, FinishReason.STOP, None),
    "ignore_eos": ({"ignore_eos": True, "max_tokens": 3}, {}, [EOS] * 4, 3,
                   FinishReason.LENGTH, None),
    "stop_token_ids": ({"stop_token_ids": [9]}, {}, [5, 6, 9, 5], 3, FinishReason.STOP, 9),
    "min_tokens_eos": ({"min_tokens": 3}, {}, [EOS] * 5, 3, FinishReason.STOP, None),
    "min_tokens_stop_id": ({"min_tokens": 2, "stop_token_ids": [9]}, {}, [9] * 5, 2,
                           FinishReason.STOP, 9),
    "max_tokens": ({"max_tokens": 3}, {}, [5] * 5, 3, FinishReason.LENGTH, None),
    "max_model_len": ({"max_tokens": None}, {"max_model_len": 10}, [5] * 5, 2,
                      FinishReason.LENGTH, None),
    "max_model_len_before_max_tokens": ({"max_tokens": 6}, {"max_model_len": 11}, [5] * 6, 3,
                                        FinishReason.LENGTH, None),
}


@pytest.mark.parametrize("case", list(STOP_CASES))
def test_stop_conditions(case: str) -> None:
    params, kwargs, tokens, expected_outputs, reason, stop_reason = STOP_CASES[case]
    s = make_scheduler()
    request = make_request("r", 8, **kwargs, **params)
    s.add_request(request)
    for token in tokens:
        _, finished = step(s, {"r": token})
        if finished:
            break
    assert finished == [request]
    assert request.output_token_ids == tokens[:expected_outputs]
    assert request.finish_reason is reason
    assert request.stop_reason == stop_reason
    assert s.kv.num_free_blocks == s.kv.num_blocks and not s.has_unfinished()

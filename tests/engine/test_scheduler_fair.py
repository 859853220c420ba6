"""The fair policy (Virtual Token Counter) and the fcfs policy, driven without a model."""

from __future__ import annotations

import argparse
import random
from collections import Counter

import pytest

from surge.config import EngineConfig, add_engine_args
from surge.engine import fairness
from surge.engine.fairness import OUTPUT_TOKEN_COST, PROMPT_TOKEN_COST
from surge.engine.kv_cache import BlockManager
from surge.engine.request import ANONYMOUS_TENANT, FinishReason, Request, RequestStatus
from surge.engine.scheduler import (
    FairScheduler,
    FcfsScheduler,
    Scheduler,
    SchedulerOutput,
    make_scheduler,
)
from surge.sampling_params import SamplingParams
from tests.engine.test_scheduler import FILLER, FakeClock, check_invariants

_ids = iter(range(10**9))


def fair(num_blocks: int = 256, block_size: int = 4, max_num_seqs: int = 4,
         max_num_batched_tokens: int = 32, weights: dict[str, float] | None = None,
         policy: str = "fair", burst_tokens: int | None = None) -> Scheduler:
    return make_scheduler(policy, BlockManager(num_blocks, block_size, False), max_num_seqs,
                          max_num_batched_tokens, tenant_weights=weights,
                          fair_burst_tokens=burst_tokens, clock=FakeClock())


def request(tenant: str, num_prompt: int = 8, max_tokens: int = 8, priority: int = 0,
            name: str | None = None) -> Request:
    """A request that runs exactly ``max_tokens`` steps of decoding (EOS is never sampled)."""
    name = name or f"{tenant}-{next(_ids)}"
    first = 100 * (next(_ids) % 1000 + 1)
    return Request(name, list(range(first, first + num_prompt)),
                   SamplingParams(max_tokens=max_tokens, ignore_eos=True), frozenset({2}),
                   priority=priority, tenant=tenant)


def step(s: Scheduler) -> tuple[SchedulerOutput, list[Request]]:
    out = s.schedule()
    check_invariants(s, out)
    sampled = {c.request.request_id: FILLER for c in out.chunks if c.samples}
    return out, s.update_from_output(out, sampled)


def run_all(s: Scheduler, max_steps: int = 2000) -> list[str]:
    order: list[str] = []
    for _ in range(max_steps):
        if not s.has_unfinished():
            return order
        order.extend(r.request_id for r in step(s)[1])
    raise AssertionError("a request starved: the scheduler made no progress")


def weighted_service(s: Scheduler, tenant: str) -> float:
    stats = s.tenant_stats()[tenant]
    return (stats.served_prompt_tokens * PROMPT_TOKEN_COST
            + stats.served_output_tokens * OUTPUT_TOKEN_COST)


def counters(s: Scheduler) -> dict[str, float]:
    return {tenant: stats.virtual_tokens for tenant, stats in s.tenant_stats().items()}


def keep_backlogged(s: Scheduler, tenants: list[str], depth: int = 20) -> None:
    """Top up each tenant's queue so it never empties: the tenants stay backlogged."""
    stats = s.tenant_stats()
    for tenant in tenants:
        waiting = stats[tenant].num_waiting if tenant in stats else 0
        for _ in range(depth - waiting):
            s.add_request(request(tenant))


# -- policies --------------------------------------------------------------------------------

def test_make_scheduler_picks_the_policy_and_refuses_an_unknown_one() -> None:
    assert type(fair(policy="fair")) is FairScheduler
    assert type(fair(policy="fcfs")) is FcfsScheduler
    assert type(fair(policy="priority")) is Scheduler
    with pytest.raises(ValueError, match="scheduling_policy='wfq' is invalid: allowed is "
                                         "one of fcfs, priority, fair"):
        fair(policy="wfq")


def test_the_policy_flag_reaches_the_engine_config_and_defaults_to_priority() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert EngineConfig.from_args(parser.parse_args([])).scheduling_policy == "priority"
    args = parser.parse_args(["--scheduling-policy", "fair"])
    assert EngineConfig.from_args(args).scheduling_policy == "fair"
    with pytest.raises(ValueError, match="scheduling_policy='wfq' is invalid"):
        EngineConfig(scheduling_policy="wfq")
    with pytest.raises(ValueError, match=r"tenant_weights\['a'\]=-1 is invalid"):
        EngineConfig(tenant_weights={"a": -1})


def test_the_burst_credit_flag_reaches_the_scheduler_and_refuses_a_negative_one() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert EngineConfig.from_args(parser.parse_args([])).fair_burst_tokens is None
    config = EngineConfig.from_args(parser.parse_args(["--fair-burst-tokens", "0"]))
    assert config.fair_burst_tokens == 0
    with pytest.raises(ValueError, match="fair_burst_tokens=-1 is invalid"):
        EngineConfig(fair_burst_tokens=-1)
    assert fair(max_num_batched_tokens=48).burst_tokens == 96  # default: two steps' budget
    assert fair(burst_tokens=0).burst_tokens == 0


def test_fcfs_ignores_priorities() -> None:
    s = fair(policy="fcfs", max_num_seqs=1)
    for name, priority in [("first", 5), ("second", 0), ("third", -3)]:
        s.add_request(request("t", max_tokens=1, priority=priority, name=name))
    assert run_all(s) == ["first", "second", "third"]


def test_fcfs_never_preempts_for_a_more_urgent_request() -> None:
    s = fair(policy="fcfs", max_num_seqs=1)
    low = request("t", max_tokens=3, priority=9, name="low")
    s.add_request(low)
    step(s)
    s.add_request(request("t", max_tokens=1, priority=-9, name="urgent"))
    out, _ = step(s)
    assert out.preempted == [] and [c.request for c in out.chunks] == [low]
    assert run_all(s) == ["low", "urgent"]


# -- fair: shares ------------------------------------------------------------------------------

def test_backlogged_tenants_with_weights_1_to_2_get_service_1_to_2() -> None:
    s = fair(weights={"b": 2})
    one_request = 8 * PROMPT_TOKEN_COST + 8 * OUTPUT_TOKEN_COST  # the most one request adds
    worst_gap = 0.0
    for _ in range(400):
        keep_backlogged(s, ["a", "b"])
        step(s)
        c = counters(s)
        worst_gap = max(worst_gap, abs(c["a"] - c["b"]))
    # Counters of backlogged tenants stay within two requests of each other ...
    assert worst_gap <= 2 * one_request
    # ... so their service is in the ratio of their weights, whatever the run length.
    ratio = weighted_service(s, "b") / weighted_service(s, "a")
    assert ratio == pytest.approx(2.0, rel=0.05)
    assert counters(s)["a"] == weighted_service(s, "a")  # no lift while backlogged


def test_a_flood_does_not_delay_a_light_tenant_behind_its_queue() -> None:
    # "flood" queued 40 requests first; under the priority policy "light" would wait for all.
    # (Without burst credit, as in the paper: with it, "light" would borrow the one seat.)
    for policy, expected_wait in [("fair", 1), ("priority", 40)]:
        s = fair(policy=policy, max_num_seqs=1, burst_tokens=0)
        for _ in range(40):
            s.add_request(request("flood", max_tokens=2))
        step(s)
        light = request("light", max_tokens=2, name="light")
        s.add_request(light)
        order = run_all(s)
        assert order.index("light") == expected_wait, policy


@pytest.mark.parametrize("burst_tokens", [0, 32])
def test_an_idle_tenant_is_lifted_on_return_and_cannot_starve_the_others(
        burst_tokens: int) -> None:
    s = fair(max_num_seqs=4, burst_tokens=burst_tokens)
    for _ in range(200):
        keep_backlogged(s, ["a", "b"])
        step(s)
    before = counters(s)
    assert min(before["a"], before["b"]) > 1000  # "idle" was away while they were served

    burst = [request("idle") for _ in range(40)]
    for r in burst:
        s.add_request(r)
    lifted = counters(s)["idle"]
    # Lifted to the least served backlogged tenant, less the burst credit.
    assert lifted == min(before["a"], before["b"]) - burst_tokens

    admitted: list[str] = []
    for _ in range(60):
        keep_backlogged(s, ["a", "b"])
        out, _ = step(s)
        admitted += [c.request.tenant for c in out.chunks if c.start == 0]
    # Without the lift "idle" would take every seat for some 200 steps; with it, the three
    # take turns: none gets more than about a third of the seats.
    shares = {t: admitted.count(t) / len(admitted) for t in ("a", "b", "idle")}
    assert all(0.2 <= share <= 0.45 for share in shares.values()), shares


def test_a_tenant_returning_to_an_empty_queue_is_lifted_to_the_last_backlogged() -> None:
    s = fair(burst_tokens=4)
    for _ in range(5):
        s.add_request(request("a"))
    run_all(s)
    served_a = counters(s)["a"]
    assert served_a > 0
    s.add_request(request("b"))  # nobody waits now: "a" was the last one backlogged
    assert counters(s)["b"] == served_a - 4


def test_priorities_order_requests_within_a_tenant_not_across_tenants() -> None:
    s = fair(max_num_seqs=1)
    s.add_request(request("a", max_tokens=2, priority=5, name="a-low"))
    s.add_request(request("a", max_tokens=2, priority=0, name="a-high"))
    s.add_request(request("b", max_tokens=2, priority=-10, name="b-urgent"))
    s.add_request(request("b", max_tokens=2, priority=-10, name="b-urgent-2"))
    # a's own priorities order a's requests; b's very urgent ones do not jump ahead of a.
    assert run_all(s) == ["a-high", "b-urgent", "a-low", "b-urgent-2"]


def test_under_kv_pressure_the_victim_is_from_the_tenant_most_over_its_share() -> None:
    # 5 blocks of 4 tokens: three 4-token prompts take 3, and each needs a 2nd at token 5.
    # "light" weighs 4, so after the first step "heavy" is the tenant most over its share.
    # (fcfs, for contrast, preempts the latest arrival.)
    for policy, victim in [("fair", "heavy-low"), ("fcfs", "light")]:
        s = fair(num_blocks=5, weights={"light": 4}, policy=policy)
        s.add_request(request("heavy", 4, max_tokens=6, priority=0, name="heavy-urgent"))
        s.add_request(request("heavy", 4, max_tokens=6, priority=5, name="heavy-low"))
        s.add_request(request("light", 4, max_tokens=6, priority=9, name="light"))
        out, _ = step(s)
        assert len(out.chunks) == 3 and out.preempted == []
        out, _ = step(s)
        assert [r.request_id for r in out.preempted] == [victim], policy
        run_all(s)
        assert all(r.status is RequestStatus.FINISHED for r in s.requests.values())


def test_without_credit_a_request_beyond_its_seat_share_never_preempts_for_a_seat() -> None:
    # Two tenants: half a seat each, so nobody may take the one seat (nor borrow it: no credit).
    s = fair(max_num_seqs=1, burst_tokens=0)
    s.add_request(request("heavy", max_tokens=4, name="heavy"))
    step(s)
    s.add_request(request("light", max_tokens=1, name="light"))
    out, _ = step(s)  # light is served less, but takes the seat only when it frees
    assert out.preempted == [] and [c.request.request_id for c in out.chunks] == ["heavy"]
    assert run_all(s) == ["heavy", "light"]


def test_a_light_tenant_takes_a_seat_from_a_flood_at_once_and_seats_do_not_thrash() -> None:
    s = fair(max_num_seqs=4)
    keep_backlogged(s, ["flood"], depth=8)
    step(s)
    assert s.num_running == 4  # the flood holds every seat
    s.add_request(request("light", max_tokens=20, name="light"))
    out, _ = step(s)
    # Two active tenants, two seats each: light takes one from the flood, in this step.
    assert [r.tenant for r in out.preempted] == ["flood"]
    assert "light" in [c.request.request_id for c in out.chunks]
    finished: list[str] = []
    for _ in range(30):  # the flood stays backlogged; light's seat is never taken back
        keep_backlogged(s, ["flood"], depth=8)
        out, done = step(s)
        assert out.preempted == []
        finished.extend(r.request_id for r in done)
    assert s.num_preemptions == 1 and "light" in finished


def test_a_light_tenant_above_a_fractional_share_still_takes_a_seat_from_a_flood() -> None:
    # Three tenants, 8 seats: 8/3 each. "b" holds 1 and "c" 2, so the flood holds 5; "c" is
    # less than a whole seat below 8/3, yet with a third seat it still holds fewer than the
    # flood keeps (4), so it takes one at once instead of waiting for a flood request to end.
    s = fair(max_num_seqs=8, max_num_batched_tokens=64)
    s.add_request(request("b", max_tokens=50, name="b1"))
    for name in ("c1", "c2"):
        s.add_request(request("c", max_tokens=50, name=name))
    step(s)
    keep_backlogged(s, ["flood"], depth=8)
    step(s)
    assert Counter(r.tenant for r in s.running) == {"flood": 5, "c": 2, "b": 1}
    s.add_request(request("c", max_tokens=50, name="c3"))
    out, _ = step(s)
    assert [r.tenant for r in out.preempted] == ["flood"]
    assert "c3" in [c.request.request_id for c in out.chunks]
    for _ in range(10):  # 4 flood, 3 c, 1 b: nobody can gain a seat without dropping below
        keep_backlogged(s, ["flood"], depth=8)
        assert step(s)[0].preempted == []


@pytest.mark.parametrize("burst_tokens", [0, None])
def test_backlogged_tenants_hold_seats_by_weight_without_preemption(
        burst_tokens: int | None) -> None:
    s = fair(max_num_seqs=6, weights={"gold": 2}, burst_tokens=burst_tokens)
    keep_backlogged(s, ["bronze"], depth=12)
    step(s)
    seats = Counter[str]()
    late_preemptions = 0
    for number in range(60):
        keep_backlogged(s, ["bronze", "gold"], depth=12)
        out, _ = step(s)
        if number >= 20:  # once the counters met: seats held, step by step, near 1:2
            seats.update(r.tenant for r in s.running)
            late_preemptions += len(out.preempted)
    assert 1.6 <= seats["gold"] / seats["bronze"] <= 2.4, seats
    # Free seats go to a tenant below its seat share first; without that, counters hand
    # bronze seats beyond its share and gold preempts them back, over and over. Gold takes
    # its two seats at once; with burst credit it borrows more when it arrives, once only.
    assert late_preemptions == 0
    if burst_tokens == 0:
        assert s.num_preemptions <= 2


def test_a_new_weight_moves_seats_at_the_next_step() -> None:
    s = fair(max_num_seqs=4, burst_tokens=0)
    for _ in range(10):
        keep_backlogged(s, ["a", "b"], depth=6)
        step(s)
    assert Counter(r.tenant for r in s.running) == {"a": 2, "b": 2}
    s.set_tenant_weights({"b": 3})
    keep_backlogged(s, ["a", "b"], depth=6)
    out, _ = step(s)  # b now holds 2 seats for weight 3 against a's 2 for 1: it takes one
    assert [r.tenant for r in out.preempted] == ["a"]
    assert Counter(r.tenant for r in s.running) == {"a": 1, "b": 3}


@pytest.mark.parametrize(("burst_tokens", "light_seats"), [(0, 2), (30, 3)])
def test_a_returning_tenant_borrows_seats_for_its_burst_within_its_credit(
        burst_tokens: int, light_seats: int) -> None:
    s = fair(max_num_seqs=4, max_num_batched_tokens=64, burst_tokens=burst_tokens)
    for _ in range(20):
        keep_backlogged(s, ["flood"], depth=8)
        step(s)
    level = counters(s)["flood"]
    for number in range(4):
        s.add_request(request("light", 8, max_tokens=20, name=f"light-{number}"))
    assert counters(s)["light"] == level - burst_tokens  # lifted, less the credit
    out, _ = step(s)
    # Without credit "light" takes its share, 2 of the 4 seats. With 30 tokens of credit it
    # borrows a third: each request admitted charges 10 (8 prompt tokens and a sampled one
    # at 2), and it borrows while its counter is below the level it returned to.
    assert Counter(r.tenant for r in s.running) == {"light": light_seats,
                                                   "flood": 4 - light_seats}
    assert len(out.preempted) == light_seats and {r.tenant for r in out.preempted} == {"flood"}
    # Charged 10 per request admitted: with credit, back at the level (spent), so the fourth
    # request waits.
    assert counters(s)["light"] == level - burst_tokens + 10 * light_seats
    for _ in range(18):  # the flood stays backlogged; the borrowed seat is not taken back
        keep_backlogged(s, ["flood"], depth=8)
        assert step(s)[0].preempted == []
    assert Counter(r.tenant for r in s.running)["light"] == light_seats


def test_a_seat_borrowed_from_the_lenders_last_request_is_not_taken_by_a_third() -> None:
    # "b" borrows both seats, the second one the flood's last: the flood is then not running,
    # yet that seat is still borrowed. "c", back with credit and served less than "b", must
    # not take it from "b" (it counted as b's own once, and "c" preempted it).
    s = fair(max_num_seqs=2, max_num_batched_tokens=64, burst_tokens=200)
    for _ in range(20):
        keep_backlogged(s, ["flood"], depth=4)
        step(s)
    for number in range(2):
        s.add_request(request("b", 8, max_tokens=20, name=f"b-{number}"))
    out, _ = step(s)
    assert [r.tenant for r in out.preempted] == ["flood", "flood"]
    s.add_request(request("c", 8, max_tokens=4, name="c"))
    assert counters(s)["c"] < counters(s)["b"]
    for _ in range(10):
        assert step(s)[0].preempted == []
    assert Counter(r.tenant for r in s.running) == {"b": 2}


def test_backlogged_tenants_never_borrow_whatever_their_requests_cost() -> None:
    # Long prompts of varied length move the counters of two floods apart by more than a
    # request at times; they are never lifted, so they have no credit and never preempt
    # each other (borrowing on counters alone, without that rule, preempts 3 times here).
    rng = random.Random(0)
    s = fair(max_num_seqs=4, max_num_batched_tokens=32, num_blocks=512)
    for _ in range(300):
        for tenant in ("a", "b"):
            waiting = s.tenant_stats().get(tenant)
            for _ in range(6 - (waiting.num_waiting if waiting else 0)):
                s.add_request(request(tenant, rng.randint(20, 60), max_tokens=4))
        step(s)
    assert s.num_preemptions == 0
    ratio = weighted_service(s, "a") / weighted_service(s, "b")
    assert ratio == pytest.approx(1.0, rel=0.1)


def test_a_waiting_request_of_a_less_served_tenant_goes_before_a_running_prompt() -> None:
    s = fair(max_num_batched_tokens=8, burst_tokens=0)
    s.add_request(request("heavy", 40, max_tokens=1, name="heavy"))
    step(s)  # heavy's prompt runs 8 tokens a step; its counter is now 8
    s.add_request(request("light", 4, max_tokens=1, name="light"))
    assert counters(s) == {"heavy": 8, "light": 8}  # lifted: heavy was backlogged last
    out, _ = step(s)  # a tie: heavy's running prompt keeps its place
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("heavy", 8)]
    out, _ = step(s)  # now heavy is ahead: light's prompt goes first
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [
        ("light", 4), ("heavy", 4)]


# -- stats and weights ---------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["fcfs", "priority", "fair"])
def test_tokens_served_are_counted_per_tenant_under_every_policy(policy: str) -> None:
    s = fair(policy=policy, num_blocks=6, max_num_seqs=3)  # tight: preemptions recompute
    for tenant in ("a", "b", "a"):
        s.add_request(request(tenant, num_prompt=10, max_tokens=5))
    s.add_request(request(ANONYMOUS_TENANT, num_prompt=3, max_tokens=2))
    run_all(s)
    stats = s.tenant_stats()
    assert s.num_preemptions > 0
    assert {t: (v.served_prompt_tokens, v.served_output_tokens) for t, v in stats.items()} == {
        "a": (20, 10), "b": (10, 5), ANONYMOUS_TENANT: (3, 2)}  # recomputation is free
    assert all(v.num_running == v.num_waiting == 0 for v in stats.values())


def test_stats_count_running_and_waiting_requests_per_tenant() -> None:
    s = fair(max_num_seqs=2, weights={"a": 3})
    for tenant in ("a", "a", "a", "b"):
        s.add_request(request(tenant))
    step(s)
    stats = s.tenant_stats()
    assert (stats["a"].num_running, stats["a"].num_waiting, stats["a"].weight) == (1, 2, 3.0)
    assert (stats["b"].num_running, stats["b"].num_waiting, stats["b"].weight) == (1, 0, 1.0)


def test_weights_can_be_changed_while_running_and_bad_ones_are_refused() -> None:
    s = fair()
    for _ in range(200):
        keep_backlogged(s, ["a", "b"])
        step(s)
    s.set_tenant_weights({"a": 3})
    served_before = {t: weighted_service(s, t) for t in ("a", "b")}
    for _ in range(400):
        keep_backlogged(s, ["a", "b"])
        step(s)
    gained = {t: weighted_service(s, t) - served_before[t] for t in ("a", "b")}
    assert gained["a"] / gained["b"] == pytest.approx(3.0, rel=0.1)
    with pytest.raises(ValueError, match=r"tenant_weights\['a'\]=0 is invalid: allowed is "
                                         "a finite number > 0"):
        s.set_tenant_weights({"a": 0})
    with pytest.raises(ValueError, match="tenant_weights key=''"):
        make_scheduler("fair", BlockManager(4, 4), 1, 8, tenant_weights={"": 1})


def test_idle_tenants_beyond_the_cap_are_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fairness, "MAX_IDLE_TENANTS", 3)
    s = fair(burst_tokens=0)
    for index in range(6):
        s.add_request(request(f"t{index}", max_tokens=1))
        run_all(s)
    assert set(s.tenant_stats()) == {"t3", "t4", "t5"}  # the three idle the shortest
    s.add_request(request("t0", max_tokens=1))
    assert s.tenant_stats()["t0"].virtual_tokens == counters(s)["t5"]  # lifted, not banked


def test_stats_name_active_and_recently_idle_tenants_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fairness, "IDLE_TENANTS_IN_STATS", 2)
    s = fair()
    for index in range(4):
        s.add_request(request(f"t{index}", max_tokens=1))
        run_all(s)
    s.add_request(request("t0", max_tokens=1))
    assert set(s.tenant_stats()) == {"t0", "t3", "t2"}
    run_all(s)
    assert s.tenant_stats()["t0"].served_output_tokens == 2  # remembered while not shown


def test_a_refused_request_changes_no_counter() -> None:
    s = fair(num_blocks=2, block_size=4)
    for _ in range(3):
        s.add_request(request("a", 4, max_tokens=1))
    run_all(s)
    with pytest.raises(ValueError, match="cannot fit the KV cache"):
        s.add_request(request("b", 40))
    assert "b" not in counters(s) or counters(s)["b"] == 0


# -- invariants under random load ------------------------------------------------------------

@pytest.mark.parametrize("seed", range(30))
def test_random_load_keeps_fairness_invariants(seed: int) -> None:
    rng = random.Random(seed)
    weights = {t: rng.choice([1, 2, 3]) for t in "abcd"}
    s = fair(num_blocks=24, block_size=4, max_num_seqs=4, max_num_batched_tokens=16,
             weights=weights)
    max_prompt, max_output = 20, 6
    largest = (max_prompt * PROMPT_TOKEN_COST + max_output * OUTPUT_TOKEN_COST) / min(
        weights.values())
    pending = [request(rng.choice("abcd"), rng.randint(1, max_prompt),
                       max_tokens=rng.randint(1, max_output), priority=rng.choice([0, 1, 5]))
               for _ in range(80)]
    everyone = list(pending)
    aborted: set[str] = set()
    previous: dict[str, float] = {}
    for _ in range(3000):
        for _ in range(rng.choice([0, 0, 1, 3])):
            if pending:
                s.add_request(pending.pop())
        if not pending and not s.has_unfinished():
            break
        if s.requests and rng.random() < 0.06:  # a client goes away, waiting or running
            victim = rng.choice(sorted(s.requests))
            aborted.add(victim)
            s.finish_requests([victim], FinishReason.ABORT)
        step(s)
        now = counters(s)
        assert all(now[t] >= previous.get(t, 0.0) for t in now), "a counter decreased"
        previous = now
        backlogged = [now[t] for t, v in s.tenant_stats().items() if v.num_waiting]
        if len(backlogged) > 1:
            # The paper's bound for backlogged tenants: two of the largest request (the
            # worst gap seen here over 200 seeds is 1.4 of them).
            assert max(backlogged) - min(backlogged) <= 2 * largest
    assert not pending and not s.has_unfinished(), "a request starved"
    for r in everyone:
        if r.request_id in aborted:
            assert r.finish_reason is FinishReason.ABORT
            continue
        assert r.finish_reason is FinishReason.LENGTH
        assert r.num_output_tokens == r.sampling_params.max_tokens
    assert s.kv.num_free_blocks == s.kv.num_blocks
    assert 0 < len(aborted) < len(everyone)
    stats = s.tenant_stats().values()
    assert all(v.num_running == v.num_waiting == 0 for v in stats)

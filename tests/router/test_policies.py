"""The policies as pure functions of replica state: spread, proportions, stickiness, how few
keys move on a membership change, prefix affinity and its load guard."""

from __future__ import annotations

import collections
import random

import pytest

from surge.router.policies import (
    ConsistentHash,
    LatencyAware,
    LeastOutstanding,
    PrefixAffinity,
    RequestFacts,
    RoundRobin,
    Weighted,
    make_policy,
    prompt_chunks,
)
from surge.router.replicas import Replica

NO_FACTS = RequestFacts()


def _replicas(n: int, **kwargs: float) -> list[Replica]:
    return [Replica(f"http://127.0.0.1:{9000 + i}", f"r{i}", **kwargs) for i in range(n)]


def _counts(policy: object, replicas: list[Replica], n: int,
            facts: RequestFacts = NO_FACTS) -> collections.Counter[str]:
    return collections.Counter(policy.choose(replicas, facts).name for _ in range(n))  # type: ignore[attr-defined]


def test_round_robin_spreads_evenly() -> None:
    replicas = _replicas(3)
    assert _counts(RoundRobin(), replicas, 300) == {"r0": 100, "r1": 100, "r2": 100}


def test_weighted_gives_exact_proportions_smoothly() -> None:
    a, b, c = _replicas(3)
    a.weight, b.weight, c.weight = 5.0, 1.0, 1.0
    policy = Weighted()
    picks = [policy.choose([a, b, c], NO_FACTS).name for _ in range(70)]
    assert collections.Counter(picks) == {"r0": 50, "r1": 10, "r2": 10}
    # Smooth: the heavy replica never gets more than its share in a row (nginx: a a b a c a a).
    assert picks[:7] == ["r0", "r0", "r1", "r0", "r2", "r0", "r0"]


def test_weighted_skips_unavailable_replicas_without_losing_proportions() -> None:
    a, b, _unavailable = _replicas(3)
    a.weight, b.weight = 3.0, 1.0
    policy = Weighted()
    assert _counts(policy, [a, b], 400) == {"r0": 300, "r1": 100}


def test_least_outstanding_prefers_the_idle_replica() -> None:
    replicas = _replicas(2)
    replicas[0].in_flight = 5
    policy = LeastOutstanding(random.Random(0))
    assert _counts(policy, replicas, 100) == {"r1": 100}


def test_power_of_two_choices_never_picks_the_busiest_and_spreads_ties() -> None:
    replicas = _replicas(4)
    for i, replica in enumerate(replicas):
        replica.in_flight = i * 10  # r3 is the busiest: it loses every comparison
    counts = _counts(LeastOutstanding(random.Random(1)), replicas, 2000)
    assert "r3" not in counts
    # r0 wins every pair it is in: 3 of the 6 pairs.
    assert counts["r0"] == pytest.approx(1000, abs=120)
    idle = _replicas(4)
    spread = _counts(LeastOutstanding(random.Random(2)), idle, 4000)
    assert all(abs(count - 1000) < 150 for count in spread.values()), spread


class _RandomChoice:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choose(self, candidates: list[Replica], request: RequestFacts) -> Replica:
        return self.rng.choice(candidates)


def _mean_imbalance(policy: object, seed: int) -> float:
    """Requests arrive and finish at random; the mean gap between the busiest and the idlest
    replica over the run."""
    replicas = _replicas(4)
    rng = random.Random(seed)
    active: list[Replica] = []
    gaps = []
    for _ in range(5000):
        chosen = policy.choose(replicas, NO_FACTS)  # type: ignore[attr-defined]
        chosen.in_flight += 1
        active.append(chosen)
        if len(active) > 40:  # steady state: about 40 in flight
            active.pop(rng.randrange(len(active))).in_flight -= 1
        loads = [r.in_flight for r in replicas]
        gaps.append(max(loads) - min(loads))
    return sum(gaps) / len(gaps)


def test_power_of_two_choices_balances_a_simulated_load() -> None:
    p2c = _mean_imbalance(LeastOutstanding(random.Random(3)), seed=4)
    blind = _mean_imbalance(_RandomChoice(random.Random(3)), seed=4)
    assert p2c < blind / 2, (p2c, blind)


def test_latency_policy_prefers_the_faster_replica_and_tries_new_ones() -> None:
    fast, slow, new = _replicas(3)
    fast.ewma_latency, slow.ewma_latency = 0.010, 0.200
    policy = LatencyAware(random.Random(5))
    assert _counts(policy, [fast, slow], 100) == {"r0": 100}
    # A replica with no latency yet costs nothing: it gets tried.
    assert _counts(policy, [fast, new], 100) == {"r2": 100}
    # Load counts too: the fast one with a queue loses to the slow idle one.
    fast.in_flight = 30
    assert _counts(policy, [fast, slow], 100) == {"r1": 100}


def _session(i: int) -> RequestFacts:
    return RequestFacts(session_key=f"user-{i}")


def test_consistent_hash_is_sticky_and_spreads_keys() -> None:
    replicas = _replicas(4)
    policy = ConsistentHash()
    first = {i: policy.choose(replicas, _session(i)).name for i in range(2000)}
    for i in range(0, 2000, 7):
        replicas[i % 4].in_flight += 3  # load does not move a session
        assert policy.choose(replicas, _session(i)).name == first[i]
    spread = collections.Counter(first.values())
    assert all(400 < count < 600 for count in spread.values()), spread


@pytest.mark.parametrize("n", [3, 5, 8])
def test_consistent_hash_moves_about_one_nth_of_keys_on_a_join(n: int) -> None:
    replicas = _replicas(n + 1)
    policy = ConsistentHash()
    keys = range(5000)
    before = {i: policy.choose(replicas[:n], _session(i)).name for i in keys}
    after = {i: policy.choose(replicas, _session(i)).name for i in keys}
    moved = [i for i in keys if before[i] != after[i]]
    # Only keys the newcomer takes move, about 1/(n+1) of them; none move between old ones.
    assert all(after[i] == replicas[n].name for i in moved)
    assert len(moved) / len(keys) == pytest.approx(1 / (n + 1), abs=0.03)


def test_consistent_hash_on_a_leave_only_moves_the_leavers_keys() -> None:
    replicas = _replicas(5)
    policy = ConsistentHash()
    keys = range(5000)
    before = {i: policy.choose(replicas, _session(i)).name for i in keys}
    gone = replicas.pop(2)
    after = {i: policy.choose(replicas, _session(i)).name for i in keys}
    moved = [i for i in keys if before[i] != after[i]]
    assert all(before[i] == gone.name for i in moved)
    assert len(moved) == sum(1 for name in before.values() if name == gone.name)


def test_consistent_hash_without_a_key_balances_load() -> None:
    replicas = _replicas(2)
    replicas[0].in_flight = 9
    assert _counts(ConsistentHash(), replicas, 50) == {"r1": 50}


def test_prompt_chunks_share_exactly_the_common_prefix() -> None:
    a = list(range(100))
    b = list(range(40)) + [999] * 60
    ha, hb = prompt_chunks(a), prompt_chunks(b)
    assert len(ha) == 100 // 16
    common = sum(1 for x, y in zip(ha, hb, strict=False) if x == y)
    assert common == 40 // 16
    assert prompt_chunks("x" * 63) == []  # shorter than one chunk: nothing to match


def _prompt(prefix: int, unique: int) -> RequestFacts:
    return RequestFacts(prompt=[prefix] * 512 + [unique] * 32)


def test_prefix_affinity_keeps_a_prefix_on_one_replica_and_spreads_prefixes() -> None:
    replicas = _replicas(4)
    policy = PrefixAffinity()
    homes: dict[int, set[str]] = collections.defaultdict(set)
    for i in range(200):
        prefix = i % 4
        homes[prefix].add(policy.choose(replicas, _prompt(prefix, i)).name)
    assert all(len(names) == 1 for names in homes.values()), homes
    # New prefixes went to the replica remembering the least: four prefixes, four replicas.
    assert len({next(iter(names)) for names in homes.values()}) == 4


def test_prefix_affinity_falls_back_to_least_loaded_when_imbalanced() -> None:
    replicas = _replicas(2)
    policy = PrefixAffinity(balance_abs=4, balance_rel=1.5)
    home = policy.choose(replicas, _prompt(7, 0))
    other = next(r for r in replicas if r is not home)
    home.in_flight = 4  # a difference of 4 is within the threshold: affinity holds
    assert policy.choose(replicas, _prompt(7, 1)) is home
    home.in_flight = 6  # 6 - 0 > 4 and 6 > 1.5 * 0: imbalanced
    assert policy.choose(replicas, _prompt(7, 2)) is other
    other.in_flight = 5  # 6 vs 5: balanced again
    assert policy.choose(replicas, _prompt(7, 3)) in (home, other)


def test_prefix_affinity_memory_is_bounded() -> None:
    replicas = _replicas(1)
    policy = PrefixAffinity(capacity=100)
    for i in range(50):
        policy.choose(replicas, RequestFacts(prompt=[i] * 320))  # 20 chunks each
    assert len(policy._memory_of(replicas[0])) == 100


def test_prefix_affinity_with_text_prompts() -> None:
    replicas = _replicas(3)
    policy = PrefixAffinity()
    system = "You are a helpful assistant. " * 20
    first = policy.choose(replicas, RequestFacts(prompt=system + "What is 2+2?"))
    for question in ("Hi", "Tell me a story", "Why is the sky blue?"):
        assert policy.choose(replicas, RequestFacts(prompt=system + question)) is first


def test_unknown_policy_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="allowed is one of consistent_hash, latency"):
        make_policy("random")

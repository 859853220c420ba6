"""The routability rules, with a fake clock: breaker (ejection, half-open trial,
re-admission), draining, the in-flight cap, active health thresholds, the retry budget."""

from __future__ import annotations

import pytest

from surge.router.health import HealthConfig, HealthTracker
from surge.router.replicas import Breaker, BreakerConfig, Replica, ReplicaSet
from surge.router.retry import RetryBudget, RetryConfig, backoff_seconds


def _replica(**config: object) -> Replica:
    return Replica("http://127.0.0.1:9000", "r0", breaker_config=BreakerConfig(**config))


def _fail(replica: Replica, now: float, times: int = 1) -> None:
    for _ in range(times):
        replica.begin()
        replica.failed("connect", now)


def test_consecutive_failures_eject_then_a_trial_readmits() -> None:
    replica = _replica(eject_after=3, eject_seconds=5.0)
    _fail(replica, now=0.0, times=2)
    assert replica.is_routable(0.0)  # two failures: not yet
    _fail(replica, now=0.0)
    assert replica.breaker is Breaker.OPEN and replica.num_ejections == 1
    assert not replica.is_routable(4.9)
    assert replica.is_routable(5.0)  # the ejection time is over: one trial may go
    replica.begin()
    assert replica.breaker is Breaker.HALF_OPEN
    assert not replica.is_routable(5.0)  # only one trial at a time
    replica.succeeded(0.01)
    assert replica.breaker is Breaker.CLOSED and replica.is_routable(5.0)
    assert replica.errors == {"connect": 3}


def test_a_failed_trial_ejects_again_for_twice_as_long() -> None:
    replica = _replica(eject_after=1, eject_seconds=2.0, max_eject_seconds=5.0)
    _fail(replica, now=0.0)
    _fail(replica, now=2.0)  # the trial fails
    assert replica.breaker is Breaker.OPEN and replica.open_until == 6.0
    _fail(replica, now=6.0)
    assert replica.open_until == 11.0  # capped at max_eject_seconds
    assert replica.num_ejections == 3


def test_success_resets_the_failure_count() -> None:
    replica = _replica(eject_after=2)
    _fail(replica, now=0.0)
    replica.begin()
    replica.succeeded(0.01)
    _fail(replica, now=0.0)
    assert replica.breaker is Breaker.CLOSED


def test_a_client_leaving_does_not_count_against_the_replica() -> None:
    replica = _replica(eject_after=1)
    replica.begin()
    replica.abandoned()
    assert replica.in_flight == 0 and replica.breaker is Breaker.CLOSED


def test_draining_unhealthy_and_full_replicas_get_no_work() -> None:
    replicas = [Replica(f"http://h{i}", f"r{i}", breaker_config=BreakerConfig(max_in_flight=2))
                for i in range(4)]
    replicas[0].draining = True
    replicas[1].healthy = False
    replicas[2].in_flight = 2
    assert ReplicaSet(replicas).routable(0.0) == [replicas[3]]
    assert replicas[0].state == "draining" and replicas[1].state == "unhealthy"


def test_latency_average_follows_recent_answers() -> None:
    replica = _replica()
    for latency in (1.0, 1.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1):
        replica.begin()
        replica.succeeded(latency)
    # The old 1 s answers fade by a factor (1 - 0.3) per new answer.
    assert replica.ewma_latency == pytest.approx(0.1 + 0.9 * 0.7 ** 6)
    assert replica.num_requests == 8 and replica.in_flight == 0


def test_replica_names_are_unique() -> None:
    replicas = ReplicaSet([Replica("http://a", "a")])
    with pytest.raises(ValueError, match="replica name 'a' is taken"):
        replicas.add(Replica("http://b", "a"))


def test_bad_breaker_settings_say_what_is_allowed() -> None:
    with pytest.raises(ValueError, match="eject_after=0 is invalid: allowed is an integer >= 1"):
        BreakerConfig(eject_after=0)


def test_health_thresholds_need_results_in_a_row() -> None:
    tracker = HealthTracker(HealthConfig(fail_threshold=2, success_threshold=3))
    replica = _replica()
    assert not tracker.record(replica, False)
    assert tracker.record(replica, True) is False  # the streak of failures broke
    tracker.record(replica, False)
    assert tracker.record(replica, False) and not replica.healthy
    tracker.record(replica, True)
    tracker.record(replica, True)
    assert not replica.healthy
    assert tracker.record(replica, True) and replica.healthy


def test_health_config_rejects_a_relative_path() -> None:
    with pytest.raises(ValueError, match="allowed is a path starting with '/'"):
        HealthConfig(path="health")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_retry_budget_allows_a_fraction_of_requests_plus_a_floor() -> None:
    clock = FakeClock()
    budget = RetryBudget(RetryConfig(budget_ratio=0.2, budget_floor_per_second=1.0,
                                     budget_window=10.0), clock)
    for _ in range(100):
        budget.record_request()
    # 0.2 * 100 + 1/s * 10 s = 30 retries, then no more.
    assert sum(budget.try_spend() for _ in range(50)) == 30
    assert budget.num_refused == 20
    clock.now += 11.0  # the window moved on: the floor is available again
    assert sum(budget.try_spend() for _ in range(50)) == 10


def test_backoff_grows_with_jitter_up_to_the_cap() -> None:
    config = RetryConfig(backoff_base=0.01, backoff_cap=0.05)
    for retry, ceiling in [(0, 0.01), (1, 0.02), (2, 0.04), (5, 0.05)]:
        samples = [backoff_seconds(retry, config) for _ in range(200)]
        assert all(0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling * 0.7  # jitter spreads over the whole range


def test_retry_config_refuses_zero_attempts() -> None:
    with pytest.raises(ValueError, match="max_attempts=0 is invalid"):
        RetryConfig(max_attempts=0)

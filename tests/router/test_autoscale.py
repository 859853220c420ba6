"""Autoscaler decisions with an injected clock: sustained load scales up after the up delay,
a sustained lull scales down after the (longer) down delay, bursts and dips do nothing, the
count stays within [min, max], and each decision is counted."""

from __future__ import annotations

import pytest

from surge.router.autoscale import AutoscaleConfig, AutoscaleLoop, Autoscaler
from surge.router.metrics import RouterMetrics
from surge.router.replicas import Replica, ReplicaSet

CONFIG = AutoscaleConfig(min_replicas=1, max_replicas=4, target_in_flight=4.0,
                         scale_up_delay=5.0, scale_down_delay=20.0, interval=1.0)


def _run(scaler: Autoscaler, current: int, loads: list[float], start: float = 0.0
         ) -> list[tuple[float, int]]:
    """Feed one sample per second; apply decisions; return (time, new count) of each."""
    changes = []
    for second, load in enumerate(loads):
        decision = scaler.observe(start + second, current, load)
        if decision is not None:
            current = decision.desired
            changes.append((start + second, current))
    return changes


def test_sustained_load_scales_up_after_the_delay() -> None:
    scaler = Autoscaler(CONFIG)
    # 10 in flight wants ceil(10/4) = 3 replicas; the first sample is at t=0.
    assert _run(scaler, 1, [10.0] * 8) == [(5.0, 3)]


def test_a_burst_shorter_than_the_up_delay_scales_nothing() -> None:
    scaler = Autoscaler(CONFIG)
    assert _run(scaler, 1, [10.0, 10.0, 10.0, 0.0, 10.0, 10.0, 10.0, 10.0, 0.0]) == []


def test_scale_up_goes_to_the_least_wanted_during_the_delay() -> None:
    scaler = Autoscaler(CONFIG)
    # Wanted 4, 4, 2, 4, 4, 4: the smallest over the last 5 s is 2.
    assert _run(scaler, 1, [16.0, 16.0, 8.0, 16.0, 16.0, 16.0]) == [(5.0, 2)]


def test_scale_down_waits_for_the_longer_delay_and_respects_the_minimum() -> None:
    scaler = Autoscaler(CONFIG)
    changes = _run(scaler, 4, [0.0] * 25)
    assert changes == [(20.0, 1)]


def test_samples_at_any_interval_reach_a_decision() -> None:
    """Samples 0.3 s apart never land exactly on the delay: the decision still comes once
    the load has been low for the whole delay, not later and not never."""
    scaler = Autoscaler(CONFIG)
    decision = None
    now = 0.0
    while decision is None and now < 60.0:
        decision = scaler.observe(now, 4, 0.0)
        now += 0.3
    assert decision is not None and decision.desired == 1
    assert 20.0 <= decision.at < 20.3


def test_a_short_lull_scales_nothing_down() -> None:
    scaler = Autoscaler(CONFIG)
    loads = [16.0] * 3 + [0.0] * 15 + [16.0] + [0.0] * 5
    assert _run(scaler, 4, loads) == []


def test_the_count_stays_within_the_maximum() -> None:
    scaler = Autoscaler(CONFIG)
    assert _run(scaler, 1, [1000.0] * 6) == [(5.0, 4)]
    assert scaler.wanted(1000.0) == 4 and scaler.wanted(0.0) == 1


def test_each_change_needs_its_own_full_delay() -> None:
    scaler = Autoscaler(CONFIG)
    # 2 replicas wanted for 5 s, then 4 wanted: the second step waits 5 s more.
    changes = _run(scaler, 1, [8.0] * 6 + [16.0] * 7)
    assert changes == [(5.0, 2), (11.0, 4)]


ZERO = AutoscaleConfig(min_replicas=0, max_replicas=3, target_in_flight=4.0,
                       scale_up_delay=5.0, scale_down_delay=20.0, idle_timeout=30.0)


def test_scale_to_zero_after_the_idle_timeout_and_not_before() -> None:
    scaler = Autoscaler(ZERO)
    assert scaler.observe(0.0, 1, 0.0, idle_for=29.0) is None
    # In flight work keeps a replica, however long since the last request arrived.
    assert scaler.observe(1.0, 1, 1.0, idle_for=31.0) is None
    decision = scaler.observe(2.0, 2, 0.0, idle_for=30.0)
    assert decision is not None and (decision.current, decision.desired) == (2, 0)
    assert "no request for 30 s" in decision.reason


def test_at_zero_the_autoscaler_leaves_waking_to_the_proxy() -> None:
    scaler = Autoscaler(ZERO)
    assert _run(scaler, 0, [0.0] * 30) == []
    assert scaler.last_wanted == 0


def test_with_a_zero_floor_a_busy_deployment_keeps_at_least_one() -> None:
    scaler = Autoscaler(ZERO)
    # A lull shorter than the idle timeout scales down to one, not to zero.
    assert _run(scaler, 3, [0.0] * 25) == [(20.0, 1)]
    assert scaler.wanted(0.0) == 1


@pytest.mark.parametrize(("field", "value", "message"), [
    ("min_replicas", -1, "min_replicas=-1 is invalid: allowed is an integer >= 0"),
    ("idle_timeout", 0, "idle_timeout=0 is invalid: allowed is seconds > 0"),
    ("max_replicas", 0, "max_replicas=0 is invalid: allowed is an integer >= min_replicas"),
    ("target_in_flight", 0, "target_inflight_per_replica=0 is invalid"),
])
def test_bad_settings_say_what_is_allowed(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AutoscaleConfig(**{field: value})


class _FakeLocal:
    def __init__(self, count: int) -> None:
        self.count = count
        self.targets: list[int] = []

    def scale_to(self, target: int) -> None:
        self.targets.append(target)
        self.count = target


def test_the_loop_applies_logs_and_counts_decisions(caplog: pytest.LogCaptureFixture) -> None:
    clock = [0.0]
    replica = Replica("http://127.0.0.1:1", "r1")
    replicas = ReplicaSet([replica])
    metrics = RouterMetrics(replicas)
    local = _FakeLocal(1)
    loop = AutoscaleLoop(Autoscaler(CONFIG), replicas, local, metrics, clock=lambda: clock[0])
    replica.in_flight = 12
    for second in range(6):
        clock[0] = float(second)
        loop.step()
    assert local.targets == [3]
    assert "autoscaler: 1 -> 3 replicas" in caplog.text
    text = metrics.render()[0].decode()
    assert 'surge:router_scaling_events_total{direction="up"} 1.0' in text
    assert "surge:router_desired_replicas 3.0" in text
    assert loop.status()["decisions"][0]["direction"] == "up"  # type: ignore[index]

"""The capacity model (surge.bench.capacity) on curves whose answers queueing theory gives,
its monotonicity, profiles read from a real `surge bench` run, and `surge bench capacity`."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from surge.bench.capacity import ReplicaCurve, plan_replicas, simulate
from surge.bench.cli import main
from surge.bench.fake_server import FakeScript

from ._helpers import bench


def _no_ttft_curve(rates: dict[int, float]) -> ReplicaCurve:
    """A replica whose TTFT is its queueing time alone."""
    return ReplicaCurve.from_points(list(rates), list(rates.values()), [[0.0]] * len(rates))


def _sim_mean(curve: ReplicaCurve, replicas: int, rate: float, work: str, n: int) -> float:
    from surge.bench import capacity

    rng = np.random.default_rng(3)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n)).tolist()
    draws = rng.random(n).tolist()
    works = (rng.exponential(1.0, n) if work == "exponential" else np.ones(n)).tolist()
    ttft, _ = capacity._run(curve, replicas, arrivals, draws, works)
    return float(np.mean(ttft[n // 10:]))


def test_one_slot_exponential_work_is_m_m_1() -> None:
    mu, lam = 10.0, 7.0
    curve = _no_ttft_curve({1: mu})
    assert _sim_mean(curve, 1, lam, "exponential", 150_000) == pytest.approx(
        (lam / mu) / (mu - lam), rel=0.06)
    p99 = simulate(curve, 1, lam, num_requests=150_000, work="exponential", seed=5).ttft_p99
    assert p99 == pytest.approx(math.log(100 * lam / mu) / (mu - lam), rel=0.1)


def test_one_slot_fixed_work_is_m_d_1() -> None:
    mu, lam = 10.0, 7.0
    rho = lam / mu
    assert _sim_mean(_no_ttft_curve({1: mu}), 1, lam, "fixed", 100_000) == pytest.approx(
        rho / (2 * mu * (1 - rho)), rel=0.05)


def test_a_batch_of_c_that_scales_linearly_is_m_m_c() -> None:
    # X(n) = n * mu up to c running: c independent servers sharing one FIFO queue.
    c, mu, lam = 3, 4.0, 10.0
    curve = ReplicaCurve.from_points([1, c], [mu, c * mu], [[0.0], [0.0]])
    a, rho = lam / mu, lam / (c * mu)
    top = a**c / math.factorial(c) / (1 - rho)
    erlang_c = top / (sum(a**k / math.factorial(k) for k in range(c)) + top)
    assert _sim_mean(curve, 1, lam, "exponential", 150_000) == pytest.approx(
        erlang_c / (c * mu - lam), rel=0.08)


def test_light_load_gives_the_profiles_own_ttft() -> None:
    samples = list(np.linspace(0.10, 0.20, 101))
    curve = ReplicaCurve.from_points([1, 4], [5.0, 12.0], [samples, [0.5] * 10])
    result = simulate(curve, 2, 0.05, num_requests=5_000)
    assert result.ttft_p99 == pytest.approx(0.199, abs=0.003)
    assert result.ttft_p50 == pytest.approx(0.15, abs=0.005)


def _curve() -> ReplicaCurve:
    rng = np.random.default_rng(0)
    return ReplicaCurve.from_points(
        [1, 2, 4, 8], [10.0, 18.0, 30.0, 40.0],
        [rng.gamma(4, s / 4, 200) for s in (0.02, 0.03, 0.05, 0.09)])


def test_more_replicas_are_never_worse() -> None:
    curve = _curve()
    p99 = [simulate(curve, n, 90.0, num_requests=8_000).ttft_p99 for n in range(3, 8)]
    assert all(later <= earlier for earlier, later in itertools.pairwise(p99)), p99
    assert p99[0] > 1.5 * p99[-1]  # and the count matters near saturation


def test_ttft_p99_rises_with_the_rate() -> None:
    curve = _curve()
    p99 = [simulate(curve, 3, r, num_requests=8_000).ttft_p99 for r in (20, 50, 80, 100, 115)]
    assert all(later >= earlier for earlier, later in itertools.pairwise(p99)), p99


def test_past_peak_is_overloaded_and_planning_skips_it() -> None:
    curve = _curve()
    assert simulate(curve, 2, 80.0).overloaded
    plan = plan_replicas(curve, 100.0, 0.2, num_requests=5_000)
    assert plan.replicas is not None and plan.replicas >= 3
    assert plan.rows[0].overloaded  # the first row shown is the count that cannot keep up
    chosen = next(r for r in plan.rows if r.replicas == plan.replicas)
    assert chosen.ttft_p99 <= 0.2
    assert all(r.ttft_p99 > 0.2 for r in plan.rows if r.replicas < plan.replicas)


def test_a_target_below_the_lone_request_ttft_has_no_answer() -> None:
    plan = plan_replicas(_curve(), 10.0, 0.001)
    assert plan.replicas is None and "more replicas cannot help" in plan.reason


@pytest.mark.parametrize("kwargs", [
    {"concurrency": [], "throughput": [], "ttft_samples": []},
    {"concurrency": [0], "throughput": [1.0], "ttft_samples": [[0.1]]},
    {"concurrency": [1], "throughput": [0.0], "ttft_samples": [[0.1]]},
    {"concurrency": [1], "throughput": [1.0], "ttft_samples": [[]]},
    {"concurrency": [1], "throughput": [1.0], "ttft_samples": [[0.1]], "max_batch": 0},
])
def test_bad_curves_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ReplicaCurve.from_points(**kwargs)


def test_profile_from_a_real_bench_run_and_the_cli(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    doc, _ = bench(FakeScript(ttft=0.01, tpot=0.002), concurrency=[1, 4], num_requests=24)
    profile = tmp_path / "replica.json"
    profile.write_text(json.dumps(doc))
    curve = ReplicaCurve.from_bench_json(profile)
    assert curve.concurrency == (1, 4) and curve.max_batch == 4
    assert curve.ttft(1, 0.5) >= 0.01 and curve.throughput[1] > curve.throughput[0]

    rate = 2.5 * curve.peak_throughput
    code = main(["capacity", "--profile", str(profile), "--rate", f"{rate}",
                 "--ttft-p99", "1", "--sim-requests", "4000"])
    printed = capsys.readouterr().out
    assert code == 0 and "<- smallest" in printed
    needed = int(printed.rsplit("replicas needed:", 1)[1])
    assert needed >= 3  # 2.5x one replica's peak needs at least 3

    assert main(["capacity", "--profile", str(profile), "--rate", "1", "--ttft-p99",
                 "0.0001", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["replicas"] is None


def test_cli_refuses_an_open_loop_profile(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    doc, _ = bench(FakeScript(), rate=[50.0], num_requests=10)
    profile = tmp_path / "open.json"
    profile.write_text(json.dumps(doc))
    assert main(["capacity", "--profile", str(profile), "--rate", "1", "--ttft-p99", "1"]) == 2
    assert "--concurrency 1,2,4,8" in capsys.readouterr().err


def test_a_profile_measured_through_a_router_is_divided_per_replica(tmp_path: Path) -> None:
    doc, _ = bench(FakeScript(ttft=0.005), concurrency=[2, 4], num_requests=16)
    profile = tmp_path / "deployment.json"
    profile.write_text(json.dumps(doc))
    whole = ReplicaCurve.from_bench_json(profile)
    per = ReplicaCurve.from_bench_json(profile, replicas=2)
    assert per.concurrency == (1, 2) and per.max_batch == 2
    assert per.throughput == pytest.approx([x / 2 for x in whole.throughput])
    assert per.ttft_quantiles == whole.ttft_quantiles
    with pytest.raises(ValueError, match="not a multiple"):
        ReplicaCurve.from_bench_json(profile, replicas=3)


def test_replicas_sharing_one_server_worth_of_host_behave_as_m_m_1() -> None:
    # Two one-slot replicas on a host that runs one at full speed: together they complete mu
    # requests/s whenever any is busy, so the number in the system is M/M/1's.
    from surge.bench import capacity

    mu, lam, n = 10.0, 6.0, 150_000
    rng = np.random.default_rng(4)
    arrivals = np.cumsum(rng.exponential(1.0 / lam, n)).tolist()
    works = rng.exponential(1.0, n).tolist()
    _, done = capacity._run(_no_ttft_curve({1: mu}), 2, arrivals, [0.5] * n, works, shared=1.0)
    sojourn = np.asarray(done[n // 10:]) - np.asarray(arrivals[n // 10:])
    assert float(np.mean(sojourn)) == pytest.approx(1 / (mu - lam), rel=0.06)
    # and own hardware per replica is faster
    _, alone = capacity._run(_no_ttft_curve({1: mu}), 2, arrivals, [0.5] * n, works)
    assert np.mean(np.asarray(alone) - np.asarray(arrivals)) < 0.6 * np.mean(sojourn)
    assert simulate(_no_ttft_curve({1: mu}), 3, 12.0, shared=1.0).overloaded

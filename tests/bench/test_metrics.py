"""Statistics on hand-made records: percentiles, TPOT, goodput, errors, timeline."""

from __future__ import annotations

import numpy as np
import pytest

from surge.bench.client import RequestRecord
from surge.bench.metrics import Slo, latency_stats, summarize, timeline


def _ok(index: int, ttft: float, tpot: float, tokens: int, start: float = 0.0) -> RequestRecord:
    e2e = ttft + tpot * (tokens - 1)
    return RequestRecord(index=index, start=start, e2e=e2e, ttft=ttft, itl=[tpot] * (tokens - 1),
                         prompt_tokens=10, output_tokens=tokens, token_source="usage", status=200)


def _failed(index: int, status: int = 500, start: float = 0.0) -> RequestRecord:
    return RequestRecord(index=index, start=start, e2e=0.01, status=status,
                         error_type="server_error", error="boom")


def test_latency_stats_match_numpy() -> None:
    values = np.random.default_rng(0).exponential(0.1, size=1001)
    stats = latency_stats(values)
    assert stats["count"] == 1001
    assert stats["mean"] == pytest.approx(values.mean())
    for p in (50, 90, 99):
        assert stats[f"p{p}"] == pytest.approx(np.percentile(values, p))
    assert stats["max"] == values.max()


def test_latency_stats_of_nothing_are_none() -> None:
    assert latency_stats([]) == {"count": 0, "mean": None, "std": None, "min": None,
                                 "p50": None, "p90": None, "p99": None, "max": None}


def test_tpot_excludes_the_first_token() -> None:
    record = _ok(0, ttft=0.5, tpot=0.02, tokens=11)
    assert record.tpot == pytest.approx(0.02)
    assert _ok(0, ttft=0.5, tpot=0.02, tokens=1).tpot is None


def test_slo_parsing_accepts_units_and_explains_mistakes() -> None:
    slo = Slo.parse("ttft=2s,tpot=100ms, itl=250000us,e2e=1.5s")
    assert slo == Slo(ttft=2.0, tpot=0.1, itl=0.25, e2e=1.5)
    for bad in ("ttft=2", "latency=2s", "ttft"):
        with pytest.raises(ValueError, match="ttft=2s,tpot=100ms"):
            Slo.parse(bad)


def test_goodput_counts_only_requests_meeting_every_slo() -> None:
    records = [
        _ok(0, ttft=0.1, tpot=0.01, tokens=5),  # meets both
        _ok(1, ttft=0.9, tpot=0.01, tokens=5),  # TTFT too slow
        _ok(2, ttft=0.1, tpot=0.20, tokens=5),  # TPOT too slow
        _ok(3, ttft=0.1, tpot=0.90, tokens=1),  # one token: no TPOT to violate
        _failed(4),  # a failure never counts
    ]
    summary = summarize(records, duration=2.0, slo=Slo.parse("ttft=500ms,tpot=50ms"))
    assert summary["goodput"]["good"] == 2
    assert summary["goodput"]["requests_per_s"] == pytest.approx(1.0)
    assert summary["goodput"]["fraction"] == pytest.approx(2 / 5)
    assert summarize(records, 2.0, Slo())["goodput"] is None


def test_itl_slo_bounds_the_longest_gap() -> None:
    record = _ok(0, ttft=0.1, tpot=0.01, tokens=4)
    record.itl = [0.01, 0.3, 0.01]
    assert not Slo(itl=0.2).met_by(record)
    assert Slo(itl=0.4).met_by(record)


def test_summary_throughput_and_errors() -> None:
    records = [_ok(i, ttft=0.1, tpot=0.01, tokens=5) for i in range(8)]
    records += [_failed(8, status=500), _failed(9, status=0)]
    records[-1].error_type = "connection_error"
    summary = summarize(records, duration=4.0, slo=Slo())
    assert (summary["completed"], summary["failed"]) == (8, 2)
    assert summary["request_throughput"] == pytest.approx(2.0)
    assert summary["output_token_throughput"] == pytest.approx(10.0)
    assert summary["input_token_throughput"] == pytest.approx(20.0)
    assert summary["errors"]["by_status"] == {"500": 1, "no_response": 1}
    assert summary["errors"]["by_type"] == {"server_error": 1, "connection_error": 1}
    assert summary["latency"]["itl"]["count"] == 8 * 4
    assert summary["token_source"] == {"usage": 8}


def test_timeline_spreads_tokens_over_the_seconds_they_arrived() -> None:
    # 21 tokens from t=0.5 s, one every 0.1 s: chunks at 0.5 .. 2.5 s.
    records = [_ok(0, ttft=0.5, tpot=0.1, tokens=21), _failed(1, start=1.2)]
    line = timeline(records, duration=3.0)
    assert line["second"] == [0, 1, 2]
    assert line["output_tokens"] == [5, 10, 6]
    assert line["completed"] == [0, 0, 1]
    assert line["failed"] == [0, 1, 0]
    assert line["started"] == [1, 1, 0]

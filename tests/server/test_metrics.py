"""/metrics: vLLM-style names with the surge: prefix, values derived from request timestamps."""

from __future__ import annotations

import os

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from surge.engine.protocol import EngineStats
from surge.server.metrics import ServerMetrics

pytestmark = pytest.mark.timeout(10)

MODEL = "tiny-llama"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(metrics: ServerMetrics) -> Samples:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset({"model_name": MODEL, **labels}.items()))]


def bucket_count(samples: Samples, name: str, le: str) -> float:
    return value(samples, f"{name}_bucket", le=le)


@pytest.fixture
def metrics() -> ServerMetrics:
    return ServerMetrics(CollectorRegistry(), model_name=MODEL)


def test_every_metric_is_exported_before_any_traffic(metrics: ServerMetrics) -> None:
    # Dashboards and alerts need the series to exist (at zero) from the first scrape.
    samples = scrape(metrics)
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert value(samples, f"surge:{gauge}") == 0
    for counter in ("prefix_cache_queries", "prefix_cache_hits", "num_preemptions",
                    "prompt_tokens", "generation_tokens"):
        assert value(samples, f"surge:{counter}_total") == 0
    for reason in ("stop", "length", "abort"):
        assert value(samples, "surge:request_success_total", finished_reason=reason) == 0
    for reason in ("queue_full_requests", "queue_full_tokens", "rate_limit_requests",
                   "rate_limit_tokens", "unauthorized", "body_too_large"):
        assert value(samples, "surge:request_rejected_total", reason=reason) == 0
    for histogram in ("time_to_first_token_seconds", "inter_token_latency_seconds",
                      "e2e_request_latency_seconds", "request_queue_time_seconds",
                      "request_prefill_time_seconds", "request_decode_time_seconds"):
        assert value(samples, f"surge:{histogram}_count") == 0


def test_process_cpu_and_memory_are_exported(metrics: ServerMetrics) -> None:
    samples = scrape(metrics)
    assert samples[("process_resident_memory_bytes", frozenset())] > 0
    assert ("process_cpu_seconds_total", frozenset()) in samples


def test_engine_process_is_tracked_by_pid_and_skipped_when_gone(metrics: ServerMetrics) -> None:
    engine_pid: list[int | None] = [os.getpid()]
    metrics.track_engine_process(lambda: engine_pid[0])
    assert scrape(metrics)[("surge_engine_process_resident_memory_bytes", frozenset())] > 0
    engine_pid[0] = None  # engine died; the scrape must still work
    assert ("surge_engine_process_resident_memory_bytes", frozenset()) not in scrape(metrics)


def test_record_request_derives_every_latency(metrics: ServerMetrics) -> None:
    arrival = 100.0
    metrics.record_request(
        finish_reason="length", num_prompt_tokens=128, num_generation_tokens=4,
        arrival=arrival, first_scheduled=arrival + 0.5, first_token=arrival + 2.0,
        token_times=[arrival + 2.0, arrival + 2.04, arrival + 2.08, arrival + 2.33],
        finished=arrival + 2.5)
    samples = scrape(metrics)
    assert value(samples, "surge:request_success_total", finished_reason="length") == 1
    assert value(samples, "surge:prompt_tokens_total") == 128
    assert value(samples, "surge:generation_tokens_total") == 4
    assert value(samples, "surge:time_to_first_token_seconds_sum") == pytest.approx(2.0)
    assert value(samples, "surge:request_queue_time_seconds_sum") == pytest.approx(0.5)
    assert value(samples, "surge:request_prefill_time_seconds_sum") == pytest.approx(1.5)
    assert value(samples, "surge:request_decode_time_seconds_sum") == pytest.approx(0.33)
    assert value(samples, "surge:e2e_request_latency_seconds_sum") == pytest.approx(2.5)
    # Three gaps between four tokens: 0.04, 0.04, 0.25.
    assert value(samples, "surge:inter_token_latency_seconds_count") == 3
    assert value(samples, "surge:inter_token_latency_seconds_sum") == pytest.approx(0.33)
    assert bucket_count(samples, "surge:inter_token_latency_seconds", "0.05") == 2
    assert bucket_count(samples, "surge:inter_token_latency_seconds", "0.2") == 2
    assert bucket_count(samples, "surge:inter_token_latency_seconds", "0.3") == 3


def test_token_times_without_the_first_token_give_the_same_gaps(metrics: ServerMetrics) -> None:
    metrics.record_request("stop", 10, 3, arrival=0.0, first_scheduled=0.0, first_token=1.0,
                           token_times=[1.1, 1.3], finished=1.3)
    samples = scrape(metrics)
    assert value(samples, "surge:inter_token_latency_seconds_count") == 2
    assert value(samples, "surge:inter_token_latency_seconds_sum") == pytest.approx(0.3)


def test_request_aborted_before_its_first_token(metrics: ServerMetrics) -> None:
    # Only what happened is observed: no TTFT, prefill or decode time.
    metrics.record_request("abort", 50, 0, arrival=10.0, first_scheduled=None, first_token=None,
                           token_times=[], finished=13.0)
    samples = scrape(metrics)
    assert value(samples, "surge:request_success_total", finished_reason="abort") == 1
    assert value(samples, "surge:e2e_request_latency_seconds_sum") == pytest.approx(3.0)
    for histogram in ("time_to_first_token_seconds", "request_queue_time_seconds",
                      "request_prefill_time_seconds", "request_decode_time_seconds",
                      "inter_token_latency_seconds"):
        assert value(samples, f"surge:{histogram}_count") == 0


def test_out_of_order_clocks_never_observe_negative_durations(metrics: ServerMetrics) -> None:
    metrics.record_request("stop", 1, 1, arrival=5.0, first_scheduled=4.999, first_token=5.0,
                           token_times=[5.0], finished=4.9)
    samples = scrape(metrics)
    assert value(samples, "surge:request_queue_time_seconds_sum") == 0
    assert value(samples, "surge:e2e_request_latency_seconds_sum") == 0


def test_rejections_are_counted_by_reason(metrics: ServerMetrics) -> None:
    metrics.record_rejected("queue_full_requests")
    metrics.record_rejected("queue_full_requests")
    metrics.record_rejected("client_bug")  # a reason not known in advance gets its own series
    samples = scrape(metrics)
    assert value(samples, "surge:request_rejected_total", reason="queue_full_requests") == 2
    assert value(samples, "surge:request_rejected_total", reason="client_bug") == 1
    assert value(samples, "surge:request_rejected_total", reason="queue_full_tokens") == 0


def test_engine_stats_set_gauges_and_advance_counters(metrics: ServerMetrics) -> None:
    metrics.update_engine(EngineStats(num_running=3, num_waiting=7, kv_cache_usage=0.25,
                                      prefix_cache_queries=100, prefix_cache_hits=40,
                                      num_preemptions=2))
    metrics.update_engine(EngineStats(num_running=1, num_waiting=0, kv_cache_usage=0.5,
                                      prefix_cache_queries=150, prefix_cache_hits=40,
                                      num_preemptions=3))
    samples = scrape(metrics)
    assert value(samples, "surge:num_requests_running") == 1
    assert value(samples, "surge:num_requests_waiting") == 0
    assert value(samples, "surge:kv_cache_usage_perc") == 0.5
    assert value(samples, "surge:prefix_cache_queries_total") == 150
    assert value(samples, "surge:prefix_cache_hits_total") == 40
    assert value(samples, "surge:num_preemptions_total") == 3


def test_restarted_engine_does_not_make_counters_go_backwards(metrics: ServerMetrics) -> None:
    metrics.update_engine(EngineStats(prefix_cache_queries=1000, num_preemptions=5))
    metrics.update_engine(EngineStats(prefix_cache_queries=30, num_preemptions=0))  # restart
    metrics.update_engine(EngineStats(prefix_cache_queries=50, num_preemptions=1))
    samples = scrape(metrics)
    assert value(samples, "surge:prefix_cache_queries_total") == 1050
    assert value(samples, "surge:num_preemptions_total") == 6


def test_two_instances_do_not_collide() -> None:
    # Each server (and each test) gets its own registry unless one is passed in.
    first, second = ServerMetrics(model_name=MODEL), ServerMetrics(model_name=MODEL)
    first.record_rejected("queue_full_requests")
    samples = scrape(second)
    assert value(samples, "surge:request_rejected_total", reason="queue_full_requests") == 0

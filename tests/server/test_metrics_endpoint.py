"""GET /metrics: vLLM's metric names with the surge: prefix, fed by real requests."""

from __future__ import annotations

import httpx
import pytest

from tests.server._helpers import metric_value

HISTOGRAMS = ("time_to_first_token_seconds", "e2e_request_latency_seconds",
              "request_decode_time_seconds", "request_queue_time_seconds",
              "request_prefill_time_seconds")


@pytest.mark.timeout(120)
def test_a_request_moves_the_counters_and_histograms(client: httpx.Client) -> None:
    before = client.get("/metrics").text
    response = client.post("/v1/completions", json={
        "prompt": [5, 6, 7, 8, 9], "max_tokens": 7, "ignore_eos": True, "stream": True})
    assert response.status_code == 200
    after = client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text

    def gained(name: str, **labels: str) -> float:
        return metric_value(text, name, **labels) - metric_value(before, name, **labels)

    assert gained("surge:prompt_tokens_total") == 5
    assert gained("surge:generation_tokens_total") == 7
    assert gained("surge:request_success_total", finished_reason="length") == 1
    for histogram in HISTOGRAMS:
        assert gained(f"surge:{histogram}_count") == 1, histogram
    assert gained("surge:inter_token_latency_seconds_count") == 6  # between 7 tokens
    assert metric_value(text, "surge:num_requests_running") == 0
    assert metric_value(text, "surge:prefix_cache_queries_total") > 0
    # the API process and the engine process, both
    assert metric_value(text, "process_resident_memory_bytes") > 0
    assert metric_value(text, "surge_engine_process_resident_memory_bytes") > 0

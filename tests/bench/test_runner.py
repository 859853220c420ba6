"""Load shapes, goodput, errors and token accounting, end to end against the fake server."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from surge.bench import runner
from surge.bench.fake_server import FakeScript
from surge.bench.runner import BenchConfig

from ._helpers import bench, bench_run


def test_goodput_counts_only_requests_meeting_every_slo() -> None:
    # Request i gets TTFT [5, 50] ms[i % 2] and TPOT [2, 2, 20, 2] ms[i % 4]: per 4 requests,
    # one meets TTFT <= 25 ms and TPOT <= 10 ms, two meet the TTFT SLO, three the TPOT SLO.
    # The margins (20 ms and 8 ms) dwarf the measurement's overhead.
    script = FakeScript(ttft=[0.005, 0.050], tpot=[0.002, 0.002, 0.020, 0.002])
    for slo, good in (("ttft=25ms,tpot=10ms", 10), ("ttft=25ms", 20), ("tpot=10ms", 30)):
        run = bench_run(script, output_len="4", num_requests=40, concurrency=[8], slo=slo)
        goodput = run["summary"]["goodput"]
        assert goodput["good"] == good, slo
        assert goodput["fraction"] == pytest.approx(good / 40)
        assert goodput["requests_per_s"] == pytest.approx(good / run["summary"]["duration_s"])


def test_http_errors_are_counted_by_status_and_type_not_fatal() -> None:
    run = bench_run(FakeScript(error_rate=0.25, error_status=503), num_requests=40,
                    concurrency=[4], slo="e2e=10s")
    summary = run["summary"]
    assert (summary["completed"], summary["failed"]) == (30, 10)
    assert summary["errors"]["by_status"] == {"503": 10}
    assert summary["errors"]["by_type"] == {"server_error": 10}
    assert summary["errors"]["examples"]["server_error"] == "scripted failure"
    assert summary["goodput"]["good"] == 30  # failures never count as good
    assert summary["latency"]["e2e"]["count"] == 30  # nor enter the latency statistics
    assert sum(run["timeline"]["failed"]) == 10


def test_an_error_event_inside_a_stream_is_an_error() -> None:
    run = bench_run(FakeScript(error_rate=0.5, error_mode="stream"), num_requests=10)
    assert run["summary"]["errors"]["by_type"] == {"stream_error": 5}
    assert run["summary"]["errors"]["by_status"] == {"200": 5}


def test_an_unreachable_server_fails_every_request_without_crashing() -> None:
    with socket.socket() as sock:  # a port that was just free: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = bench_run(url=f"http://127.0.0.1:{port}", model="m", num_requests=5, concurrency=[2])
    assert run["summary"]["failed"] == 5
    assert run["summary"]["errors"]["by_type"] == {"connection_error": 5}
    assert run["summary"]["errors"]["by_status"] == {"no_response": 5}


def test_slow_requests_time_out_as_errors() -> None:
    run = bench_run(FakeScript(ttft=[2.0, 0.0]), num_requests=4, concurrency=[4],
                    request_timeout=0.2)
    assert run["summary"]["errors"]["by_type"] == {"timeout": 2}
    assert run["summary"]["completed"] == 2


def test_output_tokens_come_from_usage_when_the_server_sends_it() -> None:
    run = bench_run(FakeScript(output_tokens=7), output_len="100", num_requests=5)
    assert run["summary"]["token_source"] == {"usage": 5}
    assert run["summary"]["total_output_tokens"] == 35
    assert not any("chunks" in w for w in run["warnings"])


def test_without_usage_tokens_are_counted_by_the_tokenizer(tmp_path: Path) -> None:
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "tok": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    run = bench_run(FakeScript(usage=False), output_len="6", num_requests=5,
                    tokenizer=str(tmp_path), prompt_kind="text")
    assert run["summary"]["token_source"] == {"tokenizer": 5}
    assert run["summary"]["total_output_tokens"] == 30


def test_without_usage_or_tokenizer_chunks_are_counted_and_the_result_says_so() -> None:
    run = bench_run(FakeScript(usage=False), output_len="6", num_requests=5)
    assert run["summary"]["token_source"] == {"chunks": 5}
    assert run["summary"]["total_output_tokens"] == 30
    assert any("counted as streamed chunks" in w for w in run["warnings"])


@pytest.mark.parametrize("endpoint", ["embeddings", "classify"])
def test_embeddings_and_classify_endpoints(endpoint: str) -> None:
    run = bench_run(FakeScript(ttft=0.005), endpoint=endpoint, num_requests=10,
                    concurrency=[5], image_size=8)
    summary = run["summary"]
    assert summary["completed"] == 10
    assert summary["latency"]["e2e"]["p50"] >= 0.005 - 0.0005
    assert summary["latency"]["ttft"]["count"] == 0
    if endpoint == "embeddings":  # prompt tokens from the server's usage: 8 words each
        assert summary["total_input_tokens"] == 80


def test_closed_loop_keeps_exactly_the_requested_concurrency() -> None:
    doc, seen = bench(FakeScript(ttft=0.010), concurrency=[5], num_requests=30)
    assert seen.max_in_flight == 5
    assert doc["runs"][0]["summary"]["completed"] == 30


def test_open_loop_respects_max_concurrency() -> None:
    doc, seen = bench(FakeScript(ttft=0.010), rate=[float("inf")], max_concurrency=3,
                      num_requests=12)
    assert seen.max_in_flight == 3
    assert doc["runs"][0]["load"]["value"] is None  # an infinite rate is not a JSON number


def test_an_infinite_rate_for_a_duration_keeps_to_max_concurrency() -> None:
    run = bench_run(FakeScript(ttft=0.005), rate=[float("inf")], max_concurrency=4,
                    duration=0.2, num_requests=None)
    assert 0.2 <= run["summary"]["duration_s"] < 0.2 + 0.1
    assert run["summary"]["completed"] >= 4


def test_warmup_requests_are_sent_but_left_out() -> None:
    doc, seen = bench(FakeScript(), warmup=7, num_requests=10)
    assert seen.num_requests == 17
    assert len(doc["runs"][0]["records"]) == 10
    assert doc["warmup"] == {"requests": 7, "failed": 0}


def test_duration_runs_for_that_long_and_stops() -> None:
    run = bench_run(FakeScript(ttft=0.010), duration=0.3, num_requests=None, concurrency=[2])
    duration = run["summary"]["duration_s"]
    assert 0.3 <= duration < 0.3 + 0.2
    # Two workers, about 10 ms per request: about 60 requests in 0.3 s.
    assert 20 <= run["summary"]["completed"] <= 62
    assert not any("cycled" in w for w in run["warnings"])


def test_a_duration_run_that_repeats_prompts_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "DEFAULT_POOL_SIZE", 10)
    run = bench_run(FakeScript(), duration=0.1, num_requests=None, concurrency=[1])
    assert run["summary"]["completed"] > 10
    assert any("cycled through 10 distinct prompts" in w for w in run["warnings"])


def test_a_sweep_runs_each_point_with_its_own_prompts() -> None:
    doc, seen = bench(FakeScript(), concurrency=[1, 2, 4], num_requests=6, prompt_kind="ids",
                      vocab_size=100)
    assert [r["load"]["value"] for r in doc["runs"]] == [1, 2, 4]
    assert seen.num_requests == 18


def test_the_model_comes_from_v1_models_unless_given() -> None:
    doc, _ = bench(FakeScript(model="served-name"), num_requests=1)
    assert doc["config"]["model"] == "served-name"
    doc, _ = bench(FakeScript(), num_requests=1, model="explicit")
    assert doc["config"]["model"] == "explicit"


@pytest.mark.parametrize(("settings", "message"), [
    ({"concurrency": [2], "rate": [1.0]}, "not both"),
    ({"num_requests": None}, "--duration"),
    ({"url": "localhost:8000"}, "http://"),
    ({"endpoint": "chat", "prompt_kind": "ids"}, "--prompt-kind text"),
    ({"stream": False, "slo": "ttft=1s"}, "streamed"),
    ({"slo": "ttft=1"}, "ttft=2s"),
    ({"concurrency": [0]}, "--concurrency"),
    ({"prompt_kind": "ids"}, "--vocab-size"),
    ({"rate": [float("inf")], "duration": 1.0}, "--max-concurrency"),
])
def test_bad_configs_say_how_to_fix_them(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BenchConfig(**{"url": "http://127.0.0.1:1", **settings})

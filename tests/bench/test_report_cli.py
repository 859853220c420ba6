"""The command line, the summary table, the JSON file, plots and `surge bench compare`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from surge.bench.cli import add_parser, config_from_args, main
from surge.bench.fake_server import FakeScript
from surge.bench.report import format_comparison, format_results, read_json

from ._helpers import bench


def test_cli_run_writes_json_and_plots_and_prints_a_summary(server_thread, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sweep.json"
    code = main(["--url", server_thread.url, "--concurrency", "1,2", "--num-requests", "6",
                 "--input-len", "8", "--output-len", "uniform:2,5", "--slo", "ttft=1s",
                 "--output", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "Request throughput" in printed and "Goodput" in printed and "sweep" in printed
    doc = read_json(out)
    assert doc["config"]["concurrency"] == [1, 2] and doc["config"]["model"] == "fake-model"
    assert [len(run["records"]) for run in doc["runs"]] == [6, 6]
    assert {"ttft", "itl", "e2e", "start", "status"} <= set(doc["runs"][0]["records"][0])
    plots = sorted(p.name for p in (tmp_path / "sweep_plots").iterdir())
    assert plots == ["latency_cdf.png", "sweep.png", "timeline.png"]
    assert all((tmp_path / "sweep_plots" / p).read_bytes()[:4] == b"\x89PNG" for p in plots)


def test_cli_compare_prints_both_sides_and_ratios(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    slow, _ = bench(FakeScript(ttft=0.020), num_requests=8, concurrency=[2])
    fast, _ = bench(FakeScript(ttft=0.002), num_requests=8, concurrency=[2])
    (tmp_path / "a.json").write_text(json.dumps(slow))
    (tmp_path / "b.json").write_text(json.dumps(fast))
    assert main(["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    printed = capsys.readouterr().out
    ttft_row = next(line for line in printed.splitlines() if line.startswith("TTFT p50"))
    a_ms, b_ms, ratio, better = ttft_row.split()[-4:]
    assert float(b_ms) < float(a_ms) and ratio.endswith("x") and better == "B"
    assert float(ratio[:-1]) == pytest.approx(float(b_ms) / float(a_ms), abs=0.01)


def test_compare_notes_runs_that_do_not_pair_up() -> None:
    one, _ = bench(num_requests=2)
    two, _ = bench(num_requests=2, concurrency=[1, 2])
    assert "A has 1 runs and B 2" in format_comparison(one, two)


def test_cli_plot_redraws_from_a_saved_file(tmp_path: Path) -> None:
    doc, _ = bench(FakeScript(error_rate=0.5), num_requests=4)
    (tmp_path / "r.json").write_text(json.dumps(doc))
    assert main(["plot", str(tmp_path / "r.json"), "--plot-dir", str(tmp_path / "p")]) == 0
    assert {p.name for p in (tmp_path / "p").iterdir()} == {"latency_cdf.png", "timeline.png"}


def test_summary_shows_errors_and_warnings() -> None:
    doc, _ = bench(FakeScript(error_rate=0.5, usage=False), num_requests=4)
    text = format_results(doc)
    assert "Errors by type: server_error x2" in text
    assert "Errors by status: 500 x2" in text
    assert "WARNING: output tokens were counted as streamed chunks" in text


def test_workload_presets_fill_defaults_that_flags_override() -> None:
    parser = argparse.ArgumentParser(prog="surge")
    add_parser(parser.add_subparsers())

    def config(*flags: str):
        return config_from_args(parser.parse_args(["bench", "--url", "http://h:1", *flags]))

    w1 = config("--workload", "W1", "--vocab-size", "49152")
    assert (w1.concurrency, w1.num_requests, w1.input_len, w1.prompt_kind) == ([16], 16, "128",
                                                                               "ids")
    override = config("--workload", "W1", "--vocab-size", "9", "--num-requests", "32")
    assert override.num_requests == 32
    w2 = config("--workload", "W2", "--rate", "2")
    assert (w2.rate, w2.concurrency, w2.input_len) == ([2.0], [], "uniform:64,512")
    with pytest.raises(ValueError, match="--rate"):
        config("--workload", "W2")
    assert config("--duration", "5").num_requests is None


def test_cli_errors_are_one_line_with_a_fix(capsys: pytest.CaptureFixture) -> None:
    assert main(["--concurrency", "2"]) == 2
    assert "--url is required" in capsys.readouterr().err
    assert main(["--url", "http://127.0.0.1:1", "--input-len", "lots"]) == 2
    assert "uniform:64,512" in capsys.readouterr().err


def test_read_json_refuses_other_files(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="--output"):
        read_json(tmp_path / "x.json")

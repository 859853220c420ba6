"""The gate's bounds, its table and plot, and the exit status of a failing bound."""

from __future__ import annotations

from pathlib import Path

import pytest

from surge.optimize.gate import Bound, check_bounds, parse_gate
from surge.optimize.report import (
    Comparison,
    VariantMetrics,
    pareto_front,
    plot_variants,
    record_variant,
)


def test_parse_gate_reads_bounds() -> None:
    assert parse_gate("ppl_ratio<=1.10, agreement>=0.8") == [
        Bound("ppl_ratio", "<=", 1.10), Bound("agreement", ">=", 0.8)]
    assert parse_gate(None) == [] and parse_gate("  ") == []


@pytest.mark.parametrize("spec, says", [
    ("ppl_ratio=1.1", "METRIC OP NUMBER"),
    ("speed>=2", "unknown"),
    ("ppl<=abc", "METRIC OP NUMBER"),
    ("ppl<=1..2", "not a number"),
])
def test_parse_gate_refuses_bad_bounds_by_name(spec: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_gate(spec)


def test_check_bounds_fails_a_broken_or_unmeasured_bound() -> None:
    bounds = parse_gate("ppl_ratio<=1.1,agreement>=0.8,w4_tok_s_ratio>=1")
    failures = check_bounds(bounds, {"ppl_ratio": 1.2, "agreement": 0.9})
    assert failures == ["ppl_ratio<=1.1: measured 1.2", "w4_tok_s_ratio>=1: measured not measured"]
    assert check_bounds(bounds, {"ppl_ratio": 1.1, "agreement": 0.8, "w4_tok_s_ratio": 1.0}) == []


def _comparison(label: str, ppl: float, speed: float) -> Comparison:
    original = VariantMetrics("original", "/models/a", size_mb=10, ppl=10.0, w4_tok_s=50.0,
                              agreement=1.0)
    return Comparison(VariantMetrics(label, f"/out/{label}", size_mb=5, ppl=ppl,
                                     w4_tok_s=speed, agreement=0.9), original)


def test_ratios_table_and_gate_metrics() -> None:
    comparison = _comparison("int8", 11.0, 75.0)
    metrics = comparison.gate_metrics()
    assert metrics["ppl_ratio"] == pytest.approx(1.1)
    assert metrics["w4_tok_s_ratio"] == pytest.approx(1.5)
    assert metrics["size_mb_ratio"] == pytest.approx(0.5)
    table = comparison.table()
    assert "int8" in table and "(1.50x)" in table and "(1.10x)" in table


def test_variants_history_keeps_one_entry_per_label_and_plots(tmp_path: Path) -> None:
    history = tmp_path / "variants.jsonl"
    record_variant(history, _comparison("int8", 11.0, 75.0))
    record_variant(history, _comparison("int4", 12.0, 90.0))
    variants = record_variant(history, _comparison("int8", 10.5, 80.0))
    assert [v["label"] for v in variants] == ["original", "int8", "int4"]
    assert variants[1]["ppl"] == 10.5  # the latest int8 run
    plot_variants(variants, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_front_drops_dominated_points() -> None:
    points = [(50.0, 10.0), (80.0, 10.5), (70.0, 11.0), (90.0, 12.0)]
    assert pareto_front(points) == [(50.0, 10.0), (80.0, 10.5), (90.0, 12.0)]


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])  # untied, tied head
def test_parameters_count_the_checkpoint_once(tiny_checkpoint, preset: str) -> None:
    from surge.models.loader import load_model
    from surge.optimize.export import read_tensors
    from surge.optimize.report import weight_stats

    source = tiny_checkpoint(preset)
    stored = sum(t.numel() for t in read_tensors(source).values())
    for quantization in ("none", "int8"):
        loaded = load_model(source, dtype="bfloat16", device="cpu", quantization=quantization)
        params, resident = weight_stats(loaded.model)
        assert params == stored
        assert resident > 0
